"""The GGUF container: header, metadata and tensor table, with the tensor data memory-mapped.

The `gguf` package has a reader too, but it builds a numpy view per array element: opening a file
with a 50k-token vocabulary takes seconds, once in every process that opens it. This parser reads
the same layout (GGUF v2 and v3, little-endian) with `struct` in a fraction of that; the `gguf`
package still supplies the type table and the dequantizers.

Layout: magic "GGUF", version u32, tensor count u64, metadata count u64; the metadata as
(key, value type u32, value); the tensor table as (name, n_dims u32, dims u64..., type u32,
offset u64); then, at the next multiple of `general.alignment` (32 by default), the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFFile", "GGUFFormatError", "TensorInfo"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numbers; every other type is blocks of bytes.
_PLAIN_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2",
                 "I32": "<i4", "I64": "<i8"}


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (a cut-short or damaged file)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # ggml's name ("Q4_K"), or "type N" for an id this gguf package lacks
    dims: tuple[int, ...]  # ggml order: dims[0] is the length of a row
    offset: int  # from the start of the file
    nbytes: int | None  # None for an unknown type

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order: (rows, ..., row length)."""
        return tuple(reversed(self.dims))


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> Python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self._parse()
        except GGUFFormatError:
            raise
        except (struct.error, ValueError, OverflowError, IndexError, MemoryError) as error:
            raise GGUFFormatError(f"is truncated or damaged inside its header ({error})"
                                  ) from error

    def array(self, info: TensorInfo) -> np.ndarray:
        """The stored data of a tensor, read-only and zero-copy: plain types as numbers in
        `info.shape`, block types as uint8 rows of blocks."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        assert info.nbytes is not None, info
        if info.type_name in _PLAIN_DTYPES:
            dtype, shape = np.dtype(_PLAIN_DTYPES[info.type_name]), info.shape
        else:
            dtype = np.dtype(np.uint8)
            shape = quant_shape_to_byte_shape(info.shape, GGMLQuantizationType[info.type_name])
        return np.frombuffer(self._map, dtype, info.nbytes // dtype.itemsize,
                             info.offset).reshape(shape)

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self) -> None:
        if self._map[:4] != b"GGUF":
            raise GGUFFormatError("does not start with 'GGUF'")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise GGUFFormatError(f"has GGUF version {version} (big-endian or unknown); "
                                  "Surge reads little-endian versions 2 and 3")
        tensor_count, metadata_count = self._scalar(10), self._scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(metadata_count):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        table = [self._tensor_entry() for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = {name: _tensor_info(name, dims, type_id, data_start + offset)
                        for name, dims, type_id, offset in table}
        self._check_sizes()

    def _check_sizes(self) -> None:
        size = len(self._map)
        for info in self.tensors.values():
            if info.nbytes is not None and info.offset + info.nbytes > size:
                raise GGUFFormatError(f"is truncated: tensor {info.name} needs bytes up to "
                                      f"{info.offset + info.nbytes}, the file has {size}")

    def _tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        dims = tuple(self._scalar(10) for _ in range(self._scalar(4)))
        return name, dims, self._scalar(4), self._scalar(10)

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            return self._array()
        if kind not in _SCALARS:
            raise GGUFFormatError(f"has metadata of unknown type {kind}")
        return self._scalar(kind)

    def _array(self) -> list[Any]:
        kind, count = self._scalar(4), self._scalar(10)
        if kind in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[kind])
            values = np.frombuffer(self._map, dtype, count, self._pos)
            self._pos += count * dtype.itemsize
            return values.tolist()
        return [self._value(kind) for _ in range(count)]

    def _scalar(self, kind: int) -> Any:
        fmt = _SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        if start + length > len(self._map):
            raise GGUFFormatError("is truncated inside a string of its header")
        self._pos = start + length
        return self._map[start:self._pos].decode("utf-8")


def _tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(type_id)
    except ValueError:
        return TensorInfo(name, f"type {type_id}", dims, offset, None)
    block_values, block_bytes = GGML_QUANT_SIZES[kind]
    elements = int(np.prod(dims, dtype=np.int64))
    if elements % block_values:
        raise GGUFFormatError(f"lists tensor {name} with {elements} values, not a whole number "
                              f"of {kind.name} blocks")
    return TensorInfo(name, kind.name, dims, offset, elements // block_values * block_bytes)
