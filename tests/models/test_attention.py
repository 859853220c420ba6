"""Decode attention: the fused SDPA path (small batches) and the two-matmul path (large ones)
agree, so a sequence's tokens do not depend on how many others share its step."""

from __future__ import annotations

import pytest
import torch

from surge.models import attention
from surge.models.attention import AttentionMetadata, decode_bias


@pytest.mark.parametrize("window", [None, 20])
def test_sdpa_and_matmul_decode_paths_agree(monkeypatch: pytest.MonkeyPatch,
                                           window: int | None) -> None:
    torch.manual_seed(0)
    num_kv_heads, group, head_dim, block_size, batch, blocks = 2, 3, 16, 4, 5, 6
    k_cache = torch.randn(num_kv_heads, 40, block_size, head_dim)
    v_cache = torch.randn(num_kv_heads, 40, block_size, head_dim)
    table = torch.randperm(40)[:batch * blocks].view(batch, blocks)
    lengths = torch.tensor([1, 7, 24, 13, 22])  # padded rows of the table are masked
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.long), num_decodes=batch,
        decode_block_table=table,
        decode_bias=decode_bias(lengths, blocks * block_size, window, num_kv_heads,
                                torch.float32))
    q = torch.randn(batch, num_kv_heads * group, head_dim)
    fused = attention._decode_attention(q, k_cache, v_cache, meta, 0.25)
    monkeypatch.setattr(attention, "SDPA_DECODE_MAX_BATCH", 0)
    matmuls = attention._decode_attention(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(fused, matmuls, rtol=1e-5, atol=1e-5)
    # And both are attention over each row's own visible keys: row 0 sees only position 0.
    values = v_cache[:, table[0, 0], 0]  # [Hkv, D]
    expected = values.repeat_interleave(group, dim=0)  # softmax over one key is 1
    torch.testing.assert_close(fused[0], expected)
