"""Paged attention behind one call, and the per-step context that feeds it.

The runner orders each step's tokens as [decode tokens..., prefill chunks...] and sets an
``AttentionMetadata`` as the forward context, so model code keeps the signature
``forward(input_ids, positions)``. Each layer writes its new K/V into the paged cache through
``slot_mapping``, then attends:

- decode rows (one query token each) together, over K/V gathered from their block tables:
  with the fused SDPA kernel up to ``SDPA_DECODE_MAX_BATCH`` rows, as two batched matmuls
  beyond (where the bf16 bmm's fixed cost no longer dominates);
- each prefill chunk with ``scaled_dot_product_attention`` (causal, offset by what is cached).

The cache of one layer is ``[num_kv_heads, num_blocks, block_size, head_dim]``. Gathering
whole blocks copies long contiguous rows (several times faster than gathering token slots),
and with KV heads outermost the gathered ``[Hkv, B, L, D]`` is already the batched-matmul
layout: no transposing copy of K or V per layer.

This portable path runs on CPU and CUDA alike.

The cache may be stored in a narrower dtype than the model computes in (``--kv-cache-dtype``):
new K/V are quantized as they are written and the gathered blocks are dequantized to the
compute dtype as they are read. int8 keeps one scale per token and KV head (amax / 127, in
bfloat16) in the last two bytes of each cache row, so a row is ``head_dim + 2`` bytes and the
block gather stays one contiguous copy; fp8 (float8_e4m3fn) is stored unscaled, clamped to its
+-448 range. A prefill chunk attends over the quantized values too (its own K/V round-tripped),
so a token sees the same keys whether its prompt came in one chunk, many, or from the prefix
cache. When the cache dtype is the compute dtype (the default) nothing of this runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from surge.models.native_attention import native_ops_loaded

__all__ = ["AttentionMetadata", "PrefillChunk", "allocate_kv_cache", "decode_bias",
           "dequantize_kv", "forward_context", "gather_blocks", "get_forward_context",
           "kv_bytes_per_token", "kv_cache_torch_dtype", "paged_attention", "quantize_kv"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT8_MAX = 127
_SCALE_BYTES = 2  # an int8 row ends in its bfloat16 scale
# Decode batches up to this size attend with the fused SDPA kernel, larger ones with two
# batched matmuls. On an AMX Xeon (2 threads, SmolLM2's 3 KV heads x 64) SDPA took 48 against
# 106 us a layer at batch 1, 485 against 561 at 16, and lost at 64 (1743 against 1569): the
# bf16 bmm's fixed cost dominates small batches.
SDPA_DECODE_MAX_BATCH = 16


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


def decode_bias(lengths: torch.Tensor, num_positions: int, window: int | None,
                num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of decode rows: 0 where a row's query sees the key
    position, -inf elsewhere, one row per (KV head, sequence): [Hkv * B, 1, num_positions]."""
    key_pos = torch.arange(num_positions, device=lengths.device).unsqueeze(0)
    lengths = lengths.unsqueeze(1)
    allowed = key_pos < lengths
    if window:
        allowed &= key_pos > lengths - 1 - window
    bias = torch.zeros(allowed.shape, dtype=dtype, device=lengths.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.repeat(num_kv_heads, 1).unsqueeze(1)


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
    if torch.compiler.is_compiling():
        # Opaque to torch.compile: what it reads (block tables, lengths) changes shape every
        # step, and a graph that saw them would recompile for each. Compiled steps are decode
        # steps; the C++ op (surge.models.native_attention) saves the Python dispatch.
        if k_cache.dtype == q.dtype and native_ops_loaded():
            return torch.ops.surge.decode_attention(q, k, v, k_cache, v_cache, scale)
        return torch.ops.surge.paged_attention(q, k, v, k_cache, v_cache, scale)
    return _paged_attention(q, k, v, k_cache, v_cache, scale)


# A plain library op, not ``torch.library.custom_op``: its Python wrapper cost 28 us a call
# (a layer's whole attention is ~55 us at batch 1), this one nothing measurable.
_LIBRARY = torch.library.Library("surge", "DEF")
_LIBRARY.define("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
                "Tensor(b!) v_cache, float scale) -> Tensor")


def _paged_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor,
                           scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    meta = get_forward_context()
    if k_cache.dtype != q.dtype:
        _write_quantized(k_cache, meta.slot_mapping, k)
        _write_quantized(v_cache, meta.slot_mapping, v)
    else:
        num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
        k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping,
                                                             k.transpose(0, 1))
        v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping,
                                                             v.transpose(0, 1))
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


_LIBRARY.impl("paged_attention", _paged_attention, "CompositeExplicitAutograd")
torch.library.register_fake("surge::paged_attention", _paged_attention_shape, lib=_LIBRARY)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[Hkv, blocks, block_size, D] at ``block_ids`` (any shape) -> [Hkv, n * block_size, D]."""
    num_kv_heads, _, block_size, head_dim = cache.shape
    storage = _storage(cache)
    rows = storage.view(num_kv_heads, cache.shape[1], block_size * head_dim)
    out = rows.index_select(1, block_ids.reshape(-1)).view(num_kv_heads, -1, head_dim)
    return out if storage is cache else out.view(cache.dtype)


def _read(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype,
          length: int | None = None) -> torch.Tensor:
    """The blocks' first ``length`` slots in the compute dtype: [Hkv, n, D]."""
    rows = gather_blocks(cache, block_ids)
    if length is not None:
        rows = rows[:, :length]
    return rows if cache.dtype == dtype else dequantize_kv(rows, dtype)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    table = meta.decode_block_table
    # Query heads grouped under their KV head, (KV head, sequence) as the batch: [Hkv*B, G, D].
    grouped = q.view(batch, num_kv_heads, group, head_dim).transpose(0, 1).reshape(
        num_kv_heads * batch, group, head_dim)
    if k_cache.dtype == torch.int8:
        out = _int8_decode(grouped, k_cache, v_cache, table, meta.decode_bias, scale)
        return out.view(num_kv_heads, batch, group, head_dim).transpose(0, 1).reshape(
            batch, num_heads, head_dim)
    keys = _read(k_cache, table, q.dtype).view(num_kv_heads * batch, -1, head_dim)
    values = _read(v_cache, table, q.dtype).view(num_kv_heads * batch, -1, head_dim)
    if batch <= SDPA_DECODE_MAX_BATCH:
        # [B, Hkv, G, D] against [B, Hkv, L, D]: the group's query heads as G query rows.
        out = F.scaled_dot_product_attention(
            q.view(batch, num_kv_heads, group, head_dim), _per_sequence(keys, num_kv_heads),
            _per_sequence(values, num_kv_heads),
            attn_mask=_per_sequence(meta.decode_bias, num_kv_heads), scale=scale)
        return out.reshape(batch, num_heads, head_dim)
    # Scores in the model dtype, softmax in float32: Hugging Face's eager order, in 3 kernels.
    scores = torch.baddbmm(meta.decode_bias, grouped, keys.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.bmm(probs, values).view(num_kv_heads, batch, group, head_dim)
    return out.transpose(0, 1).reshape(batch, num_heads, head_dim)


def _per_sequence(rows: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hkv * B, L, X] (KV head outermost) as the view [B, Hkv, L, X]."""
    return rows.view(num_kv_heads, -1, *rows.shape[1:]).transpose(0, 1)


def _int8_decode(grouped: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 table: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention over int8 rows with their scales applied to the scores and the
    probabilities ([rows, G, L]: G/D the size of K or V) instead of to every cached value."""
    rows, _, head_dim = grouped.shape
    dtype = grouped.dtype
    k_rows, v_rows = gather_blocks(k_cache, table), gather_blocks(v_cache, table)
    keys = k_rows[..., :head_dim].to(dtype).view(rows, -1, head_dim)
    values = v_rows[..., :head_dim].to(dtype).view(rows, -1, head_dim)
    k_scale = _int8_scales(k_rows, dtype).view(rows, 1, -1)
    v_scale = _int8_scales(v_rows, dtype).view(rows, 1, -1)
    # A padded slot has scale 0 and bias -inf: multiply first, then add, so no 0 * -inf.
    scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(k_scale * scale).add_(bias)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype).mul_(v_scale)
    return torch.bmm(probs, values)


def _int8_scales(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bfloat16 scale at the end of each int8 row, as [..., 1] in ``dtype``."""
    return rows[..., rows.shape[-1] - _SCALE_BYTES:].contiguous().view(torch.bfloat16).to(dtype)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
                       scale: float) -> torch.Tensor:
    end = chunk.start + chunk.num_tokens
    if chunk.context_blocks is not None:  # earlier tokens are cached: attend over the cache
        k = _read(k_cache, chunk.context_blocks, q.dtype, end)
        v = _read(v_cache, chunk.context_blocks, q.dtype, end)
    elif k_cache.dtype != q.dtype:  # see the values the cache keeps, as later tokens will
        k = dequantize_kv(quantize_kv(k, k_cache.dtype), q.dtype).transpose(0, 1)
        v = dequantize_kv(quantize_kv(v, v_cache.dtype), q.dtype).transpose(0, 1)
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


# -- the cache's storage dtype -----------------------------------------------------------------


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of ``--kv-cache-dtype`` ``name`` (auto: the model's)."""
    dtypes = {"auto": model_dtype, "bfloat16": torch.bfloat16, "float32": torch.float32,
              "int8": torch.int8, "fp8": torch.float8_e4m3fn}
    if name not in dtypes:
        raise ValueError(f"kv_cache_dtype={name!r} is invalid: allowed is one of "
                         f"{', '.join(dtypes)}")
    return dtypes[name]


def _row_width(cache_dtype: torch.dtype, head_dim: int) -> int:
    """Elements of one cached (token, KV head) row: int8 rows carry their scale."""
    return head_dim + _SCALE_BYTES if cache_dtype == torch.int8 else head_dim


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       cache_dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies across all layers, scales included."""
    row = _row_width(cache_dtype, head_dim) * cache_dtype.itemsize
    return 2 * num_layers * num_kv_heads * row


def allocate_kv_cache(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int,
                      cache_dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One layer's zeroed K (or V) cache: [Hkv, blocks, block_size, row]. Zeroed, so padded
    decode rows read 0 (an int8 row's zero scale included), never NaN."""
    shape = (num_kv_heads, num_blocks, block_size, _row_width(cache_dtype, head_dim))
    return torch.zeros(shape, dtype=cache_dtype, device=device)


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """[..., D] in the compute dtype -> rows as the cache stores them ([..., D + 2] for int8)."""
    if cache_dtype == torch.int8:
        amax = x.abs().amax(dim=-1, keepdim=True).float()
        scale = (amax / _INT8_MAX).clamp_min(torch.finfo(torch.bfloat16).tiny).to(
            torch.bfloat16)
        q = (x.float() / scale.float()).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return torch.cat([q, scale.view(torch.int8)], dim=-1)
    if cache_dtype == torch.float8_e4m3fn:  # out-of-range values would become NaN, not clip
        return x.clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def dequantize_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached rows -> [..., D] in ``dtype``; the inverse of `quantize_kv` up to its rounding."""
    if rows.dtype == torch.int8:
        return rows[..., :rows.shape[-1] - _SCALE_BYTES].to(dtype) * _int8_scales(rows, dtype)
    if rows.dtype == torch.float8_e4m3fn:  # a 256-entry table: 7x faster than .to() on CPU
        codes = rows.view(torch.uint8)
        table = _fp8_table(dtype, rows.device)
        return table.index_select(0, codes.reshape(-1).int()).view(codes.shape)
    return rows.to(dtype)


_FP8_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _fp8_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every float8_e4m3fn bit pattern's value in ``dtype``; NaN codes (never written) as 0."""
    key = (dtype, device)
    if key not in _FP8_TABLES:
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(
            torch.float8_e4m3fn).to(torch.float32)
        _FP8_TABLES[key] = values.nan_to_num(0.0).to(dtype=dtype, device=device)
    return _FP8_TABLES[key]


def _storage(cache: torch.Tensor) -> torch.Tensor:
    """The cache as a dtype the CPU copy kernels know (they lack float8): same bytes."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def _write_quantized(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Quantize [T, Hkv, D] and store it at ``slots`` (block * block_size + offset)."""
    num_kv_heads, row = cache.shape[0], cache.shape[-1]
    rows = _storage(quantize_kv(x, cache.dtype)).transpose(0, 1)
    _storage(cache).view(num_kv_heads, -1, row).index_copy_(1, slots, rows)
