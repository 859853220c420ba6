"""Where a model's config and tensors come from: the one seam between file formats and the loader.

A ``Checkpoint`` answers two questions in Hugging Face's vocabulary, whatever the file format:
what the model is (a ``config.json``-like dict) and which tensors it has (HF tensor names). The
loader knows nothing else about files, so a new format (GGUF, ``surge.models.gguf``) plugs in
here without touching it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from surge.models.config import eos_ids_of

if TYPE_CHECKING:  # torch loads with the weights, not with config.json (the API server reads it)
    import torch

__all__ = ["Checkpoint", "HFCheckpoint", "open_checkpoint", "read_config"]


class Checkpoint(Protocol):
    path: Path

    def read_config(self) -> dict[str, Any]:
        """A ``config.json``-like dict (Hugging Face keys)."""
        ...

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, under its Hugging Face name."""
        ...


def open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """A directory in Hugging Face layout, or a ``.gguf`` file."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a GGUF checkpoint is a single .gguf file")
        from surge.models.gguf import GGUFCheckpoint  # only GGUF users pay for its reader

        return GGUFCheckpoint(path)
    if path.is_file():
        raise ValueError(f"{path} is a file: a checkpoint is a directory in Hugging Face layout "
                         "(config.json, *.safetensors) or a .gguf file")
    return HFCheckpoint(path, allow_pickle)


def read_config(path: str | Path) -> dict[str, Any]:
    """The config of the checkpoint at ``path`` (a directory or a .gguf file)."""
    return open_checkpoint(path).read_config()


class HFCheckpoint:
    """``config.json`` plus ``model.safetensors`` (or its shards; pickle ``.bin`` if allowed)."""

    def __init__(self, path: Path, allow_pickle: bool = False) -> None:
        self.path = path
        self.allow_pickle = allow_pickle

    def read_config(self) -> dict[str, Any]:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: --model must be a directory in Hugging Face layout "
                "(config.json, *.safetensors, tokenizer.json) or a .gguf file; write one with "
                "`surge make-model --preset tiny-llama --out DIR`")
        config = json.loads(config_path.read_text())
        return _with_generation_eos(config, self.path / "generation_config.json")

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        safetensor_files = _weight_files(self.path, "model.safetensors")
        if safetensor_files:
            for file in safetensor_files:
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        yield key, f.get_tensor(key)
            return
        yield from self._iter_pickle()

    def _iter_pickle(self) -> Iterator[tuple[str, torch.Tensor]]:
        pickle_files = _weight_files(self.path, "pytorch_model.bin")
        if not pickle_files:
            raise FileNotFoundError(f"no weights in {self.path}: expected model.safetensors or "
                                    "model.safetensors.index.json with its shards")
        if not self.allow_pickle:
            raise ValueError(
                f"{self.path} has only pickle (.bin) weights, which can run arbitrary code when "
                "loaded; convert them to safetensors, or pass --allow-pickle (LLM(..., "
                "allow_pickle=True)) if you trust their source")
        for file in pickle_files:
            import torch

            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _with_generation_eos(config: dict[str, Any], generation_path: Path) -> dict[str, Any]:
    """Add ``generation_config.json``'s EOS ids to config.json's: newer checkpoints (Llama 3,
    Qwen) list several there (end of turn as well as end of text) and few in config.json."""
    if not generation_path.is_file():
        return config
    extra = eos_ids_of(json.loads(generation_path.read_text()))
    eos = eos_ids_of(config)
    merged = eos + [i for i in extra if i not in eos]
    if not merged:
        return config
    return {**config, "eos_token_id": merged[0] if len(merged) == 1 else merged}


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
