"""What a checkpoint is for.

``surge serve --model X`` accepts any kind of model: the task is what the registry says of the
checkpoint's architecture (a causal LM generates, a BERT encoder embeds, an image classifier
classifies), so the server starts the LLM engine only for a model that generates. Where a
model named on the command line lives is ``surge.hub.resolve_model``'s answer.
"""

from __future__ import annotations

from pathlib import Path

from surge.models.checkpoint import read_config
from surge.models.registry import Task, find_architecture

__all__ = ["Task", "detect_task"]


def detect_task(model_dir: str | Path) -> Task:
    """"generate", "embed" or "classify": the task of the checkpoint's architecture."""
    try:
        return find_architecture(read_config(model_dir)).task
    except ValueError as error:
        raise ValueError(f"{model_dir}: {error}") from None
