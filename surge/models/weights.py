"""Filling a module built on the meta device from a Hugging Face safetensors checkpoint.

The encoder and vision families (``bert``, ``resnet``, ``vit``) name their submodules after the
checkpoint's tensors, so loading is a checked one-to-one copy: every tensor must belong to the
model with the right shape, and every parameter must be found. Construction on the meta device
costs neither memory nor random initialisation, so peak memory is one copy of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

__all__ = ["iter_safetensors", "load_weights", "read_config"]


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory in Hugging Face layout "
                                "has config.json and model.safetensors")
    return json.loads(path.read_text())


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``model.safetensors`` or of the shards its index names."""
    model_dir = Path(model_dir)
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / shard for shard in shards]
    else:
        raise FileNotFoundError(f"no weights in {model_dir}: expected model.safetensors (pickle "
                                ".bin weights are not loaded for encoders and classifiers)")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, f.get_tensor(key)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                 rename: Callable[[str], str | None], dtype: torch.dtype,
                 optional: Callable[[str], bool] = lambda name: False) -> None:
    """Assign checkpoint tensors to ``model`` (built on the meta device) in ``dtype``.

    ``rename`` maps a checkpoint name to the model's (None: not used, e.g. a pooler head);
    ``optional(name)`` says which model tensors may be absent (they are zero-filled).
    """
    expected = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    for raw_name, tensor in tensors:
        name = rename(raw_name)
        if name is None:
            continue
        if name not in expected:
            raise ValueError(f"checkpoint tensor {raw_name!r} does not belong to "
                             f"{type(model).__name__}; is config.json the right one?")
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"tensor {raw_name!r} has shape {tuple(tensor.shape)}, the model "
                             f"expects {want}")
        _assign(model, name, _cast(tensor, expected[name], dtype))
        loaded.add(name)
    missing = sorted(n for n in set(expected) - loaded if not optional(n))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    for name in set(expected) - loaded:
        _assign(model, name, torch.zeros(expected[name].shape, dtype=expected[name].dtype
                                         if not expected[name].is_floating_point() else dtype))


def _cast(tensor: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Integer buffers (counters) keep their type; every float tensor takes the serving dtype.
    return tensor.to(dtype) if target.is_floating_point() else tensor.to(target.dtype)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value.contiguous(), requires_grad=False)
    else:
        module._buffers[leaf] = value.contiguous()
