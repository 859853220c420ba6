"""One model under evaluation: Surge's loaded weights, its tokenizer and an offline `LLM`.

Each part is built on first use. When generation is needed the `LLM` comes first, and
perplexity then reuses the weights its engine loaded (through `load_model`, like a direct
load) instead of loading a second copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from surge.eval.scoring import SequenceScorer
from surge.models.loader import LoadedModel, load_model
from surge.tokenizer import ChatTokenizer, load_tokenizer

__all__ = ["EvalModel", "ModelSpec"]

# The offline engine answers up to this many prompts at once, in a KV cache of a fixed size
# (prompt-suite answers are short; the engine preempts if they ever outgrow it).
GENERATION_SEQS = 32
GENERATION_KV_BYTES = 256 << 20


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a checkpoint directory, a .gguf file or a catalogue name, and how.

    ``options`` go to both `load_model` and `LLM` (for example a future ``quantization``).
    ``kv_cache_dtype`` is the storage of the KV cache, in the engine and in perplexity's scorer.
    ``compile_max_batch`` compiles the engine's decode steps (generation only: perplexity
    scores whole windows, which never decode).
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    kv_cache_dtype: str = "auto"
    compile_max_batch: int = 0

    def describe(self) -> dict[str, Any]:
        kv = {} if self.kv_cache_dtype == "auto" else {"kv_cache_dtype": self.kv_cache_dtype}
        compiled = ({"compile_max_batch": self.compile_max_batch} if self.compile_max_batch
                    else {})
        return {"model": self.model, "dtype": self.dtype, "device": self.device, **self.options,
                **kv, **compiled}


class EvalModel:
    """``context_length`` caps the positions both the engine and perplexity use (the model's
    own limit caps it further); a shared load is built for exactly that many."""

    def __init__(self, spec: ModelSpec, context_length: int):
        self.spec = spec
        self.context_length = context_length
        self.path = _existing_model(spec.model)
        self._llm: Any = None
        self._loaded: LoadedModel | None = None
        self._tokenizer: ChatTokenizer | None = None
        self._scorer: SequenceScorer | None = None

    @property
    def llm(self) -> Any:
        if self._llm is None:
            from surge import LLM

            self._llm = LLM(self.path, dtype=self.spec.dtype, device=self.spec.device,
                            max_num_seqs=GENERATION_SEQS,
                            kv_cache_memory_bytes=GENERATION_KV_BYTES,
                            max_model_len=self.context_length,
                            kv_cache_dtype=self.spec.kv_cache_dtype,
                            compile_max_batch=self.spec.compile_max_batch, **self.spec.options)
        return self._llm

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            shared = _engine_weights(self._llm) if self._llm is not None else None
            self._loaded = shared or load_model(
                self.path, dtype=self.spec.dtype, device=self.spec.device,
                max_positions=self.context_length, **self.spec.options)
        return self._loaded

    @property
    def scorer(self) -> SequenceScorer:
        if self._scorer is None:
            limit = self.loaded.config.max_position_embeddings
            self._scorer = SequenceScorer(self.loaded, min(self.context_length, limit),
                                          self.spec.kv_cache_dtype)
        return self._scorer

    @property
    def tokenizer(self) -> ChatTokenizer:
        if self._tokenizer is None:
            self._tokenizer = (self._llm.get_tokenizer() if self._llm is not None
                               else load_tokenizer(self.path))
        return self._tokenizer

    def describe(self) -> dict[str, Any]:
        """The spec, with the dtype and device actually used once the weights are loaded
        (``auto`` resolved) and the file a catalogue name resolved to."""
        described = {**self.spec.describe(), "path": self.path}
        model = self._loaded or (_engine_weights(self._llm) if self._llm else None)
        if model is not None:
            described["dtype"] = str(model.dtype).removeprefix("torch.")
            described["device"] = str(model.device)
        return described


def _engine_weights(llm: Any) -> LoadedModel | None:
    """The LoadedModel inside an offline LLM's engine, if its layout is the one we know."""
    core = getattr(getattr(llm, "engine", None), "core", None)
    loaded = getattr(core, "loaded", None)
    return loaded if isinstance(loaded, LoadedModel) else None


def _existing_model(model: str | os.PathLike) -> str:
    """A checkpoint directory or .gguf file as given, or a catalogue name pulled into the cache."""
    from surge.hub import resolve_model

    return str(resolve_model(model))
