"""A GGUF file's metadata and tensor table, read lightly.

``gguf.GGUFReader`` keeps every metadata value as numpy views of its parts: for a 49,152-token
vocabulary and its merges that is some 170 MB of small arrays for as long as the reader lives, more
than the quantized model itself. ``GGUFFile`` reads the same header into plain Python values (a
string array becomes a list of ``str``, a numeric array one numpy array) and maps the tensors'
data from the file without reading it, in the shapes ``GGUFReader`` gives them (``data``: the
element type for F16/F32/F64 and the integer types, else the rows' bytes), so
``gguf.quants.dequantize(t.data, t.tensor_type)`` reads them as it reads the reader's.

Format (GGUF v2/v3, little-endian): magic ``GGUF``, version, tensor count, metadata count; each
metadata entry a key, a value type and a value (arrays: element type, count, elements); each
tensor a name, its dimensions (fastest first), its ggml type and its offset in the data section,
which starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TYPED = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as the file lists it: fastest-varying dimension first
    data: np.ndarray  # mapped from the file (rows first)


class GGUFFile:
    """``metadata`` (key -> value) and ``tensors`` (in file order) of a GGUF file; ValueError when
    the bytes are not one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, mode="r")
        self._at = 0
        try:
            self._read()
        except (struct.error, IndexError, UnicodeDecodeError, KeyError, OverflowError) as exc:
            raise ValueError(f"truncated or malformed header ({exc})") from None

    def _read(self) -> None:
        if bytes(self._map[:4]) != MAGIC:
            raise ValueError("no GGUF magic number")
        self._at = 4
        version, n_tensors, n_meta = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2, 3)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_meta):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        table = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            table.append((name, GGMLQuantizationType(self._unpack("<I")), dims, self._unpack("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-self._at // alignment) * alignment
        self.tensors = [
            Tensor(name, kind, dims, self._data(start + offset, kind, dims)) for name, kind, dims, offset in table
        ]

    def release(self, tensor: Tensor) -> None:
        """Drop the pages of ``tensor``'s data from this process (read again from the page cache
        if touched again): a loader that has converted a tensor keeps its memory to what it made."""
        start = tensor.data.ctypes.data - self._map.ctypes.data
        first = start - start % mmap.PAGESIZE
        end = start + tensor.data.nbytes
        if end > first:
            # the memmap's own mmap.mmap, which numpy's stubs leave out
            self._map._mmap.madvise(mmap.MADV_DONTNEED, first, end - first)  # type: ignore[attr-defined]

    def _data(self, offset: int, kind: GGMLQuantizationType, dims: tuple[int, ...]) -> np.ndarray:
        rows = tuple(reversed(dims))
        count = int(np.prod(dims, dtype=np.int64))
        if kind in _TYPED:
            dtype = np.dtype(_TYPED[kind])
            return self._map[offset : offset + count * dtype.itemsize].view(dtype).reshape(rows)
        block, size = GGML_QUANT_SIZES[kind]
        if rows[-1] % block:
            raise ValueError(f"a {kind.name} row of {rows[-1]} values is not whole blocks of {block}")
        return self._map[offset : offset + count // block * size].reshape(*rows[:-1], rows[-1] // block * size)

    def _unpack(self, fmt: str) -> Any:
        # an ndarray is a buffer, but numpy's stubs say so only from Python 3.12 (``__buffer__``)
        (value,) = struct.unpack_from(fmt, self._map, self._at)  # type: ignore[arg-type]
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        text = bytes(self._map[self._at : self._at + n]).decode("utf-8")
        if len(text.encode()) != n:
            raise ValueError("a string runs past the end of the file")
        self._at += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<I"), self._unpack("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self._map, dtype, count, self._at).copy()
                self._at += count * dtype.itemsize
                return values
            return [self._value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self._unpack(_SCALARS[kind])
