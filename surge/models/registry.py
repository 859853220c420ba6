"""Every architecture Surge serves, in one table: its task, its config reader and its class.

A checkpoint's config names its architecture in ``architectures`` (``["LlamaForCausalLM"]``);
checkpoints that leave it out (written by newer transformers releases, or converted from GGUF)
are matched by ``model_type`` (``"llama"``). The task says how it is served: "generate" by the
LLM engine, "embed" and "classify" by the dynamic batcher.

To add an architecture: write its model file (a class built from one config object, see
``surge.models.loader`` for the hooks it may define), then add one ``Architecture`` to
``_BUILTIN`` below (or call ``register`` from code that must not edit this file).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ARCHITECTURES", "SUPPORTED_ARCHITECTURES", "Architecture", "Task",
           "find_architecture", "names_for", "register"]

Task = Literal["generate", "embed", "classify"]
TASKS: tuple[Task, ...] = ("generate", "embed", "classify")


@dataclass(frozen=True)
class Architecture:
    """One servable architecture.

    ``read_config`` turns a config.json dict into the object ``model_class`` is built from
    (refusing unsupported options with a clear message). ``auto_dtype`` is what ``dtype="auto"``
    means: None for the checkpoint's own ``torch_dtype`` (LLMs are served as stored), or a fixed
    dtype name (small encoders and classifiers serve in float32, their outputs compared closely).

    The built-in entries name their class and reader as ``"module:attribute"``, imported on
    first use: the table itself imports no torch, so the API server, which only asks a
    checkpoint's task, never loads the model code.
    """

    name: str
    task: Task
    model_class_ref: type[nn.Module] | str
    read_config_ref: Callable[[dict[str, Any]], Any] | str
    model_types: tuple[str, ...] = ()
    auto_dtype: str | None = None
    reader_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def model_class(self) -> type[nn.Module]:
        return _resolve(self.model_class_ref)

    def read_config(self, hf: dict[str, Any]) -> Any:
        return _resolve(self.read_config_ref)(hf, **dict(self.reader_kwargs))


def _resolve(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def _llama(name: str, model_type: str) -> Architecture:
    return Architecture(name, "generate", "surge.models.llama:LlamaForCausalLM",
                        "surge.models.llama:llama_config", (model_type,),
                        reader_kwargs=(("architecture", name),))


_BUILTIN = (
    _llama("LlamaForCausalLM", "llama"),
    _llama("Qwen2ForCausalLM", "qwen2"),
    _llama("Qwen3ForCausalLM", "qwen3"),
    _llama("MistralForCausalLM", "mistral"),
    Architecture("GPT2LMHeadModel", "generate", "surge.models.gpt2:GPT2LMHeadModel",
                 "surge.models.gpt2:gpt2_config", ("gpt2",)),
    Architecture("BertModel", "embed", "surge.models.bert:BertModel",
                 "surge.models.bert:BertConfig.from_hf", ("bert",), "float32"),
    Architecture("ResNetForImageClassification", "classify",
                 "surge.models.resnet:ResNetForImageClassification",
                 "surge.models.resnet:ResNetConfig.from_hf", ("resnet",), "float32"),
    Architecture("ViTForImageClassification", "classify",
                 "surge.models.vit:ViTForImageClassification",
                 "surge.models.vit:ViTConfig.from_hf", ("vit",), "float32"),
    Architecture("EfficientNetLiteForImageClassification", "classify",
                 "surge.models.efficientnet:EfficientNetLiteForImageClassification",
                 "surge.models.efficientnet:EfficientNetLiteConfig.from_hf",
                 ("efficientnet_lite",), "float32"),
)
ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in _BUILTIN}


def register(arch: Architecture) -> None:
    """Add an architecture (its name must be new)."""
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    if arch.task not in TASKS:
        raise ValueError(f"task={arch.task!r} is invalid: allowed is one of {', '.join(TASKS)}")
    ARCHITECTURES[arch.name] = arch


def names_for(task: Task) -> list[str]:
    """Registered architecture names of one task, in registration order."""
    return [name for name, arch in ARCHITECTURES.items() if arch.task == task]


def find_architecture(hf: dict[str, Any], task: Task | None = None) -> Architecture:
    """The architecture a config.json describes (by ``architectures``, else ``model_type``);
    with ``task``, one that serves that task, or a ValueError naming those that do."""
    names = hf.get("architectures") or []
    found = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if found is None and not names:
        model_type = hf.get("model_type")
        found = next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)
    described = names or hf.get("model_type")
    if found is None:
        supported = names_for(task) if task else list(ARCHITECTURES)
        raise ValueError(f"architecture {described!r} is not supported; supported: "
                         f"{', '.join(supported)}")
    if task is not None and found.task != task:
        raise ValueError(f"architecture {described!r} serves task {found.task!r}, not {task!r}; "
                         f"architectures for {task!r}: {', '.join(names_for(task))}")
    return found


# Text-generation architectures (kept for callers that list them).
SUPPORTED_ARCHITECTURES = tuple(names_for("generate"))
