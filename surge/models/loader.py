"""Build a model from a Hugging Face checkpoint directory: config, then weights.

The model is constructed on the meta device (no memory, no random init), materialised
empty on the target device, and filled tensor by tensor from safetensors, so peak memory is
one copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from surge.models.config import ModelConfig, read_hf_config
from surge.models.layers import can_pack, pack_linears
from surge.models.registry import resolve_architecture

__all__ = ["LoadedModel", "load_model", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadedModel:
    def __init__(self, model: nn.Module, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device):
        self.model, self.config, self.dtype, self.device = model, config, dtype, device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    resolved = _DTYPES.get(config.torch_dtype.replace("torch.", ""), torch.float32)
    # CPUs without native fp16 matmul run it far slower than bf16, which has the same size.
    if resolved == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return resolved


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "auto",
               allow_pickle: bool = False, max_positions: int | None = None) -> LoadedModel:
    model_dir = Path(model_dir)
    model_cls, config = resolve_architecture(read_hf_config(model_dir))
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, target)
    with torch.device("meta"), _default_dtype(torch_dtype):
        model = model_cls(config)
    model.to_empty(device=target)
    _load_weights(model, _iter_checkpoint(model_dir, allow_pickle), config)
    limit = config.max_position_embeddings
    model.finish_loading(target, min(max_positions or limit, limit))
    model.eval().requires_grad_(False)
    if can_pack(target, torch_dtype):
        pack_linears(model)
    return LoadedModel(model, config, torch_dtype, target)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]],
                  config: ModelConfig) -> None:
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = set(params)
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    loaded: set[str] = set()
    for raw_name, tensor in weights:
        name = model.checkpoint_name(raw_name)
        if name is None:
            continue
        tensor = getattr(model, "transform", lambda _, t: t)(name, tensor)
        module_path, _, leaf = name.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        if proj in model.packed_modules:
            merged, shard = model.packed_modules[proj]
            modules[f"{parent}.{merged}"].load_shard(leaf, shard, tensor)
            loaded.add(f"{parent}.{merged}.{leaf}")
            continue
        if name not in params:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise ValueError(f"checkpoint tensor {raw_name!r} does not belong to "
                             f"{config.architecture}; is config.json the right one?")
        _copy_checked(params[name], tensor, raw_name)
        loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def _copy_checked(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    param.data.copy_(tensor)


def _iter_checkpoint(model_dir: Path,
                     allow_pickle: bool) -> Iterator[tuple[str, torch.Tensor]]:
    safetensor_files = _weight_files(model_dir, "model.safetensors")
    if safetensor_files:
        for path in safetensor_files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, f.get_tensor(key)
        return
    pickle_files = _weight_files(model_dir, "pytorch_model.bin")
    if not pickle_files:
        raise FileNotFoundError(f"no weights in {model_dir}: expected model.safetensors or "
                                "model.safetensors.index.json with its shards")
    if not allow_pickle:
        raise ValueError(
            f"{model_dir} has only pickle (.bin) weights, which can run arbitrary code when "
            "loaded; convert them to safetensors, or pass --allow-pickle (LLM(..., "
            "allow_pickle=True)) if you trust their source")
    for path in pickle_files:
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


def _weight_files(model_dir: Path, single_name: str) -> list[Path]:
    """The single weights file, or every shard named by its `.index.json`."""
    single = model_dir / single_name
    if single.is_file():
        return [single]
    index = model_dir / f"{single_name}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    return []
