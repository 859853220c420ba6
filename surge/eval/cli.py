"""`surge eval`: perplexity, a prompt suite and agreement with a baseline, as a table and JSON."""

from __future__ import annotations

import argparse
import sys

from surge.config import DTYPES, INT4_GROUP_SIZES, KV_CACHE_DTYPES, QUANTIZATIONS

__all__ = ["add_parser", "run_eval"]

EXAMPLES = """examples:
  surge eval --model ./SmolLM2-135M-Instruct.Q4_1.gguf --dtype bfloat16
  surge eval --model ./ckpt --against ./ckpt --against-dtype float32 --json out.json
  surge eval --model ./ckpt --text my.txt --no-prompts --max-tokens 16384
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from surge.eval.defaults import DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_TOKENS

    p = subparsers.add_parser(
        "eval", help="quality gate: perplexity, prompt-suite accuracy, agreement with a baseline",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--against", default=None, metavar="OTHER",
                   help="a baseline to evaluate too: prints both side by side, model/against "
                        "ratios and their agreement")
    p.add_argument("--against-dtype", default=None, choices=DTYPES,
                   help="dtype of the baseline (default: --dtype)")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="weight-only quantization of the model (default none)")
    p.add_argument("--against-quantization", default="none", choices=QUANTIZATIONS,
                   help="weight-only quantization of the baseline (default none)")
    p.add_argument("--quantization-group-size", type=int, default=32, choices=INT4_GROUP_SIZES,
                   help="int4 group size, for both models (default 32)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV-cache storage of the model, for generation and perplexity "
                        "(default auto: the model dtype)")
    p.add_argument("--against-kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV-cache storage of the baseline (default auto)")
    p.add_argument("--compile-max-batch", type=int, default=0, metavar="N",
                   help="compile the model's decode steps of up to N sequences, as surge serve "
                        "--compile-max-batch does (the baseline stays eager; default 0: off)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text for perplexity (default: the held-out split of Python's "
                        "reference documentation, pydoc_data.topics)")
    p.add_argument("--prompts", dest="prompt_file", default=None, metavar="FILE",
                   help='JSONL prompt suite: {"prompt", "expected", "match": "exact"|"contains", '
                        '"chat": true|false} per line (default: the built-in suite)')
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens of text for perplexity (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH,
                   help="window of the strided perplexity, capped by the model's context "
                        f"(default {DEFAULT_CONTEXT_LENGTH})")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: half the window)")
    p.add_argument("--no-perplexity", dest="perplexity", action="store_false")
    p.add_argument("--no-prompts", dest="prompts", action="store_false")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from surge.eval.models import ModelSpec
    from surge.eval.runner import EvalOptions, evaluate

    options = EvalOptions(perplexity=args.perplexity, prompts=args.prompts, text=args.text,
                          prompt_file=args.prompt_file, max_tokens=args.max_tokens,
                          context_length=args.context_length, stride=args.stride,
                          progress=args.progress)
    model = ModelSpec(args.model, args.dtype, args.device,
                      _quantization(args.quantization, args.quantization_group_size),
                      args.kv_cache_dtype, args.compile_max_batch)
    against = (ModelSpec(args.against, args.against_dtype or args.dtype, args.device,
                         _quantization(args.against_quantization, args.quantization_group_size),
                         args.against_kv_cache_dtype)
               if args.against else None)
    report = evaluate(model, against, options)
    print(report.table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _quantization(method: str, group_size: int) -> dict[str, object]:
    """ModelSpec options for one model: nothing when unquantized, so reports stay as before."""
    if method == "none":
        return {}
    return {"quantization": method, "quantization_group_size": group_size}
