"""`surge optimize quantize`: a weight-only int8/int4 checkpoint that loads without
re-quantizing.

The model is loaded exactly as `surge serve --quantization int8|int4` would load it (same
methods, same GGUF block handling), and each decoder projection's quantized state is written
out in the stored layout of `surge.models.quantization` (its module docstring documents it):
loading the directory rebuilds bit-identical kernel buffers, so the result serves exactly what
quantizing at load would have served, in a third (int8: about half) of the bytes on disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from surge.models.linear import Linear
from surge.models.quantization import (
    Int4LinearMethod,
    Int8LinearMethod,
    pack_int4_columns,
    unpack_int4,
)
from surge.optimize.export import (
    Source,
    open_source,
    prepare_out,
    write_config,
    write_tensors,
    write_tokenizer,
)
from surge.optimize.gate import run_gate, settings_from_args

__all__ = ["check_group_size", "quantize_checkpoint", "run_quantize"]

FORMAT_VERSION = 1


def run_quantize(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, dtype=args.dtype)
    source = open_source(args.model)
    if args.method == "int4":
        check_group_size(source.config, args.group_size)
    out = prepare_out(args.out, source.path)
    quantize_checkpoint(source, out, args.method, args.group_size, args.dtype)
    label = args.method + (f"-g{args.group_size}" if args.method == "int4" else "")
    print(f"wrote {label} checkpoint to {out}")
    return run_gate(str(source.path), out, settings, label)


def check_group_size(config: dict[str, Any], group_size: int) -> None:
    """int4 groups split every projection's inputs evenly, or the model cannot be quantized:
    said before any work."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    inputs = {"hidden_size": config["hidden_size"], "intermediate_size":
              config["intermediate_size"], "num_attention_heads x head_dim": heads * head_dim}
    uneven = {name: size for name, size in inputs.items() if size % group_size}
    if uneven:
        raise ValueError(f"--group-size {group_size} does not divide {uneven}: allowed are "
                         "group sizes that divide every projection's input size")


def quantize_checkpoint(source: Source, out: Path, method: str, group_size: int = 32,
                        dtype: str = "bfloat16") -> None:
    """Write ``source`` quantized with ``method`` ("int8", "int4") into ``out``."""
    from surge.models.checkpoint import open_checkpoint
    from surge.models.loader import load_model

    # The head stays float in the file: loading quantizes it (--quantize-lm-head) or not.
    loaded = load_model(source.path, dtype=dtype, device="cpu", quantization=method,
                        quantization_group_size=group_size, max_positions=16,
                        quantize_lm_head=False)
    layers = {name: m for name, m in loaded.model.named_modules() if isinstance(m, Linear)}
    packed: dict[str, tuple[str, int]] = getattr(loaded.model, "packed_modules", {})
    torch_dtype = loaded.dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in open_checkpoint(source.path).iter_tensors():
        module, _, leaf = name.rpartition(".")
        layer, shard = _layer_of(module, layers, packed)
        if layer is not None and leaf == "weight" and isinstance(
                layer.method, (Int8LinearMethod, Int4LinearMethod)):
            tensors.update({f"{module}.{part}": value
                            for part, value in stored_parts(layer, shard).items()})
        else:
            tensors[name] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
    write_tensors(out, tensors)
    write_config(out, source.config, torch_dtype=dtype, quantization_config={
        "quant_method": "surge", "bits": 8 if method == "int8" else 4,
        "group_size": group_size if method == "int4" else None, "scale_dtype": dtype,
        "version": FORMAT_VERSION})
    write_tokenizer(source.path, out)


def _layer_of(module: str, layers: dict[str, Linear], packed: dict[str, tuple[str, int]]
              ) -> tuple[Linear | None, int | None]:
    """The Linear a checkpoint projection lives in (q_proj -> qkv_proj, shard 0)."""
    parent, _, projection = module.rpartition(".")
    if projection in packed:
        merged, shard = packed[projection]
        return layers.get(f"{parent}.{merged}"), shard
    return layers.get(module), None


def stored_parts(layer: Linear, shard: int | None) -> dict[str, torch.Tensor]:
    """One projection's quantized state in the stored layout (copies, contiguous)."""
    rows = layer.shard_rows(shard)
    method = layer.method
    if isinstance(method, Int8LinearMethod):
        return {"qweight": layer.qweight[rows].clone(), "scales": layer.scales[rows].clone()}
    if isinstance(method, Int4LinearMethod):
        codes = unpack_int4(layer.qweight, method.stored_rows(layer), layer.input_size)
        scale_zeros = layer.scale_zeros  # [groups, stored rows, (scale, zero)]
        return {"qweight": pack_int4_columns(codes[rows]),
                "scales": scale_zeros[..., 0].t()[rows].contiguous(),
                "zeros": scale_zeros[..., 1].t()[rows].contiguous()}
    raise TypeError(f"{type(method).__name__} is not a quantized method")
