"""Reading a causal LM's tensors and writing a self-contained Hugging Face directory.

Every `surge optimize` command writes ``config.json``, ``model.safetensors`` and the tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template, and
``generation_config.json``), so the directory serves on its own, also when the input was a
.gguf file (its tokenizer is rebuilt from the file's metadata, as `surge serve` does).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["LLAMA_FAMILY", "Source", "open_source", "prepare_out", "read_tensors",
           "write_config", "write_tensors", "write_tokenizer"]

# Architectures whose projections Surge stores as q/k/v/o and gate/up/down (surge.models.llama).
LLAMA_FAMILY = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass(frozen=True)
class Source:
    path: Path  # a directory or a .gguf file
    config: dict[str, Any]  # config.json keys (a GGUF's metadata in HF terms)
    architecture: str


def open_source(model: str, option: str = "--model") -> Source:
    """The model to optimize: resolved, a causal LM of the Llama family, stored in float.
    Raises before any work starts, naming what is allowed."""
    from surge.hub import resolve_model
    from surge.models.checkpoint import open_checkpoint
    from surge.models.quantization import stored_quantization
    from surge.models.registry import find_architecture, names_for

    path = resolve_model(model)
    config = open_checkpoint(path).read_config()
    try:
        architecture = find_architecture(config, "generate").name
    except ValueError as exc:
        raise ValueError(f"{option} {model!r} is not a causal language model ({exc}); "
                         f"allowed are {', '.join(names_for('generate'))}") from None
    if architecture not in LLAMA_FAMILY:
        raise ValueError(f"{option} {model!r} is a {architecture}: surge optimize works on "
                         f"{', '.join(LLAMA_FAMILY)}")
    if stored_quantization(config) is not None:
        raise ValueError(f"{option} {model!r} is stored quantized: optimize its float "
                         "checkpoint instead")
    return Source(Path(path), config, architecture)


def prepare_out(out: str | Path, source: Path | None = None) -> Path:
    """``out`` as a new or empty directory (created), never the input."""
    path = Path(out).expanduser()
    if source is not None and path.resolve() == Path(source).resolve():
        raise ValueError(f"--out {str(path)!r} is the input model: give a new directory")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"--out {str(path)!r} exists and is not an empty directory: "
                              "give a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name (a GGUF file's dequantized to float32)."""
    from surge.models.checkpoint import open_checkpoint

    return dict(open_checkpoint(path).iter_tensors())


def write_tensors(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})


def write_config(out: Path, config: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """config.json: the input's keys with ``changes`` (a value None removes the key)."""
    written = {k: v for k, v in {**config, **changes}.items() if v is not None}
    (out / "config.json").write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return written


def write_tokenizer(source: Path, out: Path) -> None:
    """The source's tokenizer files; from a .gguf file, files rebuilt from its metadata."""
    if source.is_dir():
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        return
    from surge.models.checkpoint import open_checkpoint
    from surge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    tokenizer.tokenizer.save(str(out / "tokenizer.json"))
    config = {k: v for k, v in tokenizer.config.items() if v is not None}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")
    hf = open_checkpoint(source).read_config()
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                encoding="utf-8")
