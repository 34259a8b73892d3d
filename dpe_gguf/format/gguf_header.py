"""A lean, read-only GGUF header parser.

``gguf.GGUFReader`` builds a NumPy object for every element of every metadata array, which costs
seconds and hundreds of MB for a 128k-token vocabulary. The converter only needs each key/value
record's byte range and a few values, and each tensor's name, shape, type and data range, so this
module walks the header with ``struct`` over a memory map and decodes values only when asked.

The objects mimic the part of ``GGUFReader`` that ``dpe_gguf`` uses: ``fields[key].contents()``,
``tensors[i].name / .shape / .tensor_type / .n_bytes / .data_offset``, ``alignment``,
``data_offset``. Tensor data is never touched here (see :meth:`GGUFHeader.tensor_bytes`).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpe_gguf.errors import DPEError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
MAX_ARRAY_DEPTH = 16

# GGUFValueType ids -> struct format of scalar types.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Corrupt(Exception):
    pass


@dataclass(frozen=True)
class HeaderField:
    """One key/value record: ``offset`` and ``size`` span the whole record (key included)."""

    name: str
    offset: int
    size: int
    vtype: int
    value_offset: int
    _header: GGUFHeader

    def contents(self) -> Any:
        """The value as Python data (scalars, str, lists), like ``ReaderField.contents()``. Strings are
        decoded here, not when the header is parsed, so invalid UTF-8 in a value is found here too."""
        what = f"the value of key {self.name!r} (key/value record at byte offset {self.offset})"
        return self._header._decode(self.value_offset, self.vtype, what)[0]

    @property
    def array_type(self) -> int | None:
        """Element type id of an array value, else None."""
        if self.vtype != _ARRAY:
            return None
        return struct.unpack_from("<I", self._header._mm, self.value_offset)[0]


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor info: ``shape`` is the ggml dims (ne0 first), ``data_offset`` is absolute."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int
    n_bytes: int
    data_offset: int
    info_offset: int


class GGUFHeader:
    """The parsed header of a GGUF file (see the module docstring). Raises :class:`DPEError` for a file
    that is not GGUF, truncated or corrupt."""

    byte_order = "I"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        where = str(self.path)
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if f.read(4) != GGUF_MAGIC:
                    raise DPEError(f"{where}: not a GGUF file (it does not start with the GGUF magic bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise DPEError(f"{where}: cannot read: {e.strerror or e}") from None
        try:
            self._parse()
        except DPEError:
            self.close()
            raise
        except (_Corrupt, struct.error, ValueError, IndexError, OverflowError) as e:
            self.close()
            detail = f" ({e})" if str(e) else ""
            raise DPEError(f"{where}: truncated or corrupt GGUF file{detail}; download or convert it again") from None

    def close(self) -> None:
        """Release the memory map."""
        mm = getattr(self, "_mm", None)
        if mm is not None and not mm.closed:
            mm.close()

    def __enter__(self) -> GGUFHeader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- parsing
    def _parse(self) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        mm = self._mm
        where = str(self.path)
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version & 0xFFFF == 0 and version:
            raise DPEError(f"{where}: big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise DPEError(f"{where}: GGUF version {version} is not supported (only 2 and 3)")
        if n_kv > self.file_size or n_tensors > self.file_size:
            raise _Corrupt("impossible key or tensor count")
        self.version = version
        offs = 24
        self.fields: dict[str, HeaderField] = {}
        for _ in range(n_kv):
            start = offs
            name, offs = self._read_str(offs, f"the key of the key/value record at byte offset {start}")
            (vtype,) = struct.unpack_from("<I", mm, offs)
            offs += 4
            end = self._skip(offs, vtype)
            if name in self.fields:
                raise _Corrupt(f"duplicate key {name}")
            self.fields[name] = HeaderField(name, start, end - start, vtype, offs, self)
            offs = end

        self.alignment = DEFAULT_ALIGNMENT
        align_field = self.fields.get("general.alignment")
        if align_field is not None:
            if align_field.vtype != 4:
                raise _Corrupt("general.alignment must be uint32")
            self.alignment = int(align_field.contents())
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise _Corrupt(f"general.alignment {self.alignment} is not a power of two")

        infos = []
        for i in range(n_tensors):
            start = offs
            name, offs = self._read_str(offs, f"the name of tensor {i} (tensor info at byte offset {start})")
            (n_dims,) = struct.unpack_from("<I", mm, offs)
            if n_dims > 8:
                raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
            dims = struct.unpack_from(f"<{n_dims}Q", mm, offs + 4)
            offs += 4 + 8 * n_dims
            ggml_type, rel = struct.unpack_from("<IQ", mm, offs)
            offs += 12
            infos.append((name, dims, ggml_type, rel, start))
        self.data_offset = (offs + self.alignment - 1) // self.alignment * self.alignment

        self.tensors: list[HeaderTensor] = []
        seen = set()
        for name, dims, ggml_type, rel, start in infos:
            if name in seen:
                raise _Corrupt(f"duplicate tensor {name}")
            seen.add(name)
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor {name} has unknown type id {ggml_type}") from None
            n_elems = int(np.prod(dims, dtype=object)) if dims else 1
            n_bytes = n_elems * type_size // block
            data_offset = self.data_offset + rel
            if data_offset + n_bytes > self.file_size:
                raise _Corrupt(f"tensor {name} ends past the end of the file")
            self.tensors.append(HeaderTensor(name, tuple(int(d) for d in dims), ggml_type, n_bytes,
                                             data_offset, start))

    def _read_str(self, offs: int, what: str) -> tuple[str, int]:
        """The GGUF string at ``offs`` and the offset after it. ``what`` names the string (which key,
        value or tensor, and its record's offset) for the error that invalid UTF-8 is: values are
        decoded lazily, long after parsing, so this error carries the file name itself."""
        (n,) = struct.unpack_from("<Q", self._mm, offs)
        end = offs + 8 + n
        if end > self.file_size:
            raise _Corrupt("string runs past the end of the file")
        try:
            return self._mm[offs + 8:end].decode("utf-8"), end
        except UnicodeDecodeError as e:
            bad = offs + 8 + e.start
            raise DPEError(f"{self.path}: {what} is not valid UTF-8 (byte {self._mm[bad]:#04x} at byte offset "
                           f"{bad}: {e.reason}); the file is corrupt, download or convert it again") from None

    def _skip(self, offs: int, vtype: int, depth: int = 0) -> int:
        """Offset just after a value of type ``vtype`` starting at ``offs``. Arrays of arrays are walked
        to a depth of ``MAX_ARRAY_DEPTH`` (llama.cpp reads none): 12 bytes per level would otherwise
        let a few kilobytes of header exhaust Python's recursion limit."""
        if vtype in _SCALAR:
            return offs + struct.calcsize("<" + _SCALAR[vtype])
        if vtype == _STRING:
            (n,) = struct.unpack_from("<Q", self._mm, offs)
            end = offs + 8 + n
        elif vtype == _ARRAY:
            itype, count = struct.unpack_from("<IQ", self._mm, offs)
            offs += 12
            if itype in (_STRING, _ARRAY) and count * (8 if itype == _STRING else 12) > self.file_size - offs:
                # each element takes at least 8 (12) bytes: refuse at once rather than walk the whole file
                raise _Corrupt(f"array of {count} elements runs past the end of the file")
            if itype in _SCALAR:
                end = offs + count * struct.calcsize("<" + _SCALAR[itype])
            elif itype == _STRING:
                unpack = struct.Struct("<Q").unpack_from
                mm = self._mm
                for _ in range(count):
                    offs += 8 + unpack(mm, offs)[0]
                end = offs
            elif itype == _ARRAY:
                if depth >= MAX_ARRAY_DEPTH:
                    raise _Corrupt(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
                for _ in range(count):
                    offs = self._skip(offs, _ARRAY, depth + 1)
                end = offs
            else:
                raise _Corrupt(f"unknown array element type {itype}")
        else:
            raise _Corrupt(f"unknown value type {vtype}")
        if end > self.file_size:
            raise _Corrupt("value runs past the end of the file")
        return end

    def _decode(self, offs: int, vtype: int, what: str) -> tuple[Any, int]:
        mm = self._mm
        if vtype in _SCALAR:
            fmt = "<" + _SCALAR[vtype]
            return struct.unpack_from(fmt, mm, offs)[0], offs + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._read_str(offs, what)
        itype, count = struct.unpack_from("<IQ", mm, offs)
        offs += 12
        if itype in _SCALAR:
            dtype = np.dtype("<" + _SCALAR[itype])
            values = np.frombuffer(mm, dtype=dtype, count=count, offset=offs).tolist()
            return values, offs + count * dtype.itemsize
        values = []
        for i in range(count):
            value, offs = self._decode(offs, itype, f"element {i} of {what}")
            values.append(value)
        return values, offs

    # -- access
    def field_bytes(self, field: HeaderField) -> bytes:
        """The raw bytes of a key/value record."""
        return self._mm[field.offset:field.offset + field.size]

    def tensor_info_bytes(self, tensor: HeaderTensor) -> tuple[bytes, bytes, int]:
        """(raw name bytes, raw dims bytes, ggml type) of a tensor info record."""
        (n,) = struct.unpack_from("<Q", self._mm, tensor.info_offset)
        name = self._mm[tensor.info_offset + 8:tensor.info_offset + 8 + n]
        dims_start = tensor.info_offset + 8 + n + 4
        return name, self._mm[dims_start:dims_start + 8 * len(tensor.shape)], tensor.tensor_type

    def tensor_bytes(self, tensor: HeaderTensor) -> bytes:
        """A copy of one tensor's data (for small tensors only)."""
        return self._mm[tensor.data_offset:tensor.data_offset + tensor.n_bytes]
