"""safetensors files written by raydiff (masks, patches, rebuilt checkpoints), whole or not at all.

A file is written under a temporary name next to its final one (``<name>.tmp-<32 hex>``, as
every file of the store) and renamed into place once whole, so a reader never sees half a
file and a killed writer leaves only a temporary that the next attempt removes. The header
goes first — every tensor's dtype, shape and byte range is known before its bytes are —
then the bytes, streamed tensor by tensor: memory stays near one tensor (or one slice).

The header is JSON padded with spaces so the data starts on an 8-byte boundary, as the
safetensors library writes it; the tensors' bytes follow one another in the order given.

Example:
    >>> specs = [TensorSpec("a", "BOOL", (2, 3))]
    >>> with TensorFileWriter("mask.safetensors", specs) as w:  # doctest: +SKIP
    ...     w.write(np.ones(6, np.uint8))
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from raydiff.dtypes import DTYPES
from raydiff.errors import InvalidOption, OutputExists


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to write: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


def header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The header of a safetensors file holding ``specs`` in that order, and each tensor's
    absolute byte offset in the file.

    Example:
        >>> head, offsets = header([TensorSpec("a", "F32", (2,)), TensorSpec("b", "BOOL", (3,))])
        >>> len(head) % 8, offsets[1] - offsets[0]
        (0, 8)
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    pos, rel = 0, []
    for s in specs:
        if s.name in obj:
            raise ValueError(f"tensor {s.name!r} listed twice")
        obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        rel.append(pos)
        pos += s.nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, [8 + len(text) + r for r in rel]


def temp_name(path: str) -> str:
    """A temporary name next to ``path`` (``<path>.tmp-<32 hex>``)."""
    return f"{path}.tmp-{uuid.uuid4().hex}"


def is_temp(name: str) -> bool:
    """Whether a file name is one of :func:`temp_name`'s."""
    head, sep, tail = name.rpartition(".tmp-")
    return bool(sep and head) and len(tail) == 32 and all(c in "0123456789abcdef" for c in tail)


def finish(tmp: str, path: str) -> None:
    """Move a whole temporary into place (atomic on POSIX). As the store's files, it is not
    synced to disk first: a killed process leaves the old state or the new, never a torn
    file; a power cut may need the command run again."""
    os.replace(tmp, path)


def write_small(path: str, data: bytes) -> None:
    """A small file (a JSON index, a marker) written whole or not at all."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        finish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_file_output(path: str, force: bool, what: str) -> None:
    """Raise unless ``path`` may be written as a file: it does not exist, or it is a file
    and ``force`` is set (it is then replaced atomically once the new file is whole).

    Raises:
        OutputExists: the path exists (without ``force``), or is a directory.
        InvalidOption: its folder does not exist.
    """
    if os.path.isdir(path):
        raise OutputExists(f"{path} is a directory; give --out the name of the {what} to write")
    if os.path.lexists(path) and not force:
        raise OutputExists(f"{path} exists; pass --force to replace it, or choose another --out")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidOption(f"out names a file in {parent}, which does not exist; create that folder first",
                            option="out")


class TensorFileWriter:
    """A safetensors file written header first, then each tensor's bytes in order.

    The file appears at ``path`` only when :meth:`commit` finds every byte of the header's
    tensors written; used as a context manager it commits on success and leaves nothing
    behind on an exception. ``digest`` (SHA-256 of the whole file) is known after commit.

    Args:
        path: the file to write.
        specs: the tensors, in the order their bytes will come.
        metadata: the header's ``__metadata__`` (strings to strings).
    """

    def __init__(self, path: str, specs: Sequence[TensorSpec],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.tmp = temp_name(path)
        head, _ = header(specs, metadata)
        self.total = len(head) + sum(s.nbytes for s in specs)
        self._sha = hashlib.sha256()
        self._f = open(self.tmp, "wb")
        self._written = 0
        self.digest = ""
        self.write(head)

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        """Append bytes (an array is written as its raw little-endian bytes)."""
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if self._written + buf.nbytes > self.total:
            raise ValueError(f"{self.path}: more bytes than its header declares ({self.total})")
        self._sha.update(buf)
        self._f.write(buf)
        self._written += buf.nbytes

    def commit(self) -> None:
        if self._written != self.total:
            raise ValueError(f"{self.path}: {self._written} bytes written, its header declares {self.total}")
        self._f.close()
        finish(self.tmp, self.path)
        self.digest = self._sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def preallocate(path: str, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> list[int]:
    """Write a file's header at ``path`` and size it for its tensors, whose bytes are then
    written in place (``os.pwrite``) by whoever computes them, in any order.

    Returns:
        Each tensor's absolute byte offset in the file.
    """
    head, offsets = header(specs, metadata)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(s.nbytes for s in specs))
    return offsets


def pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    """Write an array's bytes at ``offset`` of an open file, however many calls it takes."""
    buf = memoryview(np.ascontiguousarray(data)).cast("B")
    done = 0
    while done < buf.nbytes:
        done += os.pwrite(fd, buf[done:], offset + done)
