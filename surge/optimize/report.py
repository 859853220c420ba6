"""What a variant costs and what it keeps: measurements, the comparison table, the plot.

One `Comparison` holds the result's and the original's `VariantMetrics`:

- ``size_mb``: bytes of weight files on disk (safetensors or the .gguf file), MiB;
- ``params_m``: logical parameters in millions (a quantized or masked weight counts as many
  parameters as its dense shape; a tied embedding once);
- ``resident_mb``: bytes of the loaded weights as served (packed/quantized buffers), MiB;
- ``w4_tok_s``: BENCH.md's W4, one stream (128 random prompt tokens) decoding, tokens/s;
- ``w1_tok_s``: BENCH.md's W1, a burst of 16 such requests, output tokens/s of the burst;
- ``ppl``: perplexity on held-out text (`surge eval`'s strided windows);
- ``agreement``: teacher-forced next-token top-1 agreement with the original on the prompt
  suite (each prompt followed by the original's greedy answer);
- ``text_agreement``: the same on the held-out text; ``identical_answers``: prompts whose
  greedy answers are the same tokens; ``accuracy``: the prompt suite's accuracy.

Speed is measured on the offline engine in this process, after the quality evaluation: on a
busy machine the numbers move, so compare ratios from one run (both models measured in it).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Comparison", "VariantMetrics", "compare", "plot_variants", "record_variant",
           "speed", "weight_stats", "weights_on_disk"]

W1_REQUESTS = 16
PROMPT_TOKENS = 128
# (W4 output tokens, W1 output tokens per request): BENCH.md's, and a short --quick version.
FULL_DECODE = (256, 64)
QUICK_DECODE = (32, 16)
QUICK_TEXT_TOKENS = 512
QUICK_PROMPTS = 6
MIB = 1 << 20


@dataclass
class VariantMetrics:
    label: str
    model: str
    size_mb: float | None = None
    params_m: float | None = None
    resident_mb: float | None = None
    w4_tok_s: float | None = None
    w1_tok_s: float | None = None
    ppl: float | None = None
    accuracy: float | None = None
    agreement: float | None = None  # with the original (1.0 for the original itself)
    text_agreement: float | None = None
    identical_answers: float | None = None

    def values(self) -> dict[str, float | None]:
        return {k: v for k, v in asdict(self).items() if k not in ("label", "model")}


@dataclass
class Comparison:
    result: VariantMetrics
    original: VariantMetrics
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        ours, theirs = self.result.values(), self.original.values()
        return {name: _ratio(ours[name], theirs[name]) for name in ours}

    def gate_metrics(self) -> dict[str, float | None]:
        ratios = {f"{name}_ratio": value for name, value in self.ratios().items()}
        return {**self.result.values(), **ratios}

    def to_dict(self) -> dict[str, Any]:
        return {"result": asdict(self.result), "original": asdict(self.original),
                "ratios": self.ratios(), "notes": self.notes}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        return format_table([self.original, self.result], self.original) + "".join(
            f"\nnote: {note}" for note in self.notes)


_COLUMNS = (("size_mb", "size MiB", ".1f"), ("params_m", "params M", ".1f"),
            ("resident_mb", "resident MiB", ".1f"), ("w4_tok_s", "W4 tok/s", ".1f"),
            ("w1_tok_s", "W1 tok/s", ".1f"), ("ppl", "ppl", ".3f"),
            ("agreement", "agreement", ".3f"), ("text_agreement", "text agr.", ".3f"),
            ("identical_answers", "same answers", ".2f"), ("accuracy", "suite acc.", ".2f"))


def format_table(variants: list[VariantMetrics], original: VariantMetrics) -> str:
    """One row per variant, each cell ``value (ratio to the original)``."""
    header = ["variant", *(title for _, title, _ in _COLUMNS)]
    rows = [header]
    for variant in variants:
        cells = [variant.label]
        for name, _, spec in _COLUMNS:
            value, base = getattr(variant, name), getattr(original, name)
            ratio = _ratio(value, base)
            cell = "-" if value is None else format(value, spec)
            if ratio is not None and variant is not original:
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


# -- measuring --------------------------------------------------------------------------------

def compare(original: str, result: str, settings: Any, label: str) -> Comparison:
    """Evaluate ``result`` against ``original`` (quality first, then speed, then sizes)."""
    from surge.hub import resolve_model

    original_path = str(resolve_model(original))
    ours = VariantMetrics(label, result)
    theirs = VariantMetrics("original", original_path, agreement=1.0, text_agreement=1.0,
                            identical_answers=1.0)
    _quality(ours, theirs, settings)
    for metrics in (theirs, ours):
        _sizes_and_speed(metrics, settings)
    return Comparison(ours, theirs)


def _quality(ours: VariantMetrics, theirs: VariantMetrics, settings: Any) -> None:
    from surge.eval.models import ModelSpec
    from surge.eval.runner import EvalOptions, evaluate

    with tempfile.TemporaryDirectory() as scratch:
        prompt_file = _quick_suite(Path(scratch)) if settings.quick else None
        options = EvalOptions(text=settings.text, prompt_file=prompt_file,
                              max_tokens=QUICK_TEXT_TOKENS if settings.quick else 4096,
                              context_length=512 if settings.quick else 2048,
                              progress=settings.progress)
        report = evaluate(ModelSpec(ours.model, settings.dtype, settings.device),
                          ModelSpec(theirs.model, settings.dtype, settings.device), options)
    for metrics, result in ((ours, report.model), (theirs, report.against)):
        assert result is not None
        metrics.ppl = result.perplexity.perplexity if result.perplexity else None
        metrics.accuracy = result.prompts.accuracy if result.prompts else None
    if report.prompt_agreement is not None:
        ours.agreement = report.prompt_agreement.next_token.top1_match
        ours.identical_answers = report.prompt_agreement.identical_answers
    if report.text_agreement is not None:
        ours.text_agreement = report.text_agreement.top1_match


def _quick_suite(folder: Path) -> Path:
    """The first prompts of the built-in suite, for --quick."""
    from importlib import resources

    from surge.eval.prompts import DEFAULT_SUITE

    lines = [line for line in resources.files("surge.eval").joinpath(DEFAULT_SUITE)
             .read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    path = folder / "quick_prompts.jsonl"
    path.write_text("\n".join(lines[:QUICK_PROMPTS]) + "\n", encoding="utf-8")
    return path


def _sizes_and_speed(metrics: VariantMetrics, settings: Any) -> None:
    metrics.size_mb = weights_on_disk(metrics.model) / MIB
    if settings.speed:
        llm = _engine(metrics.model, settings)
        metrics.w4_tok_s, metrics.w1_tok_s = speed(llm, settings.quick)
        loaded = llm.engine.core.loaded
    else:
        from surge.models.loader import load_model

        loaded = load_model(metrics.model, dtype=settings.dtype, device=settings.device,
                            max_positions=PROMPT_TOKENS * 4)
    params, resident = weight_stats(loaded.model)
    metrics.params_m, metrics.resident_mb = params / 1e6, resident / MIB


def _engine(model: str, settings: Any) -> Any:
    from surge import LLM

    decode = QUICK_DECODE if settings.quick else FULL_DECODE
    return LLM(model, dtype=settings.dtype, device=settings.device, max_num_seqs=W1_REQUESTS,
               max_model_len=PROMPT_TOKENS + max(decode) + 16,
               kv_cache_memory_bytes=256 << 20)


def speed(llm: Any, quick: bool, repeats: int = 2) -> tuple[float, float]:
    """(W4 single-stream tok/s, W1 burst output tok/s) on an offline ``LLM``, each the best
    of ``repeats`` runs (a busy machine only ever slows a run down)."""
    from surge.sampling_params import SamplingParams

    w4_tokens, w1_tokens = QUICK_DECODE if quick else FULL_DECODE
    vocab = llm.get_tokenizer().vocab_size
    rng = random.Random(0)

    def prompt() -> list[int]:
        return [rng.randrange(100, vocab - 1) for _ in range(PROMPT_TOKENS)]

    def run(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds

    run([prompt()], 4)  # warm-up: first calls allocate
    w4 = max(run([prompt()], w4_tokens) for _ in range(repeats))
    w1 = max(run([prompt() for _ in range(W1_REQUESTS)], w1_tokens) for _ in range(repeats))
    return w4, w1


def weights_on_disk(model: str) -> int:
    path = Path(model)
    if path.is_file():
        return path.stat().st_size
    files = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.gguf")]
    return sum(f.stat().st_size for f in files)


def weight_stats(model: Any) -> tuple[int, int]:
    """(logical parameters, resident bytes of weights) of a loaded Surge model: a Linear
    counts its dense shape and the bytes its method keeps (packed or quantized); any other
    parameter counts once (a tied LM head is the embedding's parameters, though its packed
    copy is resident). Buffers computed at load (rope tables) are neither."""
    from surge.models.linear import Linear
    from surge.models.quantization import Int8Embedding

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    # An int8 head's embedding (Int8Embedding) holds the head's codes as buffers: then the
    # head counts them, once.
    shared_codes = any(isinstance(m, Int8Embedding) for m in model.modules())
    tied_head = getattr(model, "lm_head", None) if tied and not shared_codes else None
    params, resident, seen = 0, 0, set()
    for module in model.modules():
        if isinstance(module, Linear):
            if module is not tied_head:  # the embedding's parameters, counted there
                params += module.output_size * module.input_size
                params += module.output_size if module.has_bias else 0
            resident += module.weight_bytes()  # a packed copy of a tied head is resident too
            continue
        for tensor in module._parameters.values():
            if tensor is not None and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                params += tensor.numel()
                resident += tensor.nbytes
    return params, resident


# -- variants and the plot --------------------------------------------------------------------

def record_variant(history: Path, comparison: Comparison) -> list[dict[str, Any]]:
    """Append this comparison to ``history`` (JSONL) and return every variant of the same
    original (the original itself first), latest entry per label."""
    history.parent.mkdir(parents=True, exist_ok=True)
    entry = comparison.to_dict()
    with history.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    original = comparison.original.model
    variants: dict[str, dict[str, Any]] = {"original": entry["original"]}
    for line in history.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if item["original"]["model"] == original:
            variants[item["result"]["label"]] = item["result"]
    return list(variants.values())


def plot_variants(variants: list[dict[str, Any]], path: Path) -> None:
    """Quality (perplexity, lower is better) against single-stream speed, one point per
    variant, with the Pareto front (no other variant both faster and better) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(v["w4_tok_s"], v["ppl"], v["label"]) for v in variants
              if v.get("w4_tok_s") is not None and v.get("ppl") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for x, y, label in points:
        ax.scatter(x, y, s=36)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front([(x, y) for x, y, _ in points])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), linestyle="--", linewidth=1, color="gray",
                label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("W4 single-stream decode, tokens/s (higher is better)")
    ax.set_ylabel("perplexity on held-out text (lower is better)")
    ax.set_title("surge optimize: quality against speed")
    ax.grid(alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, "no variant with both speed and perplexity measured",
                ha="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both speed (higher) and perplexity (lower), by speed."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(front)
