"""ResNet-50 shape: images/s of the classifier in fp32 and bf16, against this machine's limit.

The `resnet-50` preset (random weights, the real architecture) runs our ResNet on batches of
224x224 images at a few batch sizes, in float32 and bfloat16, in this process (the batcher's
worker thread calls exactly ``ImageClassifier.classify_batch``). The limit is compute: one
224px image costs 4.1 G multiply-adds, which we count as 8.2 GFLOP (2 FLOP per multiply-add);
BENCH.md measures about 160 GFLOP/s (fp32) and 400 GFLOP/s (bf16) of matmul on this machine.
Prints images/s, achieved GFLOP/s and the fraction of the limit, and the bf16/fp32 ratio.

    python benchmarks/bench_classify.py                    # about a minute on 2 cores
    python benchmarks/bench_classify.py --batch-sizes 1,8 --rounds 3

Writes results/bench_classify.json and results/bench_classify.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surge.models.pooling_models import ImageClassifier
from surge.testing.make_model import write_checkpoint

GFLOP_PER_IMAGE = 8.2  # 4.1 G multiply-adds x 2 (ResNet-50 at 224 px)
LIMIT_GFLOPS = {"float32": 160.0, "bfloat16": 400.0}  # BENCH.md, this machine's matmul peak


def main() -> None:
    args = parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    model_dir = args.model or write_checkpoint("resnet-50", Path(tempfile.mkdtemp()) / "r50")
    results: dict[str, Any] = {"batch_sizes": sizes, "load_average": os.getloadavg(),
                               "gflop_per_image": GFLOP_PER_IMAGE, "runs": {}}
    for dtype in ("float32", "bfloat16"):
        model = ImageClassifier(model_dir, getattr(torch, dtype))
        results["runs"][dtype] = {str(b): measure(model, b, args.rounds) for b in sizes}
    report(results)
    save(results, Path(args.out))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="resnet checkpoint (default: preset)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per batch size")
    parser.add_argument("--out", default="results/bench_classify")
    return parser.parse_args()


def measure(model: ImageClassifier, batch_size: int, rounds: int) -> dict[str, float]:
    pixels = [torch.randn(3, 224, 224) for _ in range(batch_size)]
    model.classify_batch(pixels)  # warm-up: oneDNN primitives for this shape
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        model.classify_batch(pixels)
        times.append(time.perf_counter() - started)
    best = min(times)  # the machine is shared: the least disturbed call
    images_per_s = batch_size / best
    return {"images_per_s": images_per_s, "median_s": float(np.median(times)), "best_s": best,
            "gflops": images_per_s * GFLOP_PER_IMAGE}


def report(results: dict[str, Any]) -> None:
    print(f"ResNet-50 shape, 224 px, {GFLOP_PER_IMAGE} GFLOP/image (multiply-adds x 2); "
          f"load average {' '.join(f'{v:.2f}' for v in results['load_average'])} (shared "
          "machine: numbers are noisy)")
    print(f"{'dtype':>9} {'batch':>6} {'images/s':>9} {'GFLOP/s':>8} {'of limit':>9}")
    for dtype, runs in results["runs"].items():
        for size, run in runs.items():
            fraction = run["gflops"] / LIMIT_GFLOPS[dtype]
            run["fraction_of_limit"] = fraction
            print(f"{dtype:>9} {size:>6} {run['images_per_s']:9.1f} {run['gflops']:8.1f} "
                  f"{fraction:9.0%}  (limit {LIMIT_GFLOPS[dtype]:g} GFLOP/s)")
    best = {d: max(r["images_per_s"] for r in runs.values())
            for d, runs in results["runs"].items()}
    results["bf16_over_fp32"] = best["bfloat16"] / best["float32"]
    print(f"best bf16 / best fp32 images/s: {results['bf16_over_fp32']:.2f}x")


def save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype, runs in results["runs"].items():
        sizes = [int(s) for s in runs]
        ax.plot(sizes, [r["images_per_s"] for r in runs.values()], marker="o", label=dtype)
        limit = LIMIT_GFLOPS[dtype] / GFLOP_PER_IMAGE
        ax.axhline(limit, linestyle="--", alpha=0.5, label=f"{dtype} compute limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title("ResNet-50 shape, 224 px")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
