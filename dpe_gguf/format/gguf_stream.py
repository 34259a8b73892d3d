"""Streaming GGUF rewrite: copy a GGUF file's metadata and tensors as raw bytes, dropping some and
appending others, without ever holding tensor data in memory.

The output layout is the canonical one (gguf-py's ``GGUFWriter`` and llama.cpp write the same):
header, key/values, tensor infos, padding to the alignment, then each tensor's bytes padded to the
alignment. Key/value records are copied byte for byte from the input, so every key keeps its type,
value and order. Tensor data is copied with ``os.copy_file_range`` (no user-space copy) where the
kernel supports it, else through one reusable buffer; memory use does not depend on the model size.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_header import GGUFHeader

CHUNK_BYTES = 64 * 1024 * 1024
_FALLBACK_BUFFER_BYTES = 8 * 1024 * 1024

# gguf value types used for the keys we add (GGUFValueType in gguf-py).
_T_UINT32 = 4
_T_STRING = 8
_T_ARRAY = 9


def _gguf_string(s: str | bytes) -> bytes:
    data = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(data)) + data


def kv_uint32(key: str, value: int) -> bytes:
    """One encoded key/value record of type uint32."""
    return _gguf_string(key) + struct.pack("<II", _T_UINT32, value)


def kv_string(key: str, value: str) -> bytes:
    """One encoded key/value record of type string."""
    return _gguf_string(key) + struct.pack("<I", _T_STRING) + _gguf_string(value)


def kv_uint32_array(key: str, values: list[int] | tuple[int, ...]) -> bytes:
    """One encoded key/value record of type array of uint32."""
    return (_gguf_string(key) + struct.pack("<IIQ", _T_ARRAY, _T_UINT32, len(values))
            + struct.pack(f"<{len(values)}I", *values))


@dataclass(frozen=True)
class NewTensor:
    """A tensor to append: ggml dims (ne0 first), ggml type id and its raw bytes."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    data: bytes


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def plan_size(reader: GGUFHeader, drop_keys: set[str], drop_tensors: set[str], new_tensors: list[NewTensor]) -> int:
    """Upper bound of the output size in bytes (for a free-space check)."""
    align = int(reader.alignment)
    total = int(reader.data_offset) + 1024 + sum(len(t.data) + len(t.name) + 64 for t in new_tensors)
    total += sum(_pad(int(t.n_bytes), align) for t in reader.tensors if t.name not in drop_tensors)
    return total + sum(_pad(len(t.data), align) for t in new_tensors)


def write_gguf(reader: GGUFHeader, src_path: Path, dst: BinaryIO, *, drop_keys: set[str] | None = None,
               drop_key_prefix: str | None = None, drop_tensors: set[str] | None = None,
               new_kv: list[bytes] | None = None, new_tensors: list[NewTensor] | None = None,
               progress: Any = None) -> None:
    """Write the GGUF whose header is ``reader`` to the unbuffered binary file ``dst``, minus the keys in
    ``drop_keys`` (or starting with ``drop_key_prefix``) and the tensors in ``drop_tensors``, plus the
    encoded records ``new_kv`` (after the input's keys) and ``new_tensors`` (after the input's tensors).
    ``progress`` is an optional object with ``update(n_bytes)``."""
    drop_keys = drop_keys or set()
    drop_tensors = drop_tensors or set()
    new_kv = new_kv or []
    new_tensors = new_tensors or []
    align = int(reader.alignment)

    kv_records = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in drop_keys:
            continue
        if drop_key_prefix is not None and name.startswith(drop_key_prefix):
            continue
        kv_records.append(reader.field_bytes(field))
    kv_records += new_kv

    kept = [t for t in reader.tensors if t.name not in drop_tensors]
    infos = []
    offset = 0
    for t in kept:
        name, dims, ggml_type = reader.tensor_info_bytes(t)
        infos.append(_gguf_string(name) + struct.pack("<I", len(t.shape)) + dims
                     + struct.pack("<IQ", ggml_type, offset))
        offset += _pad(int(t.n_bytes), align)
    for nt in new_tensors:
        infos.append(_gguf_string(nt.name) + struct.pack("<I", len(nt.dims))
                     + struct.pack(f"<{len(nt.dims)}Q", *nt.dims) + struct.pack("<IQ", nt.ggml_type, offset))
        offset += _pad(len(nt.data), align)

    version = int(reader.version)
    meta = b"".join([b"GGUF", struct.pack("<IQQ", version, len(kept) + len(new_tensors), len(kv_records)),
                     *kv_records, *infos])
    _write_all(dst, meta + bytes(_pad(len(meta), align) - len(meta)))

    with open(src_path, "rb", buffering=0) as src:
        for t in kept:
            copy_range(src.fileno(), dst.fileno(), int(t.data_offset), int(t.n_bytes), progress)
            _write_all(dst, bytes(_pad(int(t.n_bytes), align) - int(t.n_bytes)))
    for nt in new_tensors:
        _write_all(dst, nt.data + bytes(_pad(len(nt.data), align) - len(nt.data)))
        if progress is not None:
            progress.update(len(nt.data))


def _write_all(dst: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = dst.write(view)
        view = view[n:]


_copy_file_range_ok = hasattr(os, "copy_file_range")


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, progress: Any = None) -> None:
    """Append ``length`` bytes of ``src_fd`` starting at ``offset`` to ``dst_fd``, chunk by chunk."""
    end = offset + length
    while offset < end:
        n = _copy_chunk(src_fd, dst_fd, offset, min(CHUNK_BYTES, end - offset))
        if n <= 0:
            raise DPEError("input file ended early (truncated while being read?)")
        offset += n
        if progress is not None:
            progress.update(n)


def _copy_chunk(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes from ``src_fd`` at ``offset`` to the current position of ``dst_fd``;
    return how many were copied."""
    global _copy_file_range_ok
    if _copy_file_range_ok:
        try:
            return os.copy_file_range(src_fd, dst_fd, count, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM,
                               errno.EBADF):
                raise
            _copy_file_range_ok = False
    buf = _buffer()
    n = os.preadv(src_fd, [memoryview(buf)[:count]], offset)
    view = memoryview(buf)[:n]
    while view:
        view = view[os.write(dst_fd, view):]
    return n


_buf: bytearray | None = None


def _buffer() -> bytearray:
    global _buf
    if _buf is None:
        _buf = bytearray(_FALLBACK_BUFFER_BYTES)
    return _buf


@contextlib.contextmanager
def atomic_output(out: Path, needed_bytes: int = 0, remedy: str = "choose another -o") -> Iterator[BinaryIO]:
    """Yield an unbuffered file in ``out``'s folder; on success fsync it and rename it to ``out``.
    On any error or interruption the temporary file is removed and ``out`` is left untouched.
    ``remedy``: what the error messages tell the user to do instead."""
    folder = out.parent
    if needed_bytes:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < needed_bytes:
            raise DPEError(f"{folder}: not enough free disk space for {out.name} (need about "
                           f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free); free space or {remedy}")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".part")
    except OSError as e:
        raise DPEError(f"{out}: cannot write in {folder} ({e.strerror or e}); {remedy}") from None
    tmp = Path(tmp_name)
    done = False
    try:
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                yield f
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, out)
        except DPEError:
            raise
        except OSError as e:
            raise DPEError(f"{out}: write failed ({e.strerror or e}); check free space and permissions") from None
        done = True
        _fsync_dir(folder)
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_atomic(out: Path, data: bytes, remedy: str = "choose another -o") -> Path:
    """``data`` as the whole of ``out``, through :func:`atomic_output` (all of it or nothing)."""
    out = Path(out)
    with atomic_output(out, remedy=remedy) as f:
        f.write(data)
    return out


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
