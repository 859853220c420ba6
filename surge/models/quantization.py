"""Weight-only quantized linear layers (int8, int4) behind the linear-method seam.

The decoder's projections are quantized, and by default the LM head to int8 (with a token
embedding tied to it: `quantize_lm_head`, off with ``--no-quantize-lm-head``); activations and
the KV cache keep the serving dtype (bfloat16 or float32), and every product is computed in
that dtype from weights dequantized on the fly, so the only error is the weights' rounding:

- **int8** (`Int8LinearMethod`): one symmetric scale per output row,
  ``scale = max|w_row| / 127`` (rounded to the serving dtype), ``q = round(w / scale)`` in
  [-127, 127]. Each weight moves by at most ``scale / 2``, i.e. 0.4% of its row's largest weight;
  a bfloat16 scale adds a relative error below 2^-9 shared by the whole row. Weights read per
  token: 1 byte + 2 bytes per row, about 0.5x bfloat16.
- **int4** (`Int4LinearMethod`, group size 32, 64 or 128): per group of ``G`` consecutive inputs of
  a row an asymmetric range, ``scale = (max - min) / 15``, ``w ~ (q - 8) * scale + zero`` with
  ``q`` in [0, 15] and ``zero = min + 8 * scale``. Each weight moves by at most ``scale / 2``,
  1/30 of its group's range (about 3% of it): smaller groups have tighter ranges and so less
  error, at 4 bytes of scale and zero per group (G=32: 0.625 bytes per weight, 0.31x bfloat16;
  G=128: 0.53 bytes, 0.27x).

Kernels (PyTorch's CPU weight-only ops): ``aten._weight_int8pack_mm`` and
``aten._weight_int4pack_mm_for_cpu`` read the small weights and beat the bfloat16 GEMM for a
few tokens (a decode step of one or a few sequences), but their cost grows with every token,
so above a per-shape token threshold a layer instead dequantizes its weights into one scratch
buffer shared by all layers and runs the dense GEMM (prefill, large batches). The threshold is
measured once per layer shape at load (both paths timed at 1, 2, 4, ... tokens) unless given.

From GGUF files (`checkpoint_tensors`): with ``int4`` and group size 32, Q4_0, Q4_1 and Q4_K
blocks (Q4_K: each 32-weight sub-block) are repacked as they are, codes unchanged and each
block's scale kept (Q4_0 bit for bit in float32; Q4_1/Q4_K's offsets are re-expressed as a zero
point, one float32 rounding; a bfloat16 serving dtype rounds scales and zeros to bfloat16).
Every other stored type, and Q8_0 under ``int8`` (its per-block scales do not fit the per-row
kernel), is dequantized to float32 and quantized as above. Without ``--quantization`` a GGUF
file is dequantized to the serving dtype, as before: on this CPU bfloat16 serves batches
faster (see benchmarks/bench_quant.py), and it is the reference the quantized modes are
judged against.

Stored quantized (`surge optimize quantize`): a Hugging Face directory whose config.json has
``quantization_config = {"quant_method": "surge", "bits": 8 or 4, "group_size": G (int4),
"scale_dtype": "bfloat16" or "float32", "version": 1}`` stores each decoder projection ``P``
(``...q_proj``, ``...down_proj``, ...) as the exact state these methods build at load, so
loading it (`stored_quantization`, ``prequantized=True``) re-quantizes nothing and serves
bit-identical weights:

- int8: ``P.qweight`` int8 [out, in] and ``P.scales`` [out] (``w = qweight * scale``);
- int4: ``P.qweight`` uint8 [out, in / 2], column ``2j`` in the low nibble of byte ``j`` and
  ``2j + 1`` in the high one, codes in [0, 15]; ``P.scales`` and ``P.zeros`` [out, in / G]
  (``w = (code - 8) * scale + zero``);
- a bias, and every tensor that is not a decoder projection, as in any checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surge.config import INT4_GROUP_SIZES, QUANTIZATIONS
from surge.models.linear import Linear, LinearMethod, copy_checked
from surge.models.native_attention import load_native_ops

if TYPE_CHECKING:
    from surge.models.gguf import RawTensor

__all__ = ["INT4_GROUP_SIZES", "QUANTIZATIONS", "Int4LinearMethod", "Int8Embedding",
           "Int8LinearMethod", "StoredQuantization", "WeightOnlyLinearMethod",
           "checkpoint_tensors", "dequantized_weight", "pack_int4_columns",
           "quantization_method", "quantize_lm_head", "stored_quantization",
           "unpack_int4_columns"]

QUANT_DTYPES = (torch.bfloat16, torch.float32)
# Token counts at which the two kernel paths are timed against each other at load. The
# weight-only kernels' cost grows with every token and the dense path's barely does, so the
# last probe is the threshold when no crossover shows (a timing disturbed by a busy machine).
_PROBE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_NEVER = 1 << 30  # before the weights are loaded
# The packed int4 layout of the CPU kernel interleaves blocks of 64 output rows.
_INT4_ROW_BLOCK = 64


def quantization_method(quantization: str, group_size: int, device: torch.device,
                        dtype: torch.dtype, prequantized: bool = False) -> LinearMethod | None:
    """The linear method for ``--quantization`` (None for "none"), or ``ValueError`` saying
    what is allowed where the kernels do not run. ``prequantized``: the checkpoint stores
    the quantized tensors (see the module docstring), not float weights."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is invalid: allowed is one of "
                         f"{', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    if device.type != "cpu":
        raise ValueError(f"quantization={quantization!r} runs on CPU only (PyTorch's CPU "
                         f"weight-only kernels); on device {device} allowed is "
                         "quantization='none'")
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"quantization={quantization!r} needs dtype bfloat16 or float32, not "
                         f"{str(dtype).removeprefix('torch.')}")
    if quantization == "int8":
        return Int8LinearMethod(prequantized=prequantized)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_group_size={group_size!r} is invalid: allowed is one "
                         f"of {', '.join(map(str, INT4_GROUP_SIZES))}")
    return Int4LinearMethod(group_size, prequantized=prequantized)


@dataclass(frozen=True)
class StoredQuantization:
    """A checkpoint's ``quantization_config`` written by `surge optimize quantize`."""

    quantization: str  # "int8" or "int4"
    group_size: int  # int4's; 32 (unused) for int8
    scale_dtype: str


def stored_quantization(hf: dict[str, Any]) -> StoredQuantization | None:
    """What config.json says the stored projections are (None: float weights), or
    ``ValueError`` for a quantization this version cannot load."""
    config = hf.get("quantization_config")
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else None
    if method != "surge":
        raise ValueError(f"config.json's quantization_config has quant_method={method!r}: "
                         "Surge loads only its own ('surge', written by `surge optimize "
                         "quantize`); give the float checkpoint and --quantization int8|int4")
    bits, group_size = config.get("bits"), config.get("group_size") or 32
    if bits not in (4, 8) or (bits == 4 and group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"config.json's quantization_config bits={bits!r}, group_size="
                         f"{group_size!r} is invalid: allowed is bits 8, or bits 4 with a "
                         f"group_size of {', '.join(map(str, INT4_GROUP_SIZES))}")
    return StoredQuantization(f"int{bits}", group_size, config.get("scale_dtype", "bfloat16"))


class WeightOnlyLinearMethod(LinearMethod):
    """What int8 and int4 share: the bias, the per-step kernel choice and the scratch buffer.

    ``threshold``: from this many tokens in a step on, dequantize and run the dense GEMM
    (None: measured per layer shape when the weights are loaded).
    """

    def __init__(self, threshold: int | None = None) -> None:
        if threshold is not None and threshold < 1:
            raise ValueError(f"threshold={threshold!r} is invalid: allowed is an integer >= 1")
        self.threshold = threshold

    # -- what a format defines ------------------------------------------------------------

    def kernel(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel: [tokens, input_size] -> [tokens, stored rows]."""
        raise NotImplementedError

    def dequantize_into(self, layer: Linear, out: torch.Tensor) -> None:
        """Write the dequantized weight, [stored rows, input_size], into ``out``."""
        raise NotImplementedError

    def stored_rows(self, layer: Linear) -> int:
        return layer.output_size

    def shape_key(self, layer: Linear) -> tuple[Any, ...]:
        return (type(self).__name__, layer.output_size, layer.input_size)

    # -- shared -----------------------------------------------------------------------------

    def create_bias(self, layer: Linear) -> None:
        layer.bias = (nn.Parameter(torch.empty(layer.output_size), requires_grad=False)
                      if layer.has_bias else None)
        if layer.has_bias:
            layer.weight_loaders["bias"] = _load_bias

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, layer.input_size)
        # Compiled (surge.engine.compiled_decode), the weight-only op at every batch size:
        # inductor's max-autotune lowers it to a GEMM template that dequantizes in registers,
        # faster than both eager paths (int8 3072x576 at 16 tokens: 119 us against 446 for
        # dequantize + GEMM here).
        if torch.compiler.is_compiling() or flat.shape[0] < layer.kernel_threshold:
            out = self.kernel(layer, flat)
        else:
            out = self.dense(layer, flat)
        if out.shape[1] != layer.output_size:  # rows padded for the packed layout
            out = out[:, :layer.output_size].contiguous()
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*x.shape[:-1], layer.output_size)

    def dense(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """The many-token path: dequantize into the scratch buffer, then the dense GEMM."""
        return F.linear(x, self.dequantized(layer, x.dtype))

    def dequantized(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        """The layer's weight in ``dtype``, in the shared scratch buffer (valid until the next
        layer's call)."""
        out = _scratch(self.stored_rows(layer) * layer.input_size, dtype, layer.device)
        out = out.view(self.stored_rows(layer), layer.input_size)
        self.dequantize_into(layer, out)
        return out

    def choose_threshold(self, layer: Linear) -> None:
        if self.threshold is not None:
            layer.kernel_threshold = self.threshold
            return
        key = (*self.shape_key(layer), layer.dtype, torch.get_num_threads())
        if key not in _MEASURED:
            _MEASURED[key] = self.measure_threshold(layer)
        layer.kernel_threshold = _MEASURED[key]

    def measure_threshold(self, layer: Linear) -> int:
        """The smallest probed token count at which dequantize + GEMM is no slower than the
        weight-only kernel (best of 3 timings each; a few ms per shape)."""
        for tokens in _PROBE_TOKENS:
            x = torch.randn(tokens, layer.input_size, dtype=layer.dtype, device=layer.device)
            kernel = _best_time(lambda x=x: self.kernel(layer, x))
            dense = _best_time(lambda x=x: self.dense(layer, x))
            if dense <= kernel:
                return tokens
        return _PROBE_TOKENS[-1]


_MEASURED: dict[tuple[Any, ...], int] = {}
_SCRATCH: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer per dtype and device, grown to the largest layer, reused by every layer."""
    key = (dtype, device)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _best_time(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # warm-up: first calls allocate
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _load_bias(layer: nn.Module, tensor: torch.Tensor, shard: int | None) -> None:
    assert isinstance(layer, Linear)
    copy_checked(layer.bias.data[layer.shard_rows(shard)], _as_float(tensor))


def _as_float(tensor: torch.Tensor | RawTensor) -> torch.Tensor:
    """A checkpoint tensor as float32 (GGUF blocks this method cannot keep are decoded)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.float()
    return tensor.dequantize().float()


def _check_rows(layer: Linear, shard: int | None, shape: tuple[int, ...]) -> slice:
    rows = layer.shard_rows(shard)
    expected = (rows.stop - rows.start, layer.input_size)
    if tuple(shape) != expected:
        raise ValueError(f"has shape {tuple(shape)}, the model expects {expected}")
    return rows


def _serving_dtype() -> torch.dtype:
    """The dtype the layer is built in (the loader builds models under it as the default)."""
    dtype = torch.get_default_dtype()
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"weight-only quantization needs dtype bfloat16 or float32, not "
                         f"{str(dtype).removeprefix('torch.')}")
    return dtype


class Int8LinearMethod(WeightOnlyLinearMethod):
    """int8 weights with one scale per output row (see the module docstring for its error).
    ``prequantized``: the checkpoint stores ``qweight`` and ``scales`` instead of ``weight``."""

    def __init__(self, threshold: int | None = None, prequantized: bool = False) -> None:
        super().__init__(threshold)
        self.prequantized = prequantized

    def create_weights(self, layer: Linear) -> None:
        dtype = _serving_dtype()
        layer.register_buffer("qweight", torch.empty(layer.output_size, layer.input_size,
                                                     dtype=torch.int8))
        layer.register_buffer("scales", torch.empty(layer.output_size, dtype=dtype))
        layer.dtype = dtype
        layer.kernel_threshold = _NEVER
        if self.prequantized:
            layer.weight_loaders["qweight"] = _load_stored("qweight", lambda t: t)
            layer.weight_loaders["scales"] = _load_stored("scales", lambda t: t)
        else:
            layer.weight_loaders["weight"] = self.load_weight
        self.create_bias(layer)

    @staticmethod
    def load_weight(layer: nn.Module, tensor: torch.Tensor | RawTensor,
                    shard: int | None) -> None:
        assert isinstance(layer, Linear)
        rows = _check_rows(layer, shard, tuple(tensor.shape))
        codes, scales = quantize_int8(_as_float(tensor), layer.dtype)
        layer.qweight[rows] = codes
        layer.scales[rows] = scales

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.device = layer.qweight.device
        self.choose_threshold(layer)

    def kernel(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scales)

    def dequantize_into(self, layer: Linear, out: torch.Tensor) -> None:
        out.copy_(layer.qweight)
        out.mul_(layer.scales.to(out.dtype)[:, None])

    def dense(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        # The per-row scale applied to the output, as the weight-only kernel does: one pass
        # over the weights (codes to x's dtype, exact) instead of two (3072x576 at 16 tokens:
        # 131 us against 314), and rounding closer to the kernel's.
        codes = _scratch(layer.output_size * layer.input_size, x.dtype, layer.device)
        codes = codes.view(layer.output_size, layer.input_size)
        codes.copy_(layer.qweight)
        return F.linear(x, codes) * layer.scales.to(x.dtype)

    def weight_bytes(self, layer: Linear) -> int:
        bias = 0 if layer.bias is None else layer.bias.nbytes
        return layer.qweight.nbytes + layer.scales.nbytes + bias


class Int8Embedding(nn.Module):
    """A token embedding tied to an int8 LM head: a token's vector is its head row's codes
    times the row's scale, so the two share one copy of the codes."""

    def __init__(self, head: Linear):
        super().__init__()
        self.register_buffer("qweight", head.qweight)
        self.register_buffer("scales", head.scales)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[input_ids].to(self.scales.dtype) * self.scales[input_ids, None]


def quantize_lm_head(model: nn.Module) -> None:
    """Make a decoder's LM head int8 (per-row scales, as ``Int8LinearMethod``), and a token
    embedding tied to it a lookup of the same codes. Called with the serving dtype as the
    default, after loading and before ``process_weights_after_loading``.

    On SmolLM2 the tied head is 28M of its 135M weights and, in bfloat16, 57 MB read every
    step plus 57 MB more for the embedding's own copy (the head's is packed for oneDNN); int8
    keeps one 28 MB copy of the codes.
    """
    head = getattr(model, "lm_head", None)
    if not isinstance(head, Linear) or getattr(head, "weight", None) is None:
        return
    embedding = model.input_embedding()
    quantized = Linear(head.input_size, head.output_size, head.has_bias, Int8LinearMethod())
    Int8LinearMethod.load_weight(quantized, head.weight.detach(), None)
    if head.bias is not None:
        _load_bias(quantized, head.bias.detach(), None)
    if embedding.weight is head.weight:  # tied
        _replace_module(model, embedding, Int8Embedding(quantized))
    model.lm_head = quantized


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError(f"{type(old).__name__} is not a submodule of {type(model).__name__}")


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, per-row scales in ``dtype``) of a float [rows, columns] weight."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scales = scales.to(dtype)
    # Round against the scale the kernel will use, not the float32 one before its rounding.
    codes = (weight / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scales


class Int4LinearMethod(WeightOnlyLinearMethod):
    """int4 weights with a scale and zero point per ``group_size`` inputs of a row (see the
    module docstring for its error)."""

    def __init__(self, group_size: int = 32, threshold: int | None = None,
                 prequantized: bool = False) -> None:
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r} is invalid: allowed is one of "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        super().__init__(threshold)
        self.group_size = group_size
        self.prequantized = prequantized

    def create_weights(self, layer: Linear) -> None:
        if layer.input_size % self.group_size:
            raise ValueError(f"int4 group size {self.group_size} does not divide the layer's "
                             f"input size {layer.input_size}; allowed are group sizes that do "
                             f"(of {', '.join(map(str, INT4_GROUP_SIZES))})")
        layer.dtype = _serving_dtype()
        groups = layer.input_size // self.group_size
        # Loading state, replaced by the packed weight once every shard is in.
        layer.register_buffer("codes", torch.empty(layer.output_size, layer.input_size,
                                                    dtype=torch.uint8))
        layer.register_buffer("group_scales", torch.empty(layer.output_size, groups,
                                                          dtype=torch.float32))
        layer.register_buffer("group_zeros", torch.empty(layer.output_size, groups,
                                                         dtype=torch.float32))
        layer.kernel_threshold = _NEVER
        if self.prequantized:
            layer.weight_loaders["qweight"] = _load_stored("codes", unpack_int4_columns)
            layer.weight_loaders["scales"] = _load_stored("group_scales", lambda t: t)
            layer.weight_loaders["zeros"] = _load_stored("group_zeros", lambda t: t)
        else:
            layer.weight_loaders["weight"] = self.load_weight
        self.create_bias(layer)

    def load_weight(self, layer: nn.Module, tensor: torch.Tensor | RawTensor,
                    shard: int | None) -> None:
        assert isinstance(layer, Linear)
        rows = _check_rows(layer, shard, tuple(tensor.shape))
        blocks = None if isinstance(tensor, torch.Tensor) else gguf_int4_blocks(
            tensor, self.group_size)
        codes, scales, zeros = blocks or quantize_int4(_as_float(tensor), self.group_size,
                                                       layer.dtype)
        layer.codes[rows] = codes
        layer.group_scales[rows] = scales
        layer.group_zeros[rows] = zeros

    def process_weights_after_loading(self, layer: Linear) -> None:
        rows = self.stored_rows(layer)
        codes = _pad_rows(layer.codes, rows).to(torch.int32)
        scales = _pad_rows(layer.group_scales, rows)
        zeros = _pad_rows(layer.group_zeros, rows)
        del layer.codes, layer.group_scales, layer.group_zeros
        layer.register_buffer(
            "qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # The kernel's layout: [groups, rows, (scale, zero)], in the activations' dtype.
        layer.register_buffer(
            "scale_zeros", torch.stack((scales.t(), zeros.t()), dim=-1).to(layer.dtype)
            .contiguous())
        layer.device = layer.qweight.device
        self.choose_threshold(layer)

    def stored_rows(self, layer: Linear) -> int:
        return -(-layer.output_size // _INT4_ROW_BLOCK) * _INT4_ROW_BLOCK

    def shape_key(self, layer: Linear) -> tuple[Any, ...]:
        return (*super().shape_key(layer), self.group_size)

    def kernel(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.qweight, self.group_size,
                                                          layer.scale_zeros)

    def dequantize_into(self, layer: Linear, out: torch.Tensor) -> None:
        if (out.device.type == "cpu" and out.dtype == layer.scale_zeros.dtype
                and load_native_ops()):
            # One pass in C++ (3072x576: 1.7 ms in the torch ops below, on 2 cores).
            torch.ops.surge.dequantize_int4pack(layer.qweight, layer.scale_zeros,
                                                self.group_size, out)
            return
        rows, groups = self.stored_rows(layer), layer.input_size // self.group_size
        grouped = out.view(rows, groups, self.group_size)
        grouped.copy_(unpack_int4(layer.qweight, rows, layer.input_size)
                      .view(rows, groups, self.group_size))
        scale_zeros = layer.scale_zeros.to(out.dtype)
        grouped.sub_(8).mul_(scale_zeros[..., 0].t()[..., None])
        grouped.add_(scale_zeros[..., 1].t()[..., None])

    def weight_bytes(self, layer: Linear) -> int:
        bias = 0 if layer.bias is None else layer.bias.nbytes
        return layer.qweight.nbytes + layer.scale_zeros.nbytes + bias


def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes in [0, 15], float32 scales, float32 zeros) per group of a float weight,
    with ``w ~ (code - 8) * scale + zero``; scales and zeros are rounded to ``dtype`` first,
    so the codes fit the values the kernel will use."""
    rows, columns = weight.shape
    grouped = weight.reshape(rows, columns // group_size, group_size)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(dtype).float()
    zeros = (low + 8 * scales).to(dtype).float()
    codes = ((grouped - zeros[..., None]) / scales[..., None] + 8).round().clamp(0, 15)
    return codes.to(torch.uint8).reshape(rows, columns), scales, zeros


def unpack_int4(packed: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """uint8 codes [rows, columns] of ``_convert_weight_to_int4pack_for_cpu``'s output.

    That layout (PyTorch 2.x, AVX-512 build) holds, per block of 64 rows and per column, 32
    bytes: the low nibble of byte ``i`` is row ``i`` of the block, the high nibble row
    ``32 + i``. Rows are padded to a multiple of 64 before packing, so no other layout occurs.
    """
    blocks = packed.view(rows // _INT4_ROW_BLOCK, columns, _INT4_ROW_BLOCK // 2)
    codes = torch.cat((blocks & 15, blocks >> 4), dim=-1)  # [blocks, columns, 64]
    return codes.transpose(1, 2).reshape(rows, columns)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat((tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])))


def pack_int4_columns(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, columns] in [0, 15] -> [rows, columns / 2], two per byte (column
    ``2j`` in the low nibble of byte ``j``): the stored layout, independent of the kernel's."""
    pairs = codes.to(torch.uint8).view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4_columns`."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def _load_stored(buffer: str, decode: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Callable[[nn.Module, torch.Tensor, int | None], None]:
    """A loader copying a stored quantized tensor (decoded) into ``buffer``'s shard rows."""
    def load(layer: nn.Module, tensor: torch.Tensor, shard: int | None) -> None:
        assert isinstance(layer, Linear)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError("is a GGUF block tensor where a stored Surge quantized tensor "
                             "was expected")
        copy_checked(getattr(layer, buffer)[layer.shard_rows(shard)], decode(tensor))

    return load


# -- GGUF blocks kept as they are ------------------------------------------------------------

_GGUF_BLOCK = 32  # weights per scale in Q4_0, Q4_1 and Q4_K's sub-blocks: int4 group size 32
Int4Blocks = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes, scales, zeros (float32)


def _q4_legacy(blocks: np.ndarray, with_min: bool) -> Int4Blocks:
    """Q4_0 / Q4_1 blocks [rows, n, 18 or 20]: fp16 d (Q4_1: then fp16 m), then 16 bytes whose
    low nibble i is weight i and high nibble weight 16 + i. Q4_0: w = (q - 8) d; Q4_1:
    w = q d + m = (q - 8) d + (m + 8 d)."""
    d = _fp16(blocks[..., 0:2])
    nibbles = blocks[..., -16:]
    codes = np.concatenate((nibbles & 15, nibbles >> 4), axis=-1)
    zeros = _fp16(blocks[..., 2:4]) + 8 * d if with_min else np.zeros_like(d)
    return codes, d, zeros


def _q4_k(blocks: np.ndarray) -> Int4Blocks:
    """Q4_K super-blocks [rows, n, 144] of 8 sub-blocks of 32: fp16 d and dmin, 12 bytes of
    6-bit sub-block scales and mins, 128 bytes of codes (per 64 weights, 32 bytes: low nibbles
    the first sub-block, high nibbles the second). w = d sc q - dmin m
    = (q - 8) (d sc) + (8 d sc - dmin m); d sc is exact in float32."""
    from gguf.quants import Q4_K

    rows, n = blocks.shape[:2]
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])
    sc, m = Q4_K.get_scale_min(blocks[..., 4:16].reshape(rows * n, 12))
    scales = d[..., None] * sc.reshape(rows, n, 8).astype(np.float32)
    zeros = 8 * scales - dmin[..., None] * m.reshape(rows, n, 8).astype(np.float32)
    qs = blocks[..., 16:].reshape(rows, n, 4, 1, 32)
    codes = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 15
    return codes.reshape(rows, n * 8, 32), scales.reshape(rows, -1), zeros.reshape(rows, -1)


def _fp16(pairs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)


# GGUF type -> (bytes per block, weights per block, decoder of [rows, blocks, bytes]).
_GGUF_INT4: dict[str, tuple[int, int, Callable[[np.ndarray], Int4Blocks]]] = {
    "Q4_0": (18, 32, lambda blocks: _q4_legacy(blocks, with_min=False)),
    "Q4_1": (20, 32, lambda blocks: _q4_legacy(blocks, with_min=True)),
    "Q4_K": (144, 256, _q4_k),
}


def gguf_int4_blocks(raw: RawTensor, group_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes, scales, zeros) read straight from Q4_0/Q4_1/Q4_K blocks, in the form
    ``w = (code - 8) * scale + zero``; None when the type or group size does not allow it."""
    if raw.ggml_type not in _GGUF_INT4 or group_size != _GGUF_BLOCK:
        return None
    block_bytes, block_weights, decode = _GGUF_INT4[raw.ggml_type]
    rows, columns = raw.shape
    blocks = np.ascontiguousarray(raw.data).reshape(rows, columns // block_weights, block_bytes)
    codes, scales, zeros = decode(blocks)
    return (torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, columns)),
            torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(zeros, dtype=np.float32)))


def keeps_gguf_blocks(method: LinearMethod, ggml_type: str) -> bool:
    """Whether ``method``'s loader reads GGUF blocks of ``ggml_type`` without decoding them."""
    return (isinstance(method, Int4LinearMethod) and method.group_size == _GGUF_BLOCK
            and ggml_type in _GGUF_INT4)


def checkpoint_tensors(checkpoint: Any, model: nn.Module
                       ) -> Iterator[tuple[str, torch.Tensor | RawTensor]]:
    """The checkpoint's tensors for ``model``: a GGUF file's Q4_0/Q4_1/Q4_K projections stay raw
    blocks where the quantized layer keeps them as they are, everything else as usual."""
    from surge.models.gguf import GGUFCheckpoint

    methods = _linear_methods(model)
    keeps_blocks = any(isinstance(m, Int4LinearMethod) for m in methods.values())
    if not keeps_blocks or not isinstance(checkpoint, GGUFCheckpoint):
        yield from checkpoint.iter_tensors()
        return
    for name in checkpoint.tensor_names():
        raw = checkpoint.raw_tensor(name)
        method = methods.get(_module_of(model, name))
        if method is not None and keeps_gguf_blocks(method, raw.ggml_type):
            yield name, raw
        else:
            yield name, raw.dequantize()


def _linear_methods(model: nn.Module) -> dict[str, LinearMethod]:
    return {path: module.method for path, module in model.named_modules()
            if isinstance(module, Linear)}


def _module_of(model: nn.Module, name: str) -> str | None:
    """The module path a checkpoint tensor lands in, after the model's renaming and packing."""
    rename = getattr(model, "checkpoint_name", lambda n: n)
    packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules", {})
    renamed = rename(name)
    if renamed is None:
        return None
    module_path = renamed.rpartition(".")[0]
    parent, _, projection = module_path.rpartition(".")
    if projection in packed:
        merged = packed[projection][0]
        return f"{parent}.{merged}" if parent else merged
    return module_path


def dequantized_weight(layer: Linear) -> torch.Tensor:
    """A quantized layer's weight as float32 [output_size, input_size] (a copy, for tests and
    error reports)."""
    method = layer.method
    if not isinstance(method, WeightOnlyLinearMethod):
        raise TypeError(f"{type(method).__name__} is not a weight-only quantized method")
    out = torch.empty(method.stored_rows(layer), layer.input_size, dtype=torch.float32)
    method.dequantize_into(layer, out)
    return out[:layer.output_size]
