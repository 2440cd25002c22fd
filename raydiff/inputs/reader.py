"""Tensor bytes: zero-copy reads of local shards, and Hub shards by range or from the node's cache."""

from __future__ import annotations

import mmap
import os

import numpy as np

from raydiff.dtypes import DTYPES
from raydiff.errors import InvalidCheckpoint
from raydiff.inputs.remote import HubAccess, HubFiles, is_remote
from raydiff.inputs.safetensors import TensorInfo, _path, _show


class TensorReader:
    """Reads of tensor bytes: zero-copy through read-only memory maps, one per file.

    Hub files (``hf://`` locations) are read through ``hub``, a
    :class:`raydiff.inputs.remote.HubFiles`: memory-mapped from the node's Hugging Face cache
    when the file is there, else fetched by byte range into memory.

    Example:
        >>> r = TensorReader(); raw = r.read(info, 0, info.numel)  # doctest: +SKIP
    """

    def __init__(self, hub: HubFiles | None = None) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._hub = hub

    def _map(self, path: str) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = m
        return m

    def read(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        """The raw stored bits of elements ``[start, stop)`` (flat) of a tensor.

        Returns a read-only array of unsigned integers of the dtype's width: backed by the
        page cache (no copy) for local files, by one buffer per call for Hub ranges.
        """
        d = DTYPES[info.dtype]
        off, end = info.span(start, stop)
        count = stop - start
        path = info.file
        if is_remote(path):
            if self._hub is None:
                self._hub = HubFiles(HubAccess())
            local = self._hub.local_path(path)
            if local is None:
                data = self._hub.read(path, off, end, f"tensor {_show(info.name)}")
                out = np.frombuffer(data, dtype=np.dtype(d.bits), count=count)
                out.flags.writeable = False
                return out
            path = local
        m = self._map(path)
        if end > len(m):
            raise InvalidCheckpoint(
                f"{_path(info.file)}: tensor {_show(info.name)} extends past the end of the file; "
                "the file changed or was truncated since its header was read"
            )
        return np.frombuffer(m, dtype=np.dtype(d.bits), count=count, offset=off)

    def prefetch(self, info: TensorInfo, start: int, stop: int) -> None:
        """Start reading elements ``[start, stop)`` of a local tensor into the page cache and
        return at once (``MADV_WILLNEED``), so that the disk works on the next unit while the
        kernel works on this one. Hub files and short files are left alone."""
        if is_remote(info.file) or not hasattr(mmap, "MADV_WILLNEED"):
            return
        off, end = info.span(start, stop)
        m = self._map(info.file)
        end = min(len(m), end)
        lo = off - off % mmap.ALLOCATIONGRANULARITY
        if end > lo:
            m.madvise(mmap.MADV_WILLNEED, lo, end - lo)

    def release(self, info: TensorInfo, start: int, stop: int, cache: bool = True) -> None:
        """Drop the whole pages of elements ``[start, stop)`` of a local tensor from this
        reader's map (``MADV_DONTNEED``) and, with ``cache``, from the page cache
        (``POSIX_FADV_DONTNEED``, which keeps pages some map still holds, and the large
        folios that reach past the range). For a pair bigger than memory, which the cache
        cannot keep anyway, freeing the pages where they were used costs less than the
        kernel reclaiming mapped pages later."""
        if is_remote(info.file) or not hasattr(os, "posix_fadvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        off, end = info.span(start, stop)
        lo = -(-off // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = end // mmap.PAGESIZE * mmap.PAGESIZE
        m = self._maps.get(info.file)
        if m is not None and min(hi, len(m)) > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(m)) - lo)
        if cache and hi > lo:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        self._maps.clear()
