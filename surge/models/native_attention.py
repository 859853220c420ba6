"""The C++ decode attention op of compiled decode steps (``csrc/decode_attention.cpp``).

A compiled step (surge.engine.compiled_decode) is one C++ call, except attention: the Python
op ``surge::paged_attention`` cost ~100 us of dispatch per layer on top of ~50 us of work,
about a quarter of a SmolLM2 batch-1 step. ``surge::decode_attention`` runs the same ATen calls
from C++; the step's slots, block table and mask are set once per step with
``decode_context``. It is built with PyTorch's extension builder on first use (about a minute
on 2 cores, then cached under ``$TORCH_EXTENSIONS_DIR``); where it cannot build, compiled
steps keep the Python op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["decode_context", "load_native_decode", "native_decode_loaded"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
_state: dict[str, bool] = {}


def load_native_decode() -> bool:
    """Build (once per machine) and load the op; False, with a warning, where it cannot."""
    if "loaded" not in _state:
        _state["loaded"] = _build()
    return _state["loaded"]


def native_decode_loaded() -> bool:
    return _state.get("loaded", False)


def _build() -> bool:
    from torch.utils import cpp_extension

    # Progress: the first build on a machine takes seconds to a minute; later loads are cached.
    logger.info("loading the C++ decode attention op (built on first use)")
    try:
        cpp_extension.load(name="surge_decode_attention", sources=[str(_SOURCE)],
                           extra_cflags=["-O3"], is_python_module=False, verbose=False)
    except (OSError, RuntimeError, ImportError) as error:
        logger.warning("compiled decode steps keep Python attention: the C++ op did not "
                       "build (%s)", str(error).splitlines()[0] if str(error) else error)
        return False
    torch.library.register_fake("surge::decode_attention", _output_shape)
    return True


def _output_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


@contextlib.contextmanager
def decode_context(slots: torch.Tensor, table: torch.Tensor, bias: torch.Tensor
                   ) -> Iterator[None]:
    """The step's metadata for ``surge::decode_attention`` while the block runs."""
    torch.ops.surge.set_decode_context(slots, table, bias)
    try:
        yield
    finally:
        torch.ops.surge.clear_decode_context()
