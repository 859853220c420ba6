"""`surge optimize {quantize,prune,distill}`: the argument parsers (torch-free, so that
`surge --help` stays fast); each command imports its heavy modules when it runs."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

__all__ = ["add_parser"]

EXAMPLES = """examples:
  surge optimize quantize --model smollm2-135m-instruct --method int8 --out ./smol-int8
  surge optimize quantize --model ./ckpt --method int4 --group-size 64 --out ./ckpt-int4
  surge optimize prune --model ./ckpt --method wanda --sparsity 0.5 --out ./ckpt-wanda50
  surge optimize prune --model ./ckpt --method structured --sparsity 0.25 --out ./ckpt-s25 \\
      --gate "ppl_ratio<=1.5,agreement>=0.6"
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "optimize", help="quantize, prune or distill a model, then gate it against the original",
        description=importlib.import_module("surge.optimize").__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(title="optimize commands", metavar="COMMAND")
    _add_quantize(commands)
    _add_prune(commands)
    _add_distill(commands)
    p.set_defaults(handler=lambda _args: _print_help(p))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_quantize(commands: argparse._SubParsersAction) -> None:
    from surge.config import INT4_GROUP_SIZES
    from surge.optimize.gate import add_gate_args

    p = commands.add_parser(
        "quantize", help="write a weight-only int8/int4 checkpoint that `surge serve` loads as is")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, .gguf file or catalogue name")
    p.add_argument("--method", required=True, choices=("int8", "int4"))
    p.add_argument("--group-size", type=int, default=32, choices=INT4_GROUP_SIZES,
                   help="int4 inputs per scale and zero point (default 32; ignored by int8)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="serving dtype the scales are rounded to (default bfloat16)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    add_gate_args(p)
    p.set_defaults(handler=_run("surge.optimize.quantize", "run_quantize"))


def _add_prune(commands: argparse._SubParsersAction) -> None:
    from surge.optimize.gate import add_gate_args

    p = commands.add_parser(
        "prune", help="sparsity masks (magnitude, Wanda; unstructured or 2:4) or structured "
                      "pruning of attention heads and MLP channels (a smaller dense model)")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, .gguf file or catalogue name")
    p.add_argument("--method", default="structured", choices=("structured", "wanda", "magnitude"),
                   help="structured: remove heads and MLP channels (smaller, faster); wanda / "
                        "magnitude: zero weights (same size and speed: masks alone do not speed "
                        "up dense kernels) (default structured)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction removed, in [0, 1): of each row's weights (masks), or of "
                        "MLP channels and attention heads (structured) (default 0.25; 0.5 "
                        "with --pattern 2:4)")
    p.add_argument("--pattern", default="unstructured", choices=("unstructured", "2:4"),
                   help="mask pattern for wanda/magnitude; 2:4 keeps 2 of every 4 inputs "
                        "(sparsity 0.5) (default unstructured)")
    p.add_argument("--head-sparsity", type=float, default=None,
                   help="structured: fraction of attention heads removed (default --sparsity)")
    p.add_argument("--head-unit", default="head", choices=("head", "kv-group"),
                   help="structured: remove the same number of query heads from every KV group "
                        "(head), or whole KV groups with their query heads (default head)")
    p.add_argument("--channel-multiple", type=int, default=32,
                   help="structured: keep a multiple of this many MLP channels (int4 groups "
                        "need 32) (default 32)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="UTF-8 text for activation statistics (default: the training split of "
                        "the built-in corpus, disjoint from the evaluation text)")
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="tokens of calibration text (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the written weights (default bfloat16)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    add_gate_args(p)
    p.set_defaults(handler=_run("surge.optimize.prune", "run_prune"))


def _add_distill(commands: argparse._SubParsersAction) -> None:
    """`distill` comes from its own module (surge.optimize.distill_cli: torch-free, with
    ``add_arguments(parser)`` and ``run(args) -> int``); absent, the command is not offered."""
    try:
        distill = importlib.import_module("surge.optimize.distill_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "surge.optimize.distill_cli":
            raise
        return
    p = commands.add_parser(
        "distill", help="train a smaller student on the teacher's outputs (DDP with --nproc)")
    distill.add_arguments(p)
    p.set_defaults(handler=distill.run)


def _run(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), function)(args))

    return handler
