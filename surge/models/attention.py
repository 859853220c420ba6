"""Paged attention behind one call, and the per-step context that feeds it.

The runner orders each step's tokens as [decode tokens..., prefill chunks...] and sets an
``AttentionMetadata`` as the forward context, so model code keeps the signature
``forward(input_ids, positions)``. Each layer writes its new K/V into the paged cache through
``slot_mapping``, then attends:

- decode rows (one query token each) together, as two batched matmuls over K/V gathered from
  their block tables. For a one-token query this beats the fused SDPA kernel on CPU, whose
  per-call overhead dominates such tiny problems;
- each prefill chunk with ``scaled_dot_product_attention`` (causal, offset by what is cached).

The cache of one layer is ``[num_kv_heads, num_blocks, block_size, head_dim]``. Gathering
whole blocks copies long contiguous rows (several times faster than gathering token slots),
and with KV heads outermost the gathered ``[Hkv, B, L, D]`` is already the batched-matmul
layout: no transposing copy of K or V per layer.

This portable path runs on CPU and CUDA alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["AttentionMetadata", "PrefillChunk", "forward_context", "gather_blocks",
           "get_forward_context", "paged_attention"]


@dataclass
class PrefillChunk:
    token_start: int  # first row of this chunk in the step's flat token stream
    num_tokens: int
    start: int  # position of its first token in the sequence (tokens before it are cached)
    context_blocks: torch.Tensor | None  # blocks holding positions [0, start + num_tokens)
    mask: torch.Tensor | None  # bool [num_tokens, context], None when plain causal from 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each token
    num_decodes: int = 0
    decode_block_table: torch.Tensor | None = None  # [B, max_blocks], padded with block 0
    decode_bias: torch.Tensor | None = None  # [Hkv * B, 1, max_blocks * block_size] additive
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
    """q [T, H, D], k/v [T, Hkv, D]; caches [Hkv, blocks, block_size, D]. Returns [T, H*D]."""
    meta = get_forward_context()
    num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    parts = []
    if meta.num_decodes:
        n = meta.num_decodes
        parts.append(_decode_attention(q[:n], k_cache, v_cache, meta, scale))
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        parts.append(_prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk,
                                        scale))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(q.shape[0], -1)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[Hkv, blocks, block_size, D] at ``block_ids`` (any shape) -> [Hkv, n * block_size, D]."""
    num_kv_heads, _, block_size, head_dim = cache.shape
    rows = cache.view(num_kv_heads, cache.shape[1], block_size * head_dim)
    return rows.index_select(1, block_ids.reshape(-1)).view(num_kv_heads, -1, head_dim)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    table = meta.decode_block_table
    keys = gather_blocks(k_cache, table).view(num_kv_heads * batch, -1, head_dim)
    values = gather_blocks(v_cache, table).view(num_kv_heads * batch, -1, head_dim)
    # Query heads grouped under their KV head, (KV head, sequence) as the batch: [Hkv*B, G, D].
    grouped = q.view(batch, num_kv_heads, group, head_dim).transpose(0, 1).reshape(
        num_kv_heads * batch, group, head_dim)
    # Scores in the model dtype, softmax in float32: Hugging Face's eager order, in 3 kernels.
    scores = torch.baddbmm(meta.decode_bias, grouped, keys.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.bmm(probs, values).view(num_kv_heads, batch, group, head_dim)
    return out.transpose(0, 1).reshape(batch, num_heads, head_dim)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
                       scale: float) -> torch.Tensor:
    end = chunk.start + chunk.num_tokens
    if chunk.context_blocks is not None:  # earlier tokens are cached: attend over the cache
        k = gather_blocks(k_cache, chunk.context_blocks)[:, :end]
        v = gather_blocks(v_cache, chunk.context_blocks)[:, :end]
    else:
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    num_heads, num_kv_heads = q.shape[1], k.shape[0]
    if num_kv_heads != num_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=0)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=chunk.mask,
        is_causal=chunk.mask is None, scale=scale)
    return out.squeeze(0).transpose(0, 1)
