"""What `surge eval` found: one JSON-ready report, and the table printed from it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surge.eval.agreement import PromptAgreement
from surge.eval.perplexity import NextTokenAgreement, PerplexityResult
from surge.eval.prompts import SuiteResult

__all__ = ["EvalReport", "ModelResult"]


@dataclass
class ModelResult:
    model: dict[str, Any]  # what was loaded: path, dtype, device, options
    perplexity: PerplexityResult | None = None
    prompts: SuiteResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model,
                "perplexity": self.perplexity.to_dict() if self.perplexity else None,
                "prompts": self.prompts.to_dict() if self.prompts else None}


@dataclass
class EvalReport:
    """The model's results; with ``against``, the baseline's, their ratios and agreement."""

    model: ModelResult
    against: ModelResult | None = None
    text_agreement: NextTokenAgreement | None = None
    prompt_agreement: PromptAgreement | None = None
    ratios: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.against is not None and not self.ratios:
            self.ratios = _ratios(self.model, self.against)

    def to_dict(self) -> dict[str, Any]:
        agreement = None
        if self.against is not None:
            agreement = {
                "text": self.text_agreement.to_dict() if self.text_agreement else None,
                "prompts": self.prompt_agreement.to_dict() if self.prompt_agreement else None}
        return {"model": self.model.to_dict(),
                "against": self.against.to_dict() if self.against else None,
                "ratios": self.ratios or None, "agreement": agreement}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        rows = [_metric_rows(self.model)]
        if self.against is not None:
            rows.append(_metric_rows(self.against))
        header = ["metric", "model"] + (["against", "ratio"] if self.against else [])
        lines = [_describe("model", self.model)]
        if self.against is not None:
            lines.append(_describe("against", self.against))
        lines += _grid(header, _side_by_side(rows, self.ratios))
        lines += _agreement_lines(self.text_agreement, self.prompt_agreement)
        return "\n".join(lines)


# Ratio keys, with how to read each metric from one ModelResult.
_METRICS: dict[str, tuple[str, Any]] = {
    "perplexity": ("perplexity", lambda r: r.perplexity and r.perplexity.perplexity),
    "mean_nll": ("mean NLL (nats/token)", lambda r: r.perplexity and r.perplexity.mean_nll),
    "next_token_accuracy": ("next-token accuracy",
                            lambda r: r.perplexity and r.perplexity.next_token_accuracy),
    "perplexity_seconds": ("perplexity time (s)",
                           lambda r: r.perplexity and r.perplexity.seconds),
    "prompt_accuracy": ("prompt accuracy", lambda r: r.prompts and r.prompts.accuracy),
    "prompt_seconds": ("prompt-suite time (s)", lambda r: r.prompts and r.prompts.seconds),
}


def _ratios(model: ModelResult, against: ModelResult) -> dict[str, float]:
    """model / against for every metric both have (NaN where the baseline's is 0)."""
    ratios = {}
    for key, (_, read) in _METRICS.items():
        ours, theirs = read(model), read(against)
        if ours is not None and theirs is not None:
            ratios[key] = ours / theirs if theirs else math.nan
    return ratios


def _metric_rows(result: ModelResult) -> dict[str, str]:
    values = {}
    for key, (_, read) in _METRICS.items():
        value = read(result)
        if value is not None:
            values[key] = _number(value)
    if result.prompts is not None:
        values["prompt_accuracy"] += (f" ({result.prompts.num_correct}/"
                                      f"{result.prompts.num_prompts})")
    return values


def _side_by_side(rows: list[dict[str, str]], ratios: dict[str, float]) -> list[list[str]]:
    table = []
    for key, (label, _) in _METRICS.items():
        if key not in rows[0]:
            continue
        line = [label] + [row.get(key, "-") for row in rows]
        if len(rows) == 2:
            line.append(_number(ratios[key]) if key in ratios else "-")
        table.append(line)
    return table


def _describe(role: str, result: ModelResult) -> str:
    model = result.model
    shown = {k: v for k, v in model.items()
             if k != "model" and not (k == "path" and v == model["model"])}
    settings = ", ".join(f"{k}={v}" for k, v in shown.items())
    sources = []
    if result.perplexity is not None:
        sources.append(f"text {result.perplexity.corpus}")
    if result.prompts is not None:
        sources.append(f"suite {result.prompts.suite}")
    return f"{role}: {model['model']} ({settings})" + (f"; {', '.join(sources)}" if sources
                                                      else "")


def _agreement_lines(text: NextTokenAgreement | None,
                     prompts: PromptAgreement | None) -> list[str]:
    if text is None and prompts is None:
        return []
    lines = ["", "agreement of model with against (against is the reference):"]
    rows = []
    if prompts is not None:
        rows += [["identical greedy answers", _number(prompts.identical_answers)],
                 ["greedy token match", _number(prompts.greedy_token_match)],
                 ["next-token top-1 match (prompts)", _number(prompts.next_token.top1_match)],
                 ["mean KL, nats (prompts)", _number(prompts.next_token.mean_kl)]]
    if text is not None:
        rows += [["next-token top-1 match (text)", _number(text.top1_match)],
                 ["mean KL, nats (text)", _number(text.mean_kl)]]
    return lines + _grid(["metric", "value"], rows)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    def fmt(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if value == 0 or 0.001 <= abs(value) < 100_000:
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return f"{value:.3g}"
