"""Paged attention behind one call, and the per-step context that feeds it.

The runner orders each step's tokens as [decode tokens..., prefill chunks...] and sets an
``AttentionMetadata`` as the forward context, so model code keeps the signature
``forward(input_ids, positions)``. Each layer writes its new K/V into the paged cache through
``slot_mapping``, then attends:

- decode rows (one query token each) together, as two batched matmuls over K/V gathered from
  their block tables. For a one-token query this beats the fused SDPA kernel on CPU, whose
  per-call overhead dominates such tiny problems;
- each prefill chunk with ``scaled_dot_product_attention`` (causal, offset by what is cached).

This portable path runs on CPU and CUDA alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["AttentionMetadata", "PrefillChunk", "forward_context", "get_forward_context",
           "paged_attention"]


@dataclass
class PrefillChunk:
    token_start: int  # first row of this chunk in the step's flat token stream
    num_tokens: int
    start: int  # position of its first token in the sequence (tokens before it are cached)
    context_slots: torch.Tensor | None  # cache slots of positions [0, start + num_tokens)
    mask: torch.Tensor | None  # bool [num_tokens, context], None when plain causal from 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [B, L] cache slots, padded
    decode_bias: torch.Tensor | None = None  # [B, 1, 1, L] additive float32 mask
    prefills: list[PrefillChunk] = field(default_factory=list)


_context: AttentionMetadata | None = None


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _context
    previous, _context = _context, metadata
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> AttentionMetadata:
    if _context is None:
        raise RuntimeError("attention ran outside a forward_context; the runner sets one")
    return _context


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D]; caches [slots, Hkv, D]. Returns [T, H*D]."""
    meta = get_forward_context()
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    if meta.num_decodes:
        n = meta.num_decodes
        out[:n] = _decode_attention(q[:n], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale)
    return out.flatten(1)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    slots = meta.decode_slots
    length = slots.shape[1]
    # [B, L, Hkv, D] -> [B, Hkv, L, D]; query heads grouped per KV head: [B, Hkv, G, D].
    keys = k_cache[slots.view(-1)].view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[slots.view(-1)].view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores + meta.decode_bias, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).view(batch, num_heads, head_dim)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
                       scale: float) -> torch.Tensor:
    if chunk.context_slots is not None:  # earlier tokens are cached: attend over the cache
        k, v = k_cache[chunk.context_slots], v_cache[chunk.context_slots]
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads != num_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0), attn_mask=chunk.mask,
        is_causal=chunk.mask is None, scale=scale)
    return out.squeeze(0).transpose(0, 1)
