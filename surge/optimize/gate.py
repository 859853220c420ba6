"""The quality gate every `surge optimize` command ends with.

``--gate "ppl_ratio<=1.10,agreement>=0.8"`` is a comma-separated list of bounds
``METRIC OP NUMBER`` (OP one of ``<= >= < >``) over the metrics of `surge.optimize.report`
(``GATE_METRICS``: each measurement of the result, and its ratio to the original as
``NAME_ratio``). It is parsed before any work starts, so a typo fails in a second, not after
an hour of training; after the work, `run_gate` evaluates the result against the original,
prints the table, draws the variants' PNG and returns 1 when a bound fails (0 otherwise), so
a deployment pipeline can stop there.
"""

from __future__ import annotations

import argparse
import operator
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GATE_METRICS", "Bound", "GateSettings", "add_gate_args", "check_bounds",
           "parse_gate", "run_gate", "settings_from_args"]

# The measurements a bound can name (each also as NAME_ratio: result / original).
BASE_METRICS = ("size_mb", "params_m", "resident_mb", "w4_tok_s", "w1_tok_s", "ppl",
                "agreement", "text_agreement", "identical_answers", "accuracy")
GATE_METRICS = (*BASE_METRICS, *(f"{name}_ratio" for name in BASE_METRICS))
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_BOUND = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str
    value: float

    def holds(self, measured: float | None) -> bool:
        return measured is not None and _OPS[self.op](measured, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_gate(spec: str | None) -> list[Bound]:
    """``"ppl_ratio<=1.10,agreement>=0.8"`` -> bounds; ValueError naming what is allowed."""
    if spec is None or not spec.strip():
        return []
    bounds = []
    for part in spec.split(","):
        match = _BOUND.match(part)
        if match is None:
            raise ValueError(f"--gate bound {part.strip()!r} is invalid: allowed is METRIC OP "
                             "NUMBER with OP one of <= >= < >, e.g. "
                             "\"ppl_ratio<=1.10,agreement>=0.8\"")
        metric, op, number = match.groups()
        if metric not in GATE_METRICS:
            raise ValueError(f"--gate metric {metric!r} is unknown: allowed are "
                             f"{', '.join(GATE_METRICS)}")
        try:
            bounds.append(Bound(metric, op, float(number)))
        except ValueError:
            raise ValueError(f"--gate bound {part.strip()!r}: {number!r} is not a number"
                             ) from None
    return bounds


def check_bounds(bounds: list[Bound], metrics: dict[str, float | None]) -> list[str]:
    """A line per failed bound (a metric that was not measured fails too)."""
    failures = []
    for bound in bounds:
        measured = metrics.get(bound.metric)
        if not bound.holds(measured):
            shown = "not measured" if measured is None else f"{measured:.4g}"
            failures.append(f"{bound}: measured {shown}")
    return failures


@dataclass(frozen=True)
class GateSettings:
    """What the end-of-command evaluation measures and where it writes (see add_gate_args)."""

    bounds: list[Bound] = field(default_factory=list)
    quick: bool = False
    evaluate: bool = True
    speed: bool = True
    dtype: str = "bfloat16"  # the dtype both models are evaluated in
    device: str = "cpu"
    text: str | None = None  # held-out text for perplexity (None: the built-in test split)
    plot: str | None = None  # PNG path (None: OUT/variants.png)
    history: str | None = None  # JSONL of variants (None: OUT's parent/optimize-variants.jsonl)
    progress: bool = True


def add_gate_args(parser: argparse.ArgumentParser) -> None:
    """The gate's flags, shared by every optimize command (distill adds them too)."""
    g = parser.add_argument_group("quality gate")
    g.add_argument("--gate", default=None, metavar="BOUNDS",
                   help="comma-separated bounds that must hold, else exit 1, e.g. "
                        "\"ppl_ratio<=1.10,agreement>=0.8\"; metrics: " + ", ".join(BASE_METRICS)
                        + " (each also NAME_ratio: result / original)")
    g.add_argument("--quick", action="store_true",
                   help="a short evaluation (fewer tokens of text, prompts and decode steps)")
    g.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="write the result without evaluating it (no table, no gate)")
    g.add_argument("--no-speed", dest="speed", action="store_false",
                   help="skip the W4/W1 speed measurement")
    g.add_argument("--eval-text", default=None, metavar="FILE",
                   help="held-out text for perplexity (default: the built-in test split)")
    g.add_argument("--eval-device", default="cpu", help="device of the evaluation (default cpu)")
    g.add_argument("--plot", default=None, metavar="PNG",
                   help="quality-vs-speed plot of every variant (default OUT/variants.png)")
    g.add_argument("--history", default=None, metavar="JSONL",
                   help="variants tried, one JSON line each, read and appended for the plot "
                        "(default: optimize-variants.jsonl beside OUT)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def settings_from_args(args: argparse.Namespace, dtype: str = "bfloat16") -> GateSettings:
    """Call before any work: a bad --gate or --eval-text fails here."""
    bounds = parse_gate(args.gate)
    if bounds and not args.evaluate:
        raise ValueError("--gate needs the evaluation: drop --no-eval")
    if args.eval_text is not None and not Path(args.eval_text).is_file():
        raise FileNotFoundError(f"--eval-text {args.eval_text!r} not found: give a UTF-8 "
                                "text file, or leave it out for the built-in corpus")
    return GateSettings(bounds=bounds, quick=args.quick, evaluate=args.evaluate,
                        speed=args.speed, dtype=dtype, device=args.eval_device,
                        text=args.eval_text, plot=args.plot, history=args.history,
                        progress=args.progress)


def run_gate(original: str, result: str | Path, settings: GateSettings, label: str,
             notes: list[str] | None = None) -> int:
    """Evaluate ``result`` against ``original``, print the table, record the variant, draw
    the plot; 1 when a bound fails, else 0. ``label`` names the variant ("int8", ...);
    ``notes`` are printed under the table and kept in the report."""
    if not settings.evaluate:
        return 0
    from surge.optimize.report import compare, plot_variants, record_variant

    comparison = compare(original, str(result), settings, label)
    comparison.notes.extend(notes or [])
    print(comparison.table())
    out = Path(result)
    comparison.write_json(out / "optimize_report.json")
    history = Path(settings.history) if settings.history else out.parent / "optimize-variants.jsonl"
    variants = record_variant(history, comparison)
    plot = Path(settings.plot) if settings.plot else out / "variants.png"
    plot_variants(variants, plot)
    print(f"report: {out / 'optimize_report.json'}; plot of {len(variants)} variant(s): {plot}")
    failures = check_bounds(settings.bounds, comparison.gate_metrics())
    if failures:
        print("gate FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if settings.bounds:
        print(f"gate passed: {', '.join(map(str, settings.bounds))}")
    return 0
