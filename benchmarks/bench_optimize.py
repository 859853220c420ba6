"""The README's `surge optimize` worked result: SmolLM2-135M-Instruct as bf16 (the catalogue's
GGUF served in bfloat16: the original), int8, int4, structured-pruned by about 25%, and a
distilled student of half the layers, each measured against the original in one run.

    python benchmarks/bench_optimize.py --out results/optimize                 # full run
    python benchmarks/bench_optimize.py --out /tmp/opt --quick --variants int8,int4,structured
    python benchmarks/bench_optimize.py --out results/optimize --distill-minutes 20
    python benchmarks/bench_optimize.py --out results/optimize --distilled DIR  # trained before

Each variant is written by the same code as its command (`surge optimize quantize --method
int8|int4`, `surge optimize prune --method structured --sparsity 0.25`; the student by
benchmarks/distill_student.py, i.e. `surge optimize distill --student layers=15`) and then
compared with the original by the commands' own gate (`surge.optimize.report.compare`):
perplexity on the held-out split of the built-in corpus, prompt-suite and next-token agreement,
size on disk, parameters, resident weights, W4 (single stream) and W1 (16-request burst)
tokens/s. Speed ratios come from the original measured in the same comparison, so a busy
machine skews both sides alike; absolute tok/s still need a quiet machine (`uptime` load
below the core count). Prints one table (and its Markdown for the README), writes
``OUT/bench_optimize.json`` and the quality-vs-speed plot ``OUT/pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from surge.optimize.export import open_source, prepare_out
from surge.optimize.gate import GateSettings
from surge.optimize.prune import plan_prune, prune_checkpoint
from surge.optimize.quantize import quantize_checkpoint
from surge.optimize.report import Comparison, compare, format_table, plot_variants

VARIANTS = ("int8", "int4", "structured", "distilled")
DISTILL_SCRIPT = Path(__file__).with_name("distill_student.py")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="the original (default: the catalogue's SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="work directory (variants, JSON, PNG)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default all; "
                        "distilled only with --distilled or --distill-minutes)")
    p.add_argument("--sparsity", type=float, default=0.25, help="structured (default 0.25)")
    p.add_argument("--group-size", type=int, default=32, help="int4 (default 32)")
    p.add_argument("--distilled", default=None, metavar="DIR",
                   help="an already-trained student directory to include")
    p.add_argument("--distill-minutes", type=float, default=None,
                   help="train the student first with benchmarks/distill_student.py")
    p.add_argument("--quick", action="store_true",
                   help="short evaluation and decode (a smoke run: numbers are rough)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}: allowed are {', '.join(VARIANTS)}")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    source = open_source(args.model)
    settings = GateSettings(quick=args.quick, progress=False)
    comparisons: list[Comparison] = []
    for variant in variants:
        directory = build_variant(variant, source, work, args)
        if directory is None:
            print(f"-- {variant}: skipped (give --distilled DIR or --distill-minutes M)")
            continue
        print(f"-- {variant}: evaluating against the original", flush=True)
        start = time.perf_counter()
        comparison = compare(str(source.path), str(directory), settings, variant)
        print(f"   ({time.perf_counter() - start:.0f} s)\n{comparison.table()}", flush=True)
        comparisons.append(comparison)
    if comparisons:
        report(comparisons, work, args)
    return 0


def build_variant(variant: str, source: Any, work: Path, args: argparse.Namespace
                  ) -> Path | None:
    """The variant's directory, written now (or reused when a previous run completed it)."""
    if variant == "distilled":
        return distilled(work, args)
    directory = work / variant
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        print(f"-- {variant}: reusing {directory}")
        return directory
    if directory.exists():
        for leftover in directory.iterdir():  # an interrupted write
            leftover.unlink()
    prepare_out(directory, source.path)
    start = time.perf_counter()
    if variant in ("int8", "int4"):
        quantize_checkpoint(source, directory, variant, args.group_size)
    else:
        prune_checkpoint(source, directory, plan_prune("structured", args.sparsity), _text(),
                         progress=False)
    print(f"-- {variant}: written in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


def _text() -> str:
    from surge.optimize.calibration import calibration_text

    return calibration_text(None)


def distilled(work: Path, args: argparse.Namespace) -> Path | None:
    if args.distilled:
        return Path(args.distilled)
    if args.distill_minutes is None:
        return None
    directory = work / "distilled"
    if (directory / "model.safetensors").is_file():
        return directory
    command = [sys.executable, str(DISTILL_SCRIPT), "--out", str(directory),
               "--teacher", args.model, "--train-minutes", str(args.distill_minutes)]
    command += ["--quick"] if args.quick else []
    print("-- distilled: " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return directory


def report(comparisons: list[Comparison], work: Path, args: argparse.Namespace) -> None:
    original = comparisons[0].original
    rows = [original, *(c.result for c in comparisons)]
    print("\n== surge optimize on", original.model, "(ratios: against the first "
          "comparison's original)")
    print(format_table(rows, original))
    print("\nREADME table (ratios: against the original measured in the same comparison)\n"
          + markdown(comparisons))
    data = {"model": original.model, "quick": args.quick,
            "comparisons": [c.to_dict() for c in comparisons]}
    (work / "bench_optimize.json").write_text(json.dumps(data, indent=2) + "\n")
    plot_variants([c.to_dict()["original"] for c in comparisons[:1]]
                  + [c.to_dict()["result"] for c in comparisons], work / "pareto.png")
    print(f"\nwrote {work / 'bench_optimize.json'} and {work / 'pareto.png'}")


_MARKDOWN = (("size_mb", "size MiB", ".1f"), ("params_m", "params M", ".1f"),
             ("resident_mb", "resident MiB", ".1f"), ("w4_tok_s", "W4 tok/s", ".1f"),
             ("w1_tok_s", "W1 tok/s", ".1f"), ("ppl", "perplexity", ".2f"),
             ("agreement", "next-token agreement", ".3f"),
             ("identical_answers", "same answers", ".2f"))


def markdown(comparisons: list[Comparison]) -> str:
    """The README table: each cell ``value (ratio)``."""
    header = "| variant | " + " | ".join(title for _, title, _ in _MARKDOWN) + " |"
    lines = [header, "|" + "---|" * (len(_MARKDOWN) + 1)]
    original = comparisons[0].original
    lines.append("| bf16 (original) | " + " | ".join(
        _cell(getattr(original, name), None, spec) for name, _, spec in _MARKDOWN) + " |")
    for comparison in comparisons:
        ratios = comparison.ratios()
        lines.append(f"| {comparison.result.label} | " + " | ".join(
            _cell(getattr(comparison.result, name), ratios.get(name), spec)
            for name, _, spec in _MARKDOWN) + " |")
    return "\n".join(lines)


def _cell(value: float | None, ratio: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) + (f" ({ratio:.2f}x)" if ratio is not None else "")


if __name__ == "__main__":
    sys.exit(main())
