"""--kv-cache-dtype auto vs int8 vs fp8: W2 capacity from the engine's own block count, and
W4 single-stream / W1 burst speed, in one run on one model (BENCH.md's workloads).

Capacity: with the same ``--kv-cache-memory-bytes``, the engine plans its blocks for the
cache's element size; the tokens that fit, and how many W2 sequences (prompt up to 512 plus
output up to 256 tokens; mean 288 + 144) fit at once, follow from that count.
Speed rounds alternate the dtypes, so a machine's load drifting hits them alike; the best
round counts. Ratios are against auto (the model dtype) measured in the same run. On a busy
machine wall time swings several-fold between rounds; ``--threads 1`` with the CPU-time rates
(tokens per CPU second of this process) is the steadier comparison there.

    python benchmarks/bench_kv_cache.py                       # SmolLM2-135M, bf16
    python benchmarks/bench_kv_cache.py --rounds 1 --w4-tokens 64   # short (a busy machine)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from surge import LLM, SamplingParams

W1_REQUESTS, W1_PROMPT, W1_OUTPUT, W4_PROMPT = 16, 128, 64, 128
W2_MAX_SEQ, W2_MEAN_SEQ = 512 + 256, 288 + 144


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    w1 = [[rng.randrange(3, 40000) for _ in range(W1_PROMPT)] for _ in range(W1_REQUESTS)]
    w4 = [rng.randrange(3, 40000) for _ in range(W4_PROMPT)]
    engines = {kv: LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv, max_num_seqs=256,
                       kv_cache_memory_bytes=args.kv_bytes, max_model_len=1024)
               for kv in args.kv_dtypes}
    results: dict[str, dict[str, float]] = {}
    for kv, llm in engines.items():
        blocks = llm.engine.core.block_manager.num_blocks
        tokens = blocks * llm.engine.core.block_manager.block_size
        results[kv] = {"blocks": blocks, "tokens": tokens, "w2_seqs_worst": tokens // W2_MAX_SEQ,
                       "w2_seqs_mean": tokens // W2_MEAN_SEQ, "w4": 0.0, "w1": 0.0,
                       "w4_cpu": 0.0, "w1_cpu": 0.0}
    for _ in range(args.rounds):
        for kv, llm in engines.items():
            for name, prompts, n in (("w4", [w4], args.w4_tokens), ("w1", w1, W1_OUTPUT)):
                wall, cpu = run(llm, prompts, n)
                results[kv][name] = max(results[kv][name], wall)
                results[kv][f"{name}_cpu"] = max(results[kv][f"{name}_cpu"], cpu)
    base = results[args.kv_dtypes[0]]
    print(f"KV budget {args.kv_bytes / 2**20:.0f} MiB, model dtype {args.dtype}")
    print(f"{'kv dtype':9s} {'blocks':>7s} {'tokens':>8s} {'W2 seqs (768/432)':>18s} "
          f"{'W4 tok/s':>9s} {'W1 tok/s':>9s}  ratios vs {args.kv_dtypes[0]}")
    for kv, r in results.items():
        print(f"{kv:9s} {r['blocks']:7d} {r['tokens']:8d} "
              f"{r['w2_seqs_worst']:8d}/{r['w2_seqs_mean']:<9d} {r['w4']:9.1f} {r['w1']:9.1f}"
              f"  blocks x{r['blocks'] / base['blocks']:.2f}, W4 x{r['w4'] / base['w4']:.2f},"
              f" W1 x{r['w1'] / base['w1']:.2f}; per CPU-second: W4 {r['w4_cpu']:.1f}"
              f" (x{r['w4_cpu'] / base['w4_cpu']:.2f}), W1 {r['w1_cpu']:.1f}"
              f" (x{r['w1_cpu'] / base['w1_cpu']:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """Output tokens per wall second and per CPU second of one greedy burst."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / wall, tokens / cpu


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-dtypes", dest="kv_dtypes", nargs="+",
                        default=["auto", "int8", "fp8"])
    parser.add_argument("--kv-bytes", type=int, default=256 << 20,
                        help="--kv-cache-memory-bytes of every engine (default 256 MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--w4-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 on a busy machine)")
    parser.add_argument("--out", default="results/bench_kv_cache.json")
    return parser.parse_args()


if __name__ == "__main__":
    main()
