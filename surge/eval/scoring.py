"""Next-token log-probabilities of a whole sequence, from Surge's own model code.

The engine's runner only computes logits where a request samples. Evaluation needs them at
every position, so `SequenceScorer` runs the model's forward exactly as the runner does for a
single sequence prefilled from position 0 (same forward context, same attention path), with
its own small KV cache of one block spanning the window, then applies the LM head in row
chunks so a window over a 49k vocabulary never holds all its logits at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from surge.models.attention import (
    AttentionMetadata,
    PrefillChunk,
    allocate_kv_cache,
    forward_context,
    kv_cache_torch_dtype,
)
from surge.models.loader import LoadedModel

__all__ = ["LOGIT_ROWS", "SequenceScorer", "kl_sum"]

LOGIT_ROWS = 256  # positions per LM-head call: 256 x 49k float32 logits is 50 MB


class SequenceScorer:
    """Hidden states and log-softmax rows of one loaded model, for sequences up to ``max_len``."""

    def __init__(self, loaded: LoadedModel, max_len: int, kv_cache_dtype: str = "auto"):
        limit = loaded.config.max_position_embeddings
        if not 2 <= max_len <= limit:
            raise ValueError(f"context length {max_len} is invalid for this model: allowed is "
                             f"2 to {limit} (its max_position_embeddings)")
        self.loaded = loaded
        self.max_len = max_len
        config = loaded.config
        # A quantized cache makes attention see K/V as the engine would keep them.
        cache_dtype = kv_cache_torch_dtype(kv_cache_dtype, loaded.dtype)
        shape = (config.num_kv_heads, 1, max_len, config.head_dim, cache_dtype, loaded.device)
        self._caches = [(allocate_kv_cache(*shape), allocate_kv_cache(*shape))
                        for _ in loaded.model.attention_layers()]
        self._window = config.sliding_window

    @property
    def vocab_size(self) -> int:
        return self.loaded.config.vocab_size

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        """Final hidden state at every position of ``token_ids``: [T, hidden]."""
        num_tokens = len(token_ids)
        if not 1 <= num_tokens <= self.max_len:
            raise ValueError(f"a sequence of {num_tokens} tokens does not fit the scorer's "
                             f"context of {self.max_len}")
        device = self.loaded.device
        positions = torch.arange(num_tokens, device=device)
        metadata = AttentionMetadata(slot_mapping=positions)
        metadata.prefills.append(PrefillChunk(0, num_tokens, 0, None, self._mask(num_tokens)))
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        with self._own_kv_cache(), forward_context(metadata):
            return self.loaded.model(ids, positions)

    @torch.inference_mode()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 log-softmax over the vocabulary of each row of ``hidden``."""
        logits = self.loaded.model.compute_logits(hidden).float()
        return torch.log_softmax(logits, dim=-1)

    def _mask(self, num_tokens: int) -> torch.Tensor | None:
        """None (plain causal) unless a sliding window cuts in, as the runner does."""
        if not (self._window and num_tokens > self._window):
            return None
        position = torch.arange(num_tokens, device=self.loaded.device)
        query, key = position.unsqueeze(1), position.unsqueeze(0)
        return (key <= query) & (key > query - self._window)

    @contextlib.contextmanager
    def _own_kv_cache(self) -> Iterator[None]:
        """Point every attention layer at this scorer's cache for one forward, then put back
        what was there: the model may be shared with an offline `LLM` whose runner owns it."""
        layers = self.loaded.model.attention_layers()
        previous = [(layer.k_cache, layer.v_cache) for layer in layers]
        try:
            for layer, (k_cache, v_cache) in zip(layers, self._caches, strict=True):
                layer.k_cache, layer.v_cache = k_cache, v_cache
            yield
        finally:
            for layer, (k_cache, v_cache) in zip(layers, previous, strict=True):
                layer.k_cache, layer.v_cache = k_cache, v_cache


def kl_sum(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Sum over rows of KL(reference || other), both given as log-probabilities (nats).

    Tokens the reference gives probability 0 contribute 0 (not 0 * inf = NaN).
    """
    probs = reference.exp()
    terms = torch.where(probs > 0, probs * (reference - other), torch.zeros_like(probs))
    return terms.sum().item()
