"""Compiled decode steps on CPU: the model's forward as one inductor-generated C++ function.

An eager decode step of a small model on CPU is half Python: SmolLM2-135M at batch 1 runs
about 1,500 ops a step, 121 of them the linears that read the weights, and the rest (norms,
rope, residual adds, views, casts) cost ~7 us each in dispatch and allocation. Compiled with
``torch.compile`` (inductor, ``cpp_wrapper``: the wrapper is C++ too, not Python; freezing: the
prepacked weights are constants, so their oneDNN linears stay), those small ops fuse into a few
loops and the step is one call. Measured on SmolLM2, one stream, on a 2-core AMX Xeon: bf16
73.1 tok/s against 30.0 eager, int8 102.7 against 40.2, int4 130.2 against 59.9
(``benchmarks/bench_quant.py --compile-max-batch 16``; llama.cpp on the same GGUF precisions:
60.7, 78.5 and 98.7).

Compiled graphs need fixed shapes, so a step is padded, as CUDA graphs' are
(``surge.engine.cuda_graphs``), to a power-of-two batch bucket: padding rows decode token 0 at
position 0 and write their K/V to a trash slot past the managed blocks. The graph ends with
the LM head (every decode row samples). Attention stays outside the graph as an opaque op:
block tables and lengths change every step, so the graph's shapes are the batch's only, and
one compile serves every sequence length. That op is ``surge::decode_attention``, a C++
kernel that attends straight from the cache blocks (surge.models.native_attention), with the
step's block table and lengths set once per step; the Python ``surge::paged_attention``
serves where it cannot be built or the KV cache is int8/fp8. (Inside the graph, inductor's
attention was faster than the Python op, a batch-1 step 10% shorter, but each block-table
length is then a graph of its own, 30-45 s to compile; made dynamic, that dimension made the
graphs slower than eager.) Each bucket compiles once, at start-up (about a minute on 2 cores
with max-autotune), so no request waits on a compile; larger batches, prefill and mixed steps
run eagerly, where the Python cost is shared by many tokens. Inductor's on-disk graph cache
makes a restart's compile short (int4 SmolLM2, 5 buckets: 41 s against about 4 minutes cold;
int8's graphs hit it too), except for bf16's: they hold oneDNN-packed weights, which that
cache refuses ("mkldnn tensors unpickleable"), so bf16 compiles again at every start-up.
Turning the packing off (``cpp.weight_prepack``) made them cacheable but also turned off the
GEMM templates: 45 tok/s against 77 on one bf16 stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
import types
from collections.abc import Callable
from typing import Protocol

import torch
import torch._inductor.config as inductor_config

from surge.models.attention import AttentionMetadata, decode_bias, forward_context
from surge.models.native_attention import decode_context, load_native_ops

__all__ = ["CompiledDecode", "batch_buckets", "cpp_compiler"]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DecoderLM(Protocol):
    """What a compiled step runs: the model's forward, then its LM head."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


# freezing: the weights are graph constants (oneDNN's packed linears and the GEMM templates
# need them). cpp_wrapper: the step is one C++ call. max_autotune: each linear is timed as
# inductor's C++ GEMM templates (AMX or AVX-512 micro-kernels; for int8 and int4 weights they
# dequantize in registers) against ATen's op, and the faster is kept. On SmolLM2 at
# --compile-max-batch 16 it doubled the start-up compile and gained 1.3x on one stream
# (int8: 59 -> 78 tok/s; batch 16: 226 -> 369).
_INDUCTOR_SETTINGS = {"freezing": True, "cpp_wrapper": True, "max_autotune": True,
                      "max_autotune_gemm_backends": "CPP,ATEN"}


class CompiledDecode:
    """Decode steps of up to ``max_batch`` sequences through a compiled forward."""

    def __init__(self, model: DecoderLM, *, max_batch: int, block_size: int, trash_slot: int,
                 num_kv_heads: int, sliding_window: int | None, dtype: torch.dtype,
                 kv_cache_dtype: torch.dtype):
        self._block_size = block_size
        self._trash_slot = trash_slot
        self._num_kv_heads = num_kv_heads
        self._window = sliding_window
        self._dtype = dtype
        self.buckets = batch_buckets(max_batch)
        _reuse_inductor_templates()
        # Decided before the first trace: the graphs call whichever attention op was there
        # (the C++ op reads a KV cache of the model's dtype; int8 and fp8 caches keep Python).
        self._native = kv_cache_dtype == dtype and load_native_ops()

        # The LM head is in the graph too: every row of a decode step samples, and there its
        # GEMM is autotuned like the others.
        def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return model.compute_logits(model(input_ids, positions))

        # torch.compile keeps its graphs per code object, and a frozen graph holds its model's
        # weights as constants: with a code object of its own, no other engine in the process
        # can reuse this one's graphs, nor this one theirs. That makes skipping the guards on
        # the model's modules safe (this function only ever sees this model, whose modules the
        # runner never replaces), and they cost 0.5 ms a step. dynamic=False: one graph per
        # bucket, never a slower shape-generic one.
        self._forward = torch.compile(
            _with_own_code(forward), fullgraph=True, dynamic=False,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    @torch.inference_mode()
    def compile(self) -> None:
        """Compile every bucket now (its first run), writing only to the trash slot."""
        started = time.perf_counter()
        for done, bucket in enumerate(self.buckets):
            # Progress: each bucket takes tens of seconds before the engine can serve.
            logger.info("compiling decode steps for batches of %d (%d of %d)", bucket,
                        done + 1, len(self.buckets))
            self.run([0] * bucket, [0] * bucket, [self._trash_slot] * bucket, [[0]] * bucket)
        logger.info("compiled decode steps for batches of %s in %.0f s",
                    ", ".join(map(str, self.buckets)), time.perf_counter() - started)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Logits [len(token_ids), vocab] of one decode step (rows as given)."""
        batch = len(token_ids)
        size = next(b for b in self.buckets if b >= batch)
        pad = size - batch
        blocks = max(len(t) for t in tables)
        padded = [t + [0] * (blocks - len(t)) for t in tables] + [[0] * blocks] * pad
        lengths = _tensor([p + 1 for p in positions] + [1] * pad)
        meta = AttentionMetadata(
            slot_mapping=_tensor(slots + [self._trash_slot] * pad), num_decodes=size,
            decode_block_table=_tensor(padded))
        if self._native:  # the C++ op reads lengths, not a mask
            native = decode_context(meta.slot_mapping, meta.decode_block_table, lengths,
                                    self._window)
        else:
            meta.decode_bias = decode_bias(lengths, blocks * self._block_size, self._window,
                                           self._num_kv_heads, self._dtype)
            native = contextlib.nullcontext()
        # Inductor's settings are read only when a graph compiles, which after `compile`
        # happens only if a guard fails; set here, such a recompile is slow but still right.
        with forward_context(meta), native, inductor_config.patch(_INDUCTOR_SETTINGS):
            logits = self._forward(_tensor(token_ids + [0] * pad),
                                   _tensor(positions + [0] * pad))
        return logits[:batch]


def _reuse_inductor_templates() -> None:
    """Parse each of inductor's Jinja kernel templates once per process, not once per use.

    Inductor renders its C++ GEMM templates from source strings and parses the string again on
    every render: SmolLM2's 121 linears took 2,685 parses. A parsed ``jinja2.Template`` renders
    any arguments, so the parse is memoized by its source: a bf16 batch-1 bucket compiled in
    44 s instead of 58 (2-core AMX Xeon).
    (PyTorch 2.13's ``KernelTemplate._template_from_string``; elsewhere this does nothing.)
    """
    from torch._inductor.codegen import common

    template = getattr(common, "KernelTemplate", None)
    parse = getattr(template, "_template_from_string", None)
    if parse is None or hasattr(parse, "cache_info"):
        return
    template._template_from_string = staticmethod(functools.lru_cache(maxsize=None)(parse))


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: [1, 2, 4, ..., max]."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch:
        buckets.append(buckets[-1] * 2)
    if max_batch > 1:
        buckets.append(max_batch)
    return buckets


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU code ($CXX, else g++), or None."""
    return shutil.which(os.environ.get("CXX") or "g++")


def _with_own_code(function: Forward) -> Forward:
    """A copy of ``function`` with a code object of its own (equal, not identical)."""
    return types.FunctionType(function.__code__.replace(), function.__globals__,
                              function.__name__, function.__defaults__, function.__closure__)


def _tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)
