"""Build any registered model from a checkpoint: config, then weights, for every task.

The model is constructed on the meta device (no memory, no random init) in the serving dtype,
materialised empty on the target device, and filled tensor by tensor from the checkpoint, so
peak memory is one copy of the weights. Every checkpoint tensor must belong to the model with
the right shape, and every model tensor must be found.

A model class may define these hooks (all optional):

- ``checkpoint_name(name) -> str | None``: checkpoint name -> the model's (None: skip it).
- ``transform(name, tensor) -> tensor``: e.g. GPT-2's Conv1D weights, stored transposed.
- ``packed_modules``: checkpoint projection -> (the module that holds it, shard index), for
  projections that share one GEMM here (``q_proj`` -> ``("qkv_proj", 0)``).
- ``optional_tensor(name) -> bool``: model tensors a checkpoint may leave out (a tied LM head,
  BatchNorm's step counter); absent ones are zero-filled before ``finish_loading``.
- ``finish_loading(device, max_positions)``: derived state once weights are in (tie the LM head,
  rope tables, fold batch norms, memory format).

A module with ``weight_loaders`` (``surge.models.linear.Linear``) loads its tensors through them,
then its method's ``process_weights_after_loading`` runs; any other parameter or buffer is a
checked copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surge.models.checkpoint import open_checkpoint
from surge.models.config import stored_dtype
from surge.models.linear import Linear, LinearMethod, copy_checked
from surge.models.quantization import (
    WeightOnlyLinearMethod,
    checkpoint_tensors,
    quantization_method,
    quantize_lm_head,
    stored_quantization,
)
from surge.models.registry import Architecture, Task, find_architecture

__all__ = ["DTYPES", "LoadedModel", "build_model", "load_model", "load_weights",
           "resident_weight_bytes", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (tensor, shard index or None) -> None: fills one model tensor (or one shard of it).
_Load = Callable[[torch.Tensor, "int | None"], None]


@dataclass
class LoadedModel:
    model: nn.Module
    config: Any  # the architecture's config object (ModelConfig for text generation)
    dtype: torch.dtype
    device: torch.device
    architecture: Architecture | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but no CUDA GPU is available; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device,
                  auto: str = "float32") -> torch.dtype:
    """The serving dtype for ``dtype`` ("auto" means ``auto``, e.g. the checkpoint's own)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed is one of auto, "
                         f"{', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("dtype='float16' is slow or unsupported on CPU: allowed on CPU are auto, "
                         "float32 and bfloat16 (the same size as float16, and native here)")
    if dtype == "auto":
        resolved = DTYPES.get(auto, torch.float32)
        # CPUs without native fp16 matmul run it far slower than bf16, which has the same size.
        return torch.bfloat16 if resolved == torch.float16 and device.type == "cpu" else resolved
    return DTYPES[dtype]


def load_model(path: str | Path, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", allow_pickle: bool = False,
               max_positions: int | None = None, task: Task | None = "generate",
               linear_method: LinearMethod | None = None, quantization: str = "none",
               quantization_group_size: int = 32, quantize_lm_head: bool = True
               ) -> LoadedModel:
    """The model at ``path`` (a Hugging Face directory or a .gguf file), ready for inference.

    ``task`` refuses a checkpoint of another task (None: any); ``max_positions`` caps the rope
    tables a decoder precomputes; ``linear_method`` stores and applies a decoder's projections
    (None: unquantized, in the serving dtype); ``quantization`` ("int8", "int4" with
    ``quantization_group_size``) chooses one of surge.models.quantization's instead, and
    ``quantize_lm_head`` (as the engine's default) makes a quantized decoder's LM head (and a
    tied embedding) int8 too.
    """
    checkpoint = open_checkpoint(path, allow_pickle)
    hf = checkpoint.read_config()
    arch = find_architecture(hf, task)
    config = arch.read_config(hf)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, arch.auto_dtype or stored_dtype(hf))
    linear_method = linear_method or _linear_method(hf, quantization, quantization_group_size,
                                                    target, torch_dtype)
    extra = {} if linear_method is None else {"linear_method": linear_method}
    model = build_model(arch.model_class, config, torch_dtype, target, **extra)
    load_weights(model, checkpoint_tensors(checkpoint, model))
    quantize_head = quantize_lm_head and isinstance(linear_method, WeightOnlyLinearMethod)
    _finish(model, target, max_positions, torch_dtype if quantize_head else None)
    return LoadedModel(model, config, torch_dtype, target, arch)


def _linear_method(hf: dict[str, Any], quantization: str, group_size: int,
                   device: torch.device, dtype: torch.dtype) -> LinearMethod | None:
    """``--quantization``'s method, or the stored one of a checkpoint written quantized
    (`surge optimize quantize`), which then loads as it is, re-quantizing nothing."""
    stored = stored_quantization(hf)
    if stored is None:
        return quantization_method(quantization, group_size, device, dtype)
    if quantization not in ("none", stored.quantization) or (
            quantization == "int4" and group_size != stored.group_size):
        kind = stored.quantization + (f", group size {stored.group_size}"
                                      if stored.quantization == "int4" else "")
        raise ValueError(f"this checkpoint is stored quantized ({kind}): allowed is "
                         f"quantization='none' (it loads as stored), not {quantization!r} "
                         f"with group size {group_size}")
    return quantization_method(stored.quantization, stored.group_size, device, dtype,
                               prequantized=True)


def build_model(model_class: type[nn.Module], config: Any, dtype: torch.dtype,
                device: torch.device, **kwargs: Any) -> nn.Module:
    """``model_class(config, **kwargs)`` with uninitialised tensors of ``dtype`` on ``device``."""
    with torch.device("meta"), _default_dtype(dtype):
        model = model_class(config, **kwargs)
    return model.to_empty(device=device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Fill ``model`` (materialised, uninitialised) from (checkpoint name, tensor) pairs."""
    loaders = _tensor_loaders(model)
    rename = getattr(model, "checkpoint_name", lambda name: name)
    transform = getattr(model, "transform", lambda _, tensor: tensor)
    packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    for raw_name, tensor in tensors:
        name = rename(raw_name)
        if name is None:
            continue
        target, shard = _packed_target(name, packed)
        if target not in loaders:
            raise ValueError(f"checkpoint tensor {raw_name!r} does not belong to "
                             f"{type(model).__name__}; is config.json the right one?")
        try:
            loaders[target](transform(name, tensor), shard)
        except ValueError as error:
            raise ValueError(f"tensor {raw_name!r} {error}") from None
        loaded.add(target)
    _check_complete(model, set(loaders) - loaded)


def _tensor_loaders(model: nn.Module) -> dict[str, _Load]:
    """Every tensor name a checkpoint fills -> the function that fills it."""
    loaders: dict[str, _Load] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        own: dict[str, Callable[..., None]] | None = getattr(module, "weight_loaders", None)
        if own is not None:
            loaders.update({prefix + leaf: partial(load, module) for leaf, load in own.items()})
            continue
        for leaf, tensor in _own_tensors(module):
            loaders[prefix + leaf] = partial(_copy_whole, tensor)
    return loaders


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from ((n, p) for n, p in module._parameters.items() if p is not None)
    yield from ((n, b) for n, b in module._buffers.items()
                if b is not None and n not in module._non_persistent_buffers_set)


def _copy_whole(target: torch.Tensor, tensor: torch.Tensor, shard: int | None) -> None:
    if shard is not None:
        raise ValueError(f"is mapped to shard {shard} of a tensor that has no shards")
    copy_checked(target.data, tensor)


def _packed_target(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    """``...q_proj.weight`` -> (``...qkv_proj.weight``, 0) where q/k/v share one module."""
    module_path, _, leaf = name.rpartition(".")
    parent, _, proj = module_path.rpartition(".")
    if proj not in packed:
        return name, None
    merged, shard = packed[proj]
    return f"{parent}.{merged}.{leaf}" if parent else f"{merged}.{leaf}", shard


def _check_complete(model: nn.Module, missing: set[str]) -> None:
    optional = getattr(model, "optional_tensor", lambda name: False)
    required = sorted(name for name in missing if not optional(name))
    if required:
        raise ValueError(f"checkpoint is missing {len(required)} tensors, e.g. {required[:5]}")
    state = model.state_dict(keep_vars=True)
    for name in missing:
        if name in state:  # e.g. BatchNorm's step counter: a training statistic
            state[name].data.zero_()


def _finish(model: nn.Module, device: torch.device, max_positions: int | None,
            int8_head_dtype: torch.dtype | None = None) -> None:
    """Derived state, then (``int8_head_dtype``: the serving dtype) an int8 LM head, then
    each linear method's repacking."""
    finish_loading = getattr(model, "finish_loading", None)
    if finish_loading is not None:
        finish_loading(device, max_positions)
    if int8_head_dtype is not None:
        with _default_dtype(int8_head_dtype):
            quantize_lm_head(model)
    model.eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_weights_after_loading(module)


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the weights hold in memory: every distinct tensor once (a tied head and embedding
    share one), including oneDNN's packed copies."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            tensors.append(packed)
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr() if not tensor.is_mkldnn else id(tensor)
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
