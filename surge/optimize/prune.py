"""`surge optimize prune`: sparsity masks, or a smaller dense model.

**Masks** (``--method wanda|magnitude``, ``--pattern unstructured|2:4``) zero the weights of
every decoder projection with the lowest score, per output row: ``|W_ij|`` (magnitude) or
``|W_ij| * ||X_j||`` (Wanda, Sun et al. 2023, with ``||X_j||`` the norm of input channel ``j``
over the calibration text). ``2:4`` keeps the best 2 of every 4 consecutive inputs. The
result has the same shapes, size and speed as the original: masks alone do not speed up
dense kernels (a sparse kernel or 2:4 tensor-core hardware would be needed); they are here
to measure what a sparsity level costs in quality.

**Structured** (``--method structured``) removes whole attention heads and MLP channels and
writes a smaller dense model, which is faster on every kernel. Scores, per layer, on the
calibration text (the activation-weighted norms of the output projections, as in Wanda and
FLAP): an MLP channel ``j`` scores ``||X_j|| * ||W_down[:, j]||``; a query head the root of
``sum ||X_j||^2 * ||W_o[:, j]||^2`` over its columns of ``o_proj``. Grouped KV heads are
respected: either every KV group keeps the same number of its query heads (``--head-unit
head``) or whole KV groups go with their query heads (``kv-group``, scored as the sum of their
heads). Each layer drops its own lowest-scoring heads and channels but the same number of
them, so the result is a standard config (uniform ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, an explicit ``head_dim``) that Surge and
transformers both load.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surge.optimize.export import (
    Source,
    open_source,
    prepare_out,
    read_tensors,
    write_config,
    write_tensors,
    write_tokenizer,
)
from surge.optimize.gate import run_gate, settings_from_args

__all__ = ["PrunePlan", "StructuredShape", "mask_weights", "plan_prune", "prune_checkpoint",
           "run_prune", "structured_shape"]

MASKED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj")
# HF projection -> the Surge module that reads the same input (for its input norms).
_INPUT_OF = {"q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj",
             "v_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
             "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
             "down_proj": "mlp.down_proj"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
MASK_NOTE = ("masks zero weights but keep every shape: dense kernels multiply by the zeros "
             "anyway, so size and speed do not change; --method structured removes heads and "
             "channels for a model that is actually smaller and faster")


@dataclass(frozen=True)
class PrunePlan:
    """Validated settings: everything is checked before any weight is read."""

    method: str  # structured | wanda | magnitude
    sparsity: float
    pattern: str = "unstructured"
    head_sparsity: float | None = None
    head_unit: str = "head"
    channel_multiple: int = 32


@dataclass(frozen=True)
class StructuredShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def plan_prune(method: str, sparsity: float | None, pattern: str = "unstructured",
               head_sparsity: float | None = None, head_unit: str = "head",
               channel_multiple: int = 32) -> PrunePlan:
    if method not in ("structured", "wanda", "magnitude"):
        raise ValueError(f"--method {method!r} is invalid: allowed is structured, wanda or "
                         "magnitude")
    if pattern not in ("unstructured", "2:4"):
        raise ValueError(f"--pattern {pattern!r} is invalid: allowed is unstructured or 2:4")
    if pattern == "2:4":
        if method == "structured":
            raise ValueError("--pattern 2:4 is a mask pattern: allowed with --method wanda or "
                             "magnitude, not structured")
        if sparsity not in (None, 0.5):
            raise ValueError(f"--sparsity {sparsity} with --pattern 2:4 is invalid: 2:4 removes "
                             "exactly half (allowed: 0.5, or leave --sparsity out)")
        sparsity = 0.5
    sparsity = 0.25 if sparsity is None else sparsity
    for flag, value in (("--sparsity", sparsity), ("--head-sparsity", head_sparsity)):
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"{flag} {value} is invalid: allowed is a fraction in [0, 1)")
    if head_unit not in ("head", "kv-group"):
        raise ValueError(f"--head-unit {head_unit!r} is invalid: allowed is head or kv-group")
    if channel_multiple < 1:
        raise ValueError(f"--channel-multiple {channel_multiple} is invalid: allowed is an "
                         "integer >= 1")
    return PrunePlan(method, sparsity, pattern, head_sparsity, head_unit, channel_multiple)


def structured_shape(config: dict[str, Any], plan: PrunePlan) -> StructuredShape:
    """The pruned model's uniform shape, or ValueError (e.g. heads not divisible by the KV
    heads) before any work."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not divisible by num_key_value_heads="
                         f"{kv_heads}: structured pruning needs whole KV groups")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_group = heads // kv_heads
    head_sparsity = plan.sparsity if plan.head_sparsity is None else plan.head_sparsity
    if plan.head_unit == "head":
        keep_per_group = max(1, per_group - round(head_sparsity * per_group))
        new_heads, new_kv = keep_per_group * kv_heads, kv_heads
    else:
        new_kv = max(1, kv_heads - round(head_sparsity * kv_heads))
        new_heads = new_kv * per_group
    size = config["intermediate_size"]
    keep = size - round(plan.sparsity * size)
    multiple = plan.channel_multiple if size % plan.channel_multiple == 0 else 1
    keep = min(size, max(multiple, round(keep / multiple) * multiple))
    return StructuredShape(new_heads, new_kv, head_dim, keep)


def run_prune(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, dtype=args.dtype)
    plan = plan_prune(args.method, args.sparsity, args.pattern, args.head_sparsity,
                      args.head_unit, args.channel_multiple)
    source = open_source(args.model)
    if plan.method == "structured":
        shape = structured_shape(source.config, plan)  # refuses bad head counts now
        print(f"structured: heads {source.config['num_attention_heads']} -> {shape.num_heads}, "
              f"KV heads {source.config.get('num_key_value_heads')} -> {shape.num_kv_heads}, "
              f"MLP channels {source.config['intermediate_size']} -> {shape.intermediate_size}")
    # Magnitude scores need no text, but a named file is still checked, never ignored.
    text = _calibration_text(args.calibration) if (
        plan.method != "magnitude" or args.calibration) else None
    text = None if plan.method == "magnitude" else text
    out = prepare_out(args.out, source.path)
    summary = prune_checkpoint(source, out, plan, text, args.calibration_tokens, args.dtype,
                               args.progress)
    print(summary)
    label = (f"{plan.method}-{plan.pattern}" if plan.method != "structured"
             else "structured") + f"-{plan.sparsity:g}"
    notes = [MASK_NOTE] if plan.method != "structured" else []
    if notes:
        print(f"note: {MASK_NOTE}")
    return run_gate(str(source.path), out, settings, label, notes=notes)


def _calibration_text(path: str | None) -> str:
    from surge.optimize.calibration import calibration_text

    return calibration_text(path)


def prune_checkpoint(source: Source, out: Path, plan: PrunePlan, text: str | None,
                     calibration_tokens: int = 4096, dtype: str = "bfloat16",
                     progress: bool = True) -> str:
    """Write the pruned model into ``out``; returns a one-line summary."""
    norms = _norms(source, text, calibration_tokens, progress) if text is not None else {}
    tensors = {name: t.float() for name, t in read_tensors(source.path).items()}
    if plan.method == "structured":
        shape = structured_shape(source.config, plan)
        tensors = _structured(tensors, source.config, shape, norms, plan.head_unit)
        changes = {"num_attention_heads": shape.num_heads,
                   "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                   "intermediate_size": shape.intermediate_size}
        summary = (f"structured: {shape.num_heads} heads, {shape.num_kv_heads} KV heads, "
                   f"{shape.intermediate_size} MLP channels per layer")
    else:
        zeros, total = 0, 0
        for name, tensor in tensors.items():
            match = _LAYER.match(name)
            if match and match[3] in MASKED_PROJECTIONS and match[4] == "weight":
                norm = norms.get(f"model.layers.{match[1]}.{_INPUT_OF[match[3]]}")
                tensor.mul_(mask_weights(tensor, plan, norm))
                zeros += int((tensor == 0).sum())
                total += tensor.numel()
        changes = {}
        summary = (f"{plan.method} {plan.pattern}: {zeros / max(total, 1):.1%} of the decoder "
                   "projections' weights are zero")
    torch_dtype = getattr(torch, dtype)
    write_tensors(out, {name: t.to(torch_dtype) for name, t in tensors.items()})
    write_config(out, source.config, torch_dtype=dtype, **changes)
    write_tokenizer(source.path, out)
    return summary


def _norms(source: Source, text: str, calibration_tokens: int, progress: bool
           ) -> dict[str, torch.Tensor]:
    """Input norms ``||X_j||`` of every decoder projection over the calibration text."""
    from surge.models.loader import load_model
    from surge.optimize.calibration import CALIBRATION_WINDOW, calibration_windows, input_norms
    from surge.tokenizer import load_tokenizer

    window = min(CALIBRATION_WINDOW, source.config.get("max_position_embeddings", 2048))
    ids = load_tokenizer(source.path).encode(text)
    windows = calibration_windows(ids, calibration_tokens, window)
    loaded = load_model(source.path, dtype="float32", device="cpu", max_positions=window)
    return {name: s.sqrt() for name, s in input_norms(loaded, windows, progress).items()}


def mask_weights(weight: torch.Tensor, plan: PrunePlan, norm: torch.Tensor | None
                 ) -> torch.Tensor:
    """A 0/1 mask of ``weight`` [out, in] keeping each row's highest scores."""
    score = weight.abs()
    if plan.method == "wanda":
        if norm is None:
            raise ValueError("Wanda needs input norms from calibration text")
        score = score * norm[None, :]
    rows, columns = score.shape
    mask = torch.ones_like(weight)
    if plan.pattern == "2:4":
        groups = score.view(rows, columns // 4, 4)
        lowest = groups.topk(2, dim=-1, largest=False).indices
        mask.view(rows, columns // 4, 4).scatter_(-1, lowest, 0.0)
        return mask
    drop = int(plan.sparsity * columns)
    if drop:
        lowest = score.topk(drop, dim=1, largest=False).indices
        mask.scatter_(1, lowest, 0.0)
    return mask


def _structured(tensors: dict[str, torch.Tensor], config: dict[str, Any],
                shape: StructuredShape, norms: dict[str, torch.Tensor], head_unit: str
                ) -> dict[str, torch.Tensor]:
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        heads, groups = _kept_heads(tensors, config, shape, norms, prefix, head_unit)
        channels = _kept_channels(tensors, shape, norms, prefix)
        _select(tensors, f"{prefix}.self_attn.q_proj", _rows(heads, shape.head_dim), 0)
        for kv in ("k_proj", "v_proj"):
            _select(tensors, f"{prefix}.self_attn.{kv}", _rows(groups, shape.head_dim), 0)
        _select(tensors, f"{prefix}.self_attn.o_proj", _rows(heads, shape.head_dim), 1)
        for proj in ("gate_proj", "up_proj"):
            _select(tensors, f"{prefix}.mlp.{proj}", channels, 0)
        _select(tensors, f"{prefix}.mlp.down_proj", channels, 1)
    return tensors


def _kept_heads(tensors: dict[str, torch.Tensor], config: dict[str, Any],
                shape: StructuredShape, norms: dict[str, torch.Tensor], prefix: str,
                head_unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept KV heads) of one layer, ascending, each query head's KV head
    kept (HF's grouping: KV head g serves query heads g * per_group ... + per_group - 1)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    per_group = heads // kv_heads
    o_proj = tensors[f"{prefix}.self_attn.o_proj.weight"]
    x = norms[f"{prefix}.self_attn.o_proj"]
    column_score = x.pow(2) * o_proj.pow(2).sum(dim=0)
    head_score = column_score.view(heads, shape.head_dim).sum(dim=1).view(kv_heads, per_group)
    if head_unit == "kv-group":
        groups = head_score.sum(dim=1).topk(shape.num_kv_heads).indices.sort().values
        return _rows(groups, per_group), groups
    keep = shape.num_heads // kv_heads
    within = head_score.topk(keep, dim=1).indices.sort(dim=1).values
    kept = (within + torch.arange(kv_heads)[:, None] * per_group).flatten()
    return kept, torch.arange(kv_heads)


def _kept_channels(tensors: dict[str, torch.Tensor], shape: StructuredShape,
                   norms: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    down = tensors[f"{prefix}.mlp.down_proj.weight"]
    score = norms[f"{prefix}.mlp.down_proj"] * down.norm(dim=0)
    return score.topk(shape.intermediate_size).indices.sort().values


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the ``size`` consecutive rows of each unit (a head's head_dim rows)."""
    return (units[:, None] * size + torch.arange(size)[None, :]).flatten()


def _select(tensors: dict[str, torch.Tensor], module: str, index: torch.Tensor, dim: int
            ) -> None:
    """Keep ``index`` along ``dim`` of the module's weight (and of its bias along rows)."""
    tensors[f"{module}.weight"] = tensors[f"{module}.weight"].index_select(dim, index)
    bias = f"{module}.bias"
    if dim == 0 and bias in tensors:
        tensors[bias] = tensors[bias].index_select(0, index)
