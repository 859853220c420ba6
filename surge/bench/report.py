"""Showing results: the summary table, the JSON file, PNG plots, and side-by-side comparison.

Everything here reads the JSON-ready result document (what ``run_benchmark`` returns and what
``--output`` writes), so a saved file can be re-plotted or compared without re-running.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

__all__ = [
    "format_comparison",
    "format_results",
    "read_json",
    "write_json",
    "write_plots",
]

Doc = dict[str, Any]
_LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}


def write_json(doc: Doc, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.encode(doc))
    return path


def read_json(path: str | Path) -> Doc:
    doc = msgspec.json.decode(Path(path).read_bytes())
    if not isinstance(doc, dict) or not str(doc.get("format", "")).startswith("surge-bench/"):
        raise ValueError(f"{path} is not a `surge bench` results file (written with --output)")
    return doc


# ---------------------------------------------------------------------------- tables


def format_results(doc: Doc) -> str:
    """One detailed block per run, then a one-line-per-run table for a sweep."""
    blocks = [_format_run(doc, run) for run in doc["runs"]]
    if len(doc["runs"]) > 1:
        blocks.append(_format_sweep(doc))
    return "\n\n".join(blocks)


def _format_run(doc: Doc, run: Doc) -> str:
    s = run["summary"]
    config = doc["config"]
    lines = [_rule(f" {config['endpoint']} · {config['model']} · {run['load']['label']} ")]
    lines += _pairs([
        ("Requests", f"{s['completed']} completed, {s['failed']} failed "
                     f"in {s['duration_s']:.2f} s"),
        ("Request throughput", f"{s['request_throughput']:.2f} req/s"),
        ("Input token throughput", f"{s['input_token_throughput']:.1f} tok/s"),
        ("Output token throughput", f"{s['output_token_throughput']:.1f} tok/s"),
        *_goodput_line(s),
        ("Output tokens counted by", _sources(s["token_source"])),
    ])
    lines += ["", _latency_table(s["latency"])]
    lines += _error_lines(s["errors"])
    lines += [_generator_line(run["generator"])]
    lines += [f"WARNING: {w}" for w in run["warnings"]]
    return "\n".join(lines)


def _rule(title: str, width: int = 72) -> str:
    return title.center(width, "=")


def _pairs(pairs: Sequence[tuple[str, str]]) -> list[str]:
    return [f"{name:<28}{value}" for name, value in pairs]


def _goodput_line(s: Doc) -> list[tuple[str, str]]:
    goodput = s.get("goodput")
    if not goodput:
        return []
    slo = ", ".join(f"{k}<={_duration(v)}" for k, v in goodput["slo"].items())
    return [("Goodput", f"{goodput['requests_per_s']:.2f} req/s "
                        f"({goodput['fraction']:.1%} of requests meet {slo})")]


def _sources(sources: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n})" for name, n in sources.items()) or "-"


def _duration(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1e3:g}ms"


def _latency_table(latency: Doc) -> str:
    columns = ["mean", "p50", "p90", "p99", "max"]
    header = f"{'latency (ms)':<14}" + "".join(f"{c:>10}" for c in columns) + f"{'count':>10}"
    rows = [header]
    for key, name in _LATENCY_NAMES.items():
        stats = latency[key]
        if stats["count"]:
            cells = "".join(f"{stats[c] * 1e3:>10.2f}" for c in columns)
            rows.append(f"{name:<14}{cells}{stats['count']:>10}")
    return "\n".join(rows)


def _error_lines(errors: Doc) -> list[str]:
    if not errors["by_type"]:
        return []
    by_type = ", ".join(f"{k} x{n}" for k, n in errors["by_type"].items())
    by_status = ", ".join(f"{k} x{n}" for k, n in errors["by_status"].items())
    lines = ["", f"Errors by type: {by_type}", f"Errors by status: {by_status}"]
    lines += [f"  {kind}: {message}" for kind, message in errors["examples"].items()]
    return lines


def _generator_line(generator: Doc) -> str:
    lateness = generator["event_loop_lateness_s"]["p99"]
    late = f", event loop late by {lateness * 1e3:.2f} ms (p99)" if lateness is not None else ""
    lag = generator.get("schedule_lag_s")
    sent = f", sent {lag['p99'] * 1e3:.2f} ms after schedule (p99)" if lag and lag["count"] else ""
    return f"\nGenerator: {generator['cpu_utilization']:.0%} of one core{late}{sent}"


def _format_sweep(doc: Doc) -> str:
    header = (f"{'load':<34}{'req/s':>8}{'tok/s':>9}{'good/s':>8}"
              f"{'TTFT p50/p99':>16}{'TPOT p50/p99':>16}{'E2E p50/p99':>18}{'err':>6}")
    rows = [_rule(" sweep (latencies in ms) ", len(header)), header]
    for run in doc["runs"]:
        s = run["summary"]
        goodput = s["goodput"]["requests_per_s"] if s.get("goodput") else math.nan
        rows.append(
            f"{run['load']['label']:<34.34}{s['request_throughput']:>8.2f}"
            f"{s['output_token_throughput']:>9.1f}{goodput:>8.2f}"
            f"{_p50_p99(s, 'ttft'):>16}{_p50_p99(s, 'tpot'):>16}{_p50_p99(s, 'e2e'):>18}"
            f"{s['failed']:>6}")
    return "\n".join(rows)


def _p50_p99(summary: Doc, key: str) -> str:
    stats = summary["latency"][key]
    if not stats["count"]:
        return "-"
    return f"{stats['p50'] * 1e3:.1f}/{stats['p99'] * 1e3:.1f}"


# ---------------------------------------------------------------------------- compare

# (label, path into a run's summary, scale, decimals, higher is better)
_COMPARED: list[tuple[str, tuple[str, ...], float, int, bool]] = [
    ("request throughput (req/s)", ("request_throughput",), 1, 2, True),
    ("output throughput (tok/s)", ("output_token_throughput",), 1, 1, True),
    ("input throughput (tok/s)", ("input_token_throughput",), 1, 1, True),
    ("goodput (req/s)", ("goodput", "requests_per_s"), 1, 2, True),
    *[(f"{name} {stat} (ms)", ("latency", key, stat), 1e3, 2, False)
      for key, name in _LATENCY_NAMES.items() for stat in ("mean", "p50", "p99")],
    ("failed requests", ("failed",), 1, 0, False),
]


def format_comparison(a: Doc, b: Doc, name_a: str = "A", name_b: str = "B") -> str:
    """Each metric of A and B side by side with the ratio B/A, run by run."""
    blocks = [f"A = {name_a} ({_describe(a)})\nB = {name_b} ({_describe(b)})"]
    runs_a, runs_b = a["runs"], b["runs"]
    if len(runs_a) != len(runs_b):
        blocks.append(f"note: A has {len(runs_a)} runs and B {len(runs_b)}; "
                      f"comparing the first {min(len(runs_a), len(runs_b))} in order")
    for run_a, run_b in zip(runs_a, runs_b, strict=False):
        blocks.append(_compare_runs(run_a, run_b))
    return "\n\n".join(blocks)


def _describe(doc: Doc) -> str:
    config = doc["config"]
    return f"{config['endpoint']} · {config['model']} · {config['url']} · {doc['created']}"


def _compare_runs(run_a: Doc, run_b: Doc) -> str:
    title = run_a["load"]["label"]
    if run_b["load"]["label"] != title:
        title += f" vs {run_b['load']['label']}"
    rows = [_rule(f" {title} "),
            f"{'metric':<30}{'A':>12}{'B':>12}{'B/A':>9}  better"]
    for label, path, scale, decimals, higher_better in _COMPARED:
        value_a, value_b = _dig(run_a["summary"], path), _dig(run_b["summary"], path)
        if value_a is None and value_b is None:
            continue
        cell_a, cell_b = _num(value_a, scale, decimals), _num(value_b, scale, decimals)
        rows.append(f"{label:<30}{cell_a:>12}{cell_b:>12}"
                    f"{_ratio(value_a, value_b):>9}  {_better(value_a, value_b, higher_better)}")
    return "\n".join(rows)


def _dig(summary: Doc, path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) else None


def _num(value: float | None, scale: float, decimals: int) -> str:
    return "-" if value is None else f"{value * scale:.{decimals}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if a == 0:
        return "=" if b == 0 else "inf"
    return f"{b / a:.2f}x"


def _better(a: float | None, b: float | None, higher_better: bool) -> str:
    if a is None or b is None or math.isclose(a, b, rel_tol=0.01, abs_tol=1e-12):
        return ""
    return "B" if (b > a) == higher_better else "A"


# ---------------------------------------------------------------------------- plots


def write_plots(doc: Doc, out_dir: str | Path) -> list[Path]:
    """Latency CDFs, the per-second timeline, and (for a sweep) metrics against load."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_plot_cdfs(doc, out / "latency_cdf.png", plt),
             _plot_timeline(doc, out / "timeline.png", plt)]
    if len(doc["runs"]) > 1:
        paths.append(_plot_sweep(doc, out / "sweep.png", plt))
    return paths


def latency_samples(run: Doc) -> dict[str, list[float]]:
    """Per-metric samples (seconds) of a run's successful requests, from its records."""
    ok = [r for r in run["records"] if r["error_type"] is None]
    return {
        "ttft": [r["ttft"] for r in ok if r["ttft"] is not None],
        "tpot": [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1)
                 for r in ok if r["ttft"] is not None and r["output_tokens"] > 1],
        "itl": [gap for r in ok for gap in r["itl"]],
        "e2e": [r["e2e"] for r in ok],
    }


def _plot_cdfs(doc: Doc, path: Path, plt: Any) -> Path:
    samples = [(run["load"]["label"], latency_samples(run)) for run in doc["runs"]]
    metrics = [k for k in _LATENCY_NAMES if any(s[k] for _, s in samples)] or ["e2e"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for ax, key in zip(axes[0], metrics, strict=True):
        for label, run_samples in samples:
            values = sorted(v * 1e3 for v in run_samples[key])
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, fractions, where="post", label=label)
        ax.set(title=f"{_LATENCY_NAMES[key]} CDF", xlabel="ms", ylabel="fraction of requests",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    return _save(fig, path, plt, _title(doc, "latency"))


def _plot_timeline(doc: Doc, path: Path, plt: Any) -> Path:
    panels = [("completed", "completed req/s"), ("output_tokens", "output tok/s"),
              ("failed", "failed req/s")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 7), sharex=True)
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for run in doc["runs"]:
            line = run["timeline"]
            # One more edge, so that the last second is drawn as wide as the others.
            seconds = [*line["second"], len(line["second"])]
            ax.plot(seconds, [*line[key], line[key][-1]], drawstyle="steps-post",
                    label=run["load"]["label"])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since the run started")
    axes[0].legend(fontsize="small")
    return _save(fig, path, plt, _title(doc, "per-second timeline"))


def _plot_sweep(doc: Doc, path: Path, plt: Any) -> Path:
    runs = [r for r in doc["runs"] if r["load"]["value"] is not None]
    x = [r["load"]["value"] for r in runs]
    closed = bool(runs) and runs[0]["load"]["mode"] == "closed"
    xlabel = "concurrency" if closed else "request rate (req/s)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(x, [r["summary"]["request_throughput"] for r in runs], "o-", label="req/s")
    if runs and runs[0]["summary"].get("goodput"):
        left.plot(x, [r["summary"]["goodput"]["requests_per_s"] for r in runs], "s--",
                  label="goodput req/s")
    tokens = left.twinx()
    tokens.plot(x, [r["summary"]["output_token_throughput"] for r in runs], "^:", color="gray",
                label="output tok/s")
    tokens.set_ylabel("output tok/s")
    left.set(title="throughput", xlabel=xlabel, ylabel="req/s")
    left.legend(loc="upper left", fontsize="small")
    tokens.legend(loc="lower right", fontsize="small")
    for key in ("ttft", "tpot", "e2e"):
        for stat, style in (("p50", "o-"), ("p99", "x--")):
            values = [_stat_ms(r, key, stat) for r in runs]
            if any(v is not None for v in values):
                right.plot(x, [math.nan if v is None else v for v in values], style,
                           label=f"{_LATENCY_NAMES[key]} {stat}")
    right.set(title="latency", xlabel=xlabel, ylabel="ms")
    right.set_yscale("log")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path, plt, _title(doc, "sweep"))


def _stat_ms(run: Doc, key: str, stat: str) -> float | None:
    value = run["summary"]["latency"][key][stat]
    return None if value is None else value * 1e3


def _title(doc: Doc, what: str) -> str:
    config = doc["config"]
    return f"surge bench {what}: {config['endpoint']} · {config['model']} · {config['url']}"


def _save(fig: Any, path: Path, plt: Any, title: str) -> Path:
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
