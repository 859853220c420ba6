"""Weight-only quantization on the real SmolLM2-135M-Instruct: bf16 (the GGUF dequantized) vs
int8 vs int4, speed and quality in one run.

Per mode: W4 single stream (1 request, 128-token prompt, 256 output tokens) and W1 burst
(16 requests x 128 in, 64 out) in output tokens/s, W4's achieved GB/s (weights read once per
token plus the KV cache), resident weight bytes, and quality from `surge eval`'s API:
perplexity on the built-in held-out corpus and agreement with bf16 (next-token top-1 and KL,
greedy prompt-suite answers identical). Prints ratios to bf16; writes JSON and a PNG.

    python benchmarks/bench_quant.py                       # full run (about 10 minutes idle)
    python benchmarks/bench_quant.py --llama-cpp DIR       # with llama.cpp beside each mode
    python benchmarks/bench_quant.py --compile-max-batch 16  # + each mode compiled (+2.5 min)

With llama.cpp's tools (see benchmarks/llama_cpp_peer.py) each mode is also measured on
llama.cpp at the same precision (bf16 / BF16, int8 / Q8_0, int4 / Q4_1) with the same thread
count, in the same run, and the report gives Surge's ratio to it.
    python benchmarks/bench_quant.py --quick --threads 1 --out /tmp/bench_quant_smoke.json

Run it on a quiet machine (`uptime` load below the core count): timings of a loaded one say
little.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from llama_cpp_peer import PEER_TYPES, LlamaCpp, find_llama_cpp

from surge import LLM, SamplingParams
from surge.models.layers import RMSNorm
from surge.models.linear import Linear
from surge.models.loader import resident_weight_bytes

W1_REQUESTS, W1_PROMPT, W1_OUTPUT = 16, 128, 64
W4_PROMPT, W4_OUTPUT = 128, 256
# --quick: every code path once, in a minute or two; its numbers mean nothing.
QUICK = {"W1_REQUESTS": 4, "W1_PROMPT": 32, "W1_OUTPUT": 8, "W4_PROMPT": 32, "W4_OUTPUT": 16}
QUICK_EVAL_TOKENS, QUICK_PROMPTS = 256, 3
MODES = ("none", "int8", "int4")
LABELS = {"none": "bf16", "int8": "int8", "int4": "int4"}


def main() -> None:
    args = parse_args()
    if args.quick:
        globals().update(QUICK)
        args.rounds, args.eval_tokens = 1, QUICK_EVAL_TOKENS
    if args.threads:
        torch.set_num_threads(args.threads)  # the engine and surge eval run in this process
    model = args.model or str(default_model())
    rng = random.Random(args.seed)
    w1_prompts = [random_prompt(rng, W1_PROMPT) for _ in range(W1_REQUESTS)]
    w4_prompt = random_prompt(rng, W4_PROMPT)
    results: dict[str, dict[str, Any]] = {}
    peer = None if args.no_peer else find_llama_cpp(args.llama_cpp)
    if peer is None and not args.no_peer:
        print("llama.cpp not found (--llama-cpp DIR or $SURGE_LLAMA_CPP): no peer columns")
    for mode in args.modes:
        label = LABELS[mode] + (f"-g{args.group_size}" if mode == "int4" else "")
        print(f"-- {label}: speed", flush=True)
        results[label] = bench_speed(model, mode, args, w1_prompts, w4_prompt)
        if peer is not None and model.endswith(".gguf"):
            print(f"-- {label}: llama.cpp {PEER_TYPES[mode]}", flush=True)
            results[label] |= bench_peer(peer, Path(model), mode, args)
        if not args.no_eval:
            print(f"-- {label}: quality (surge eval)", flush=True)
            results[label] |= bench_quality(model, mode, args)
        if args.compile_max_batch:
            # Speed only: compiling changes decode steps, never the perplexity's prefill.
            print(f"-- {label}+compile: speed (--compile-max-batch "
                  f"{args.compile_max_batch})", flush=True)
            compiled = bench_speed(model, mode, args, w1_prompts, w4_prompt,
                                   args.compile_max_batch)
            peer_columns = {k: v for k, v in results[label].items() if k.startswith("peer_")}
            results[f"{label}+compile"] = compiled | peer_columns
    report(results, model, args, peer.version() if peer is not None else None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .gguf file or checkpoint directory "
                                        "(default: the smollm2-135m-instruct catalogue GGUF)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts")
    parser.add_argument("--eval-tokens", type=int, default=4096,
                        help="tokens of held-out text for perplexity")
    parser.add_argument("--no-eval", action="store_true", help="speed only")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads (default: torch's); on a loaded machine 1 avoids "
                             "threads waiting on each other")
    parser.add_argument("--quick", action="store_true",
                        help="tiny workloads, 1 round, 3 prompts: checks that it runs")
    parser.add_argument("--llama-cpp", default=None,
                        help="directory of llama.cpp's llama-bench, llama-batched-bench and "
                             "llama-quantize (default: $SURGE_LLAMA_CPP, else PATH)")
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    parser.add_argument("--compile-max-batch", type=int, default=0, metavar="N",
                        help="also measure each mode with decode steps of up to N sequences "
                             "compiled (surge serve --compile-max-batch N), as a +compile row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_quant.json")
    return parser.parse_args()


def bench_peer(peer: LlamaCpp, model: Path, mode: str, args: argparse.Namespace
               ) -> dict[str, Any]:
    """llama.cpp on the same GGUF at this mode's precision, same threads and workloads."""
    gguf = peer.gguf_of(model, PEER_TYPES[mode], Path(args.out).parent / "llama_cpp_models")
    threads = torch.get_num_threads()
    w4 = peer.single_stream(gguf, W4_PROMPT, W4_OUTPUT, threads, args.rounds)
    w1 = peer.burst(gguf, W1_REQUESTS, W1_PROMPT, W1_OUTPUT, threads, args.rounds)
    return {"peer_type": PEER_TYPES[mode], "peer_w4_tok_s": w4, "peer_w1_tok_s": w1}


def default_model() -> Path:
    from surge.hub import pull

    return pull("smollm2-135m-instruct", progress=False)


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(length)]  # past SmolLM2's special tokens


# -- speed -----------------------------------------------------------------------------------

def bench_speed(model: str, mode: str, args: argparse.Namespace, w1_prompts: list[list[int]],
                w4_prompt: list[int], compile_max_batch: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    # No prefix cache: every round prefills its prompts again.
    llm = LLM(model, dtype="bfloat16", quantization=mode,
              quantization_group_size=args.group_size, enable_prefix_caching=False,
              compile_max_batch=compile_max_batch)
    load_seconds = time.perf_counter() - start
    # Warm-up on other prompts of the same shapes (no prefix-cache hits on the timed runs).
    rng = random.Random(args.seed + 1)
    warmup = [random_prompt(rng, W1_PROMPT) for _ in range(W1_REQUESTS)]
    llm.generate(warmup, greedy(4), use_tqdm=False)
    w1 = best_rate(lambda: llm.generate(w1_prompts, greedy(W1_OUTPUT), use_tqdm=False),
                   W1_REQUESTS * W1_OUTPUT, args.rounds)
    w4 = best_rate(lambda: llm.generate([w4_prompt], greedy(W4_OUTPUT), use_tqdm=False),
                   W4_OUTPUT, args.rounds)
    loaded = llm.engine.core.loaded
    kv_per_token = loaded.config.kv_bytes_per_token(loaded.dtype.itemsize)
    # Each decode step reads every matrix once (the embedding only one row) and the
    # sequence's KV cache at its mean length.
    step_bytes = step_weight_bytes(loaded.model) + kv_per_token * (W4_PROMPT + W4_OUTPUT / 2)
    thresholds = sorted({m.kernel_threshold for m in loaded.model.modules()
                         if hasattr(m, "kernel_threshold")})
    return {"mode": mode, "w1_tok_s": w1, "w4_tok_s": w4, "w4_gb_s": step_bytes * w4 / 1e9,
            "step_weight_bytes": step_weight_bytes(loaded.model),
            "resident_weight_bytes": resident_weight_bytes(loaded.model),
            "load_seconds": load_seconds, "kernel_thresholds": thresholds}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def best_rate(run: Callable[[], object], num_tokens: int, rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = max(best, num_tokens / (time.perf_counter() - start))
    return best


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads from weights: every linear layer (packed or quantized) and
    norm; the token embedding contributes one row per token only."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            total += module.weight_bytes()
        elif isinstance(module, RMSNorm | torch.nn.LayerNorm):
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total


# -- quality ---------------------------------------------------------------------------------

def bench_quality(model: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from surge.eval import EvalOptions, ModelSpec, evaluate

    options = EvalOptions(max_tokens=args.eval_tokens, progress=False,
                          prompt_file=quick_suite() if args.quick else None)
    spec = ModelSpec(model, "bfloat16", "cpu", {"quantization": mode,
                                                "quantization_group_size": args.group_size})
    against = None if mode == "none" else ModelSpec(model, "bfloat16", "cpu")
    report = evaluate(spec, against, options).to_dict()
    ours = report["model"]
    quality: dict[str, Any] = {
        "perplexity": ours["perplexity"]["perplexity"] if ours["perplexity"] else None,
        "prompt_accuracy": ours["prompts"]["accuracy"] if ours["prompts"] else None}
    agreement = report.get("agreement") or {}
    if agreement.get("text"):
        quality["top1_match_vs_bf16"] = agreement["text"]["top1_match"]
        quality["kl_vs_bf16"] = agreement["text"]["mean_kl"]
    if agreement.get("prompts"):
        quality["identical_answers_vs_bf16"] = agreement["prompts"]["identical_answers"]
    return quality


def quick_suite() -> Path:
    """The first prompts of the built-in suite, as a file `surge eval` reads."""
    from importlib.resources import files

    lines = files("surge.eval").joinpath("default_prompts.jsonl").read_text().splitlines()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_quant_prompts.jsonl"
    cases = [line for line in lines if line.startswith("{")][:QUICK_PROMPTS]
    path.write_text("\n".join(cases) + "\n")
    return path


# -- report ----------------------------------------------------------------------------------

COLUMNS = (("w4_tok_s", "W4 tok/s", "{:.1f}"), ("peer_w4_tok_s", "llama.cpp W4", "{:.1f}"),
           ("w1_tok_s", "W1 tok/s", "{:.1f}"), ("peer_w1_tok_s", "llama.cpp W1", "{:.1f}"),
           ("w4_gb_s", "W4 GB/s", "{:.1f}"),
           ("resident_weight_bytes", "resident MB", "{:.0f}"),
           ("step_weight_bytes", "read/step MB", "{:.0f}"),
           ("perplexity", "perplexity", "{:.3f}"), ("prompt_accuracy", "prompt acc", "{:.2f}"),
           ("top1_match_vs_bf16", "top1=bf16", "{:.3f}"), ("kl_vs_bf16", "KL", "{:.4f}"),
           ("identical_answers_vs_bf16", "same answers", "{:.2f}"),
           ("load_seconds", "load s", "{:.0f}"))
MEGA = {"resident_weight_bytes", "step_weight_bytes"}


def report(results: dict[str, dict[str, Any]], model: str, args: argparse.Namespace,
           peer_version: str | None) -> None:
    load = os.getloadavg()[0]
    print(f"\nmodel {model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {load:.1f}, best of {args.rounds} rounds")
    print(f"{'mode':17s}" + "".join(f"{title:>14s}" for _, title, _ in COLUMNS))
    for label, row in results.items():
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            if value is not None and key in MEGA:
                value /= 1e6
            cells.append("-" if value is None else fmt.format(value))
        print(f"{label:17s}" + "".join(f"{cell:>14s}" for cell in cells))
    ratios = bf16_ratios(results)
    if ratios:
        print("\nratios to bf16:")
        for label, row in ratios.items():
            print(f"  {label}: " + ", ".join(f"{key} x{value:.3f}" for key, value in row.items()))
    peer = peer_ratios(results)
    if peer:
        print(f"\nratios to llama.cpp ({peer_version}), same precision, same run:")
        for label, row in peer.items():
            print(f"  {label} / {results[label]['peer_type']}: "
                  + ", ".join(f"{key} x{value:.3f}" for key, value in row.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "results": results, "ratios_to_bf16": ratios,
                               "ratios_to_llama_cpp": peer, "llama_cpp": peer_version,
                               "threads": torch.get_num_threads(), "load_average": load,
                               "rounds": args.rounds}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def bf16_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    base = results.get("bf16")
    if base is None:
        return {}
    keys = ("w4_tok_s", "w1_tok_s", "resident_weight_bytes", "step_weight_bytes", "perplexity")
    return {label: {key: row[key] / base[key] for key in keys
                    if row.get(key) and base.get(key)}
            for label, row in results.items() if label != "bf16"}


def peer_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {label: {key: row[key] / row[f"peer_{key}"] for key in ("w4_tok_s", "w1_tok_s")}
            for label, row in results.items() if row.get("peer_w4_tok_s")}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("w4_tok_s", "W4 single stream, tok/s"), ("w1_tok_s", "W1 burst, output tok/s"),
              ("resident_weight_bytes", "resident weights, MB"), ("perplexity", "perplexity"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.5))
    labels = list(results)
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [(results[n].get(key) or 0) / (1e6 if key in MEGA else 1) for n in labels]
        ax.barh(labels, values, color=["tab:gray" if n == "bf16" else "tab:blue"
                                       for n in labels])
        ax.set_title(title)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
