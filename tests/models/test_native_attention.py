"""The C++ decode attention op of compiled steps computes what the Python op does (against both
of the Python op's paths: SDPA for small batches, two matmuls for large ones; in each dtype a
KV cache has), and a machine that cannot build it keeps the Python op."""

from __future__ import annotations

import logging

import pytest
import torch

from surge.engine.compiled_decode import cpp_compiler
from surge.models import attention, native_attention
from surge.models.attention import AttentionMetadata, decode_bias, forward_context
from surge.models.native_attention import decode_context, load_native_ops

needs_compiler = pytest.mark.skipif(cpp_compiler() is None,
                                    reason="the op is built with a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("batch", [3, 20], ids=["sdpa", "matmuls"])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5),
                                                  (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("head_dim", [16, 20])  # 20: past the 16-lane loop
def test_native_decode_attention_equals_the_python_op(batch: int, window: int | None,
                                                      dtype: torch.dtype, tolerance: float,
                                                      head_dim: int) -> None:
    assert load_native_ops()
    torch.manual_seed(0)
    num_kv_heads, group, block_size, blocks = 2, 3, 4, 5
    caches = [torch.randn(num_kv_heads, 128, block_size, head_dim, dtype=dtype)
              for _ in range(2)]
    table = torch.randperm(127)[:batch * blocks].view(batch, blocks) + 1
    lengths = torch.randint(1, blocks * block_size + 1, (batch,))
    # Each row's new token goes to its last visible slot.
    last = (lengths - 1).div(block_size, rounding_mode="floor")
    slots = table.gather(1, last[:, None]).squeeze(1) * block_size + (lengths - 1) % block_size
    bias = decode_bias(lengths, blocks * block_size, window, num_kv_heads, dtype)
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=batch, decode_block_table=table,
                             decode_bias=bias)
    q = torch.randn(batch, num_kv_heads * group, head_dim, dtype=dtype)
    k, v = torch.randn(2, batch, num_kv_heads, head_dim, dtype=dtype)
    python_caches = [c.clone() for c in caches]
    with forward_context(meta):
        want = attention._paged_attention(q, k, v, *python_caches, 0.25)
    with decode_context(slots, table, lengths, window):
        got = torch.ops.surge.decode_attention(q, k, v, *caches, 0.25)
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    for native, python in zip(caches, python_caches, strict=True):
        assert torch.equal(native, python)  # the new K/V written at the same slots


@needs_compiler
def test_the_op_outside_a_step_is_a_clear_error() -> None:
    assert load_native_ops()
    q = torch.randn(1, 2, 8)
    cache = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="outside a decode context"):
        torch.ops.surge.decode_attention(q, q[:, :1], q[:, :1], cache, cache.clone(), 1.0)


@needs_compiler
def test_a_block_or_length_outside_the_cache_is_refused_before_reading() -> None:
    assert load_native_ops()
    q = torch.randn(1, 2, 8)
    k = v = q[:, :1]
    cache = torch.zeros(1, 3, 4, 8)  # 3 blocks of 4 slots
    slots = torch.tensor([1])
    with decode_context(slots, torch.tensor([[3]]), torch.tensor([2]), None), pytest.raises(
            RuntimeError, match="block 3 is outside the KV cache's 3 blocks"):
        torch.ops.surge.decode_attention(q, k, v, cache, cache.clone(), 1.0)
    with decode_context(slots, torch.tensor([[1]]), torch.tensor([5]), None), pytest.raises(
            RuntimeError, match=r"length 5 of row 0 is outside 1\.\.4"):
        torch.ops.surge.decode_attention(q, k, v, cache, cache.clone(), 1.0)


def test_without_the_op_compiled_steps_keep_python_attention(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    def fail(**_: object) -> None:
        raise RuntimeError("Error building extension 'surge_decode_attention'\nmore")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(native_attention, "_state", {})
    with caplog.at_level(logging.WARNING):
        assert not load_native_ops()
    assert not native_attention.native_ops_loaded()
    assert ("keep Python attention and int4 layers torch's dequantize: the C++ ops did not build "
            "(Error building extension") in caplog.text
