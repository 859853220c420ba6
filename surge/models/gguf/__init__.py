"""GGUF checkpoints (llama.cpp's one-file format): config, tensors and tokenizer metadata."""

from surge.models.gguf.checkpoint import (
    SUPPORTED_GGUF_ARCHITECTURES,
    SUPPORTED_GGUF_TYPES,
    GGUFCheckpoint,
    GGUFError,
    GGUFVocab,
    RawTensor,
    is_gguf,
    open_vocab,
)

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "SUPPORTED_GGUF_TYPES", "GGUFCheckpoint", "GGUFError",
           "GGUFVocab", "RawTensor", "is_gguf", "open_vocab"]
