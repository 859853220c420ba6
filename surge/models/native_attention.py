"""Surge's C++ CPU ops, built together as one extension: the decode attention op of compiled
decode steps (``csrc/decode_attention.cpp``) and the int4 dequantize of quantized layers'
many-token path (``csrc/int4_dequantize.cpp``, used by surge.models.quantization).

A compiled step (surge.engine.compiled_decode) is one C++ call, except attention. The Python
op ``surge::paged_attention`` gathers each sequence's blocks into a copy and runs SDPA: ~100 us
of dispatch per layer, and ~90 us of work even from C++, for a few us of multiply-adds at
decode sizes. ``surge::decode_attention`` attends straight from the cache blocks, each key and
value row read once for all the query heads that share it; the step's slots, block table and
lengths are set once per step with ``decode_context``. It is built for this machine's CPU
(``-march=native``) with PyTorch's extension builder on first use (seconds to a minute on 2
cores, then cached under ``$TORCH_EXTENSIONS_DIR``, per CPU model); where it cannot build,
compiled steps keep the Python op and int4 layers dequantize with torch ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["decode_context", "load_native_ops", "native_ops_loaded"]

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("decode_attention.cpp", "int4_dequantize.cpp")]
_state: dict[str, bool] = {}


def load_native_ops() -> bool:
    """Build (once per machine) and load the ops; False, with a warning, where they cannot."""
    if "loaded" not in _state:
        _state["loaded"] = _build()
    return _state["loaded"]


def native_ops_loaded() -> bool:
    return _state.get("loaded", False)


def _build() -> bool:
    from torch.utils import cpp_extension

    # Progress: the first build on a machine takes seconds to a minute; later loads are cached.
    logger.info("loading Surge's C++ CPU ops (built on first use)")
    try:
        cpp_extension.load(name=f"surge_cpu_ops_{_cpu_tag()}",
                           sources=[str(source) for source in _SOURCES],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except (OSError, RuntimeError, ImportError) as error:
        logger.warning("compiled decode steps keep Python attention and int4 layers torch's "
                       "dequantize: the C++ ops did not build (%s)",
                       str(error).splitlines()[0] if str(error) else error)
        return False
    torch.library.register_fake("surge::decode_attention", _output_shape)
    return True


def _cpu_tag() -> str:
    """A short digest of this CPU's model and features: a build for -march=native runs only
    on CPUs like the one it was built on, and the extension cache may be shared (a home
    directory on several machines), so each kind of CPU gets a build of its own."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    described = [line for line in cpuinfo if line.startswith(("model name", "flags"))][:2]
    identity = "\n".join([platform.machine(), platform.processor(), *described])
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _output_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


@contextlib.contextmanager
def decode_context(slots: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
                   window: int | None) -> Iterator[None]:
    """The step's metadata for ``surge::decode_attention`` while the block runs: each row's
    new-token slot, block table (int64 [B, blocks]) and number of positions (int64 [B]), and
    the sliding window (None: none)."""
    torch.ops.surge.set_decode_context(slots, table, lengths, window or 0)
    try:
        yield
    finally:
        torch.ops.surge.clear_decode_context()
