"""Executing patch and apply work: one patch shard, or one rebuilt tensor, without Ray.

What an artifact actor does (:class:`raydiff.run.actors.ArtifactActor` adds only resources
and retries); the drivers are in :mod:`raydiff.run.patch`. Everything streams in slices of
:data:`SLICE_BYTES` read through :class:`~raydiff.inputs.reader.TensorReader` (memory maps,
or Hub ranges): memory stays near a few slices whatever the tensor's size.

- :meth:`ArtifactExecutor.patch_shard`: for each tensor of a group, the SHA-256 of its base
  and tuned bytes and either the indices + tuned bits of the entries whose bits differ
  (:func:`raydiff.kernel.patch.bitwise_changes`; spooled to temporaries as they come) or,
  for a tensor new in tuned or of another shape or dtype, its whole bytes; then one
  safetensors file ``indices/<name>`` … ``values/<name>`` … ``whole/<name>`` … whose
  ``__metadata__`` lists every tensor's :class:`TensorEntry`, renamed into place once whole.
- :meth:`ArtifactExecutor.rebuild`: one tensor of the tuned checkpoint written in place into
  its (preallocated) shard: base bits with the patch's values scattered in
  (:func:`raydiff.kernel.patch.scatter`), the base's and the result's SHA-256 checked
  against those the patch recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np

from raydiff.dtypes import DTYPES
from raydiff.errors import BaseMismatch, InvalidPatch, RaydiffError, WorkFailed
from raydiff.inputs.reader import TensorReader
from raydiff.inputs.remote import HubAccess, HubFiles
from raydiff.inputs.safetensors import TensorInfo, _show
from raydiff.kernel.patch import bitwise_changes, index_dtype, scatter
from raydiff.store.tensorfiles import TensorFileWriter, TensorSpec, pwrite_all, temp_name

#: Bytes of one side read at a time.
SLICE_BYTES = 64 << 20
#: How a tensor is held in a patch: ``sparse`` (indices + values of changed entries; nothing
#: stored when none changed) or ``whole`` (new in tuned, or another shape or dtype).
KIND_SPARSE, KIND_WHOLE = "sparse", "whole"
#: The ``__metadata__`` key of a patch shard that lists its tensors' entries.
META_KEY = "raydiff-patch"
_COPY = 16 << 20


def key(part: str, name: str) -> str:
    """A patch shard's tensor key: ``indices/<name>``, ``values/<name>`` or ``whole/<name>``."""
    return f"{part}/{name}"


@dataclass(frozen=True)
class TensorEntry:
    """What a patch records of one tensor of the tuned checkpoint.

    Attributes:
        name: the tensor's name in tuned.
        kind: :data:`KIND_SPARSE` or :data:`KIND_WHOLE`.
        dtype, shape: in tuned (and in base, for a sparse tensor).
        changed: entries whose bits differ (sparse), or every entry (whole).
        index_dtype: ``I32`` or ``I64``: the dtype of the stored indices (sparse).
        base_sha256: SHA-256 of the base's bytes of the tensor (sparse only).
        tuned_sha256: SHA-256 of the tuned bytes.
        patch_shard: the patch file holding its indices and values, or its bytes; ``""``
            when nothing is stored (a sparse tensor with no change).
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    changed: int
    index_dtype: str
    base_sha256: str | None
    tuned_sha256: str
    patch_shard: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TensorEntry:
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class PatchTensor:
    """One tuned tensor to patch, and its base twin (``None`` when stored whole)."""

    name: str
    base: TensorInfo | None
    tuned: TensorInfo


@dataclass(frozen=True)
class PatchShardItem:
    """A group of tuned tensors whose patch goes into one file ``path`` (name ``shard``)."""

    shard: str
    path: str
    tensors: tuple[PatchTensor, ...]

    @property
    def cost(self) -> int:
        return sum(t.tuned.nbytes + (t.base.nbytes if t.base else 0) for t in self.tensors)


@dataclass(frozen=True)
class RebuildItem:
    """One tensor of the rebuilt checkpoint, written at ``offset`` of the shard file ``path``.

    ``base`` is the base tensor (sparse), ``indices``/``values`` the patch's entries (sparse,
    ``None`` when nothing changed) or ``whole`` the patch's copy of the tensor.
    """

    entry: TensorEntry
    path: str
    offset: int
    base: TensorInfo | None
    indices: TensorInfo | None
    values: TensorInfo | None
    whole: TensorInfo | None

    @property
    def cost(self) -> int:
        return self.entry.numel * DTYPES[self.entry.dtype].itemsize


@dataclass(frozen=True)
class ItemDone:
    """What goes back to the driver: the item, the bytes it read, and a patch shard's result."""

    key: str
    nbytes: int
    seconds: float
    shard: ShardWritten | None = None


@dataclass(frozen=True)
class ShardWritten:
    """A finished patch shard: its name, size, SHA-256 and the entries of its tensors."""

    name: str
    nbytes: int
    sha256: str
    entries: tuple[TensorEntry, ...]


def shard_entries(metadata: dict[str, str], where: str) -> tuple[TensorEntry, ...]:
    """The tensor entries a patch shard's ``__metadata__`` lists.

    Raises:
        InvalidPatch: the metadata is missing or malformed.
    """
    try:
        return tuple(TensorEntry.from_json(d) for d in json.loads(metadata[META_KEY]))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidPatch(f"{where}: is not a raydiff patch shard (its {META_KEY!r} metadata is "
                           f"missing or malformed: {e}); make the patch again") from None


T = TypeVar("T")


def _slices(numel: int, itemsize: int):
    step = max(1, SLICE_BYTES // itemsize)
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


class ArtifactExecutor:
    """Runs patch and rebuild items in the current process (an actor, or a test)."""

    def __init__(self, hub: HubAccess | None = None, node_id: str = "local") -> None:
        self.hub = hub
        self.node_id = node_id
        self.reader = TensorReader(HubFiles(hub) if hub else None)

    def run(self, item: PatchShardItem | RebuildItem) -> ItemDone:
        if isinstance(item, PatchShardItem):
            return self._guard(f"patch shard {item.shard}", lambda: self.patch_shard(item))
        return self._guard(f"tensor {_show(item.entry.name)}", lambda: self.rebuild(item))

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RaydiffError:
            raise
        except OSError as e:
            raise RaydiffError(f"{what}: cannot read or write {e.filename or 'a file'} on {self.node_id} "
                               f"({e.strerror or e}); run the command again to resume") from None
        except Exception as e:
            raise WorkFailed(f"{what} failed on {self.node_id}: {type(e).__name__}: {' '.join(str(e).split())[:500]}. "
                             "This is a bug in raydiff: please report it with the traceback `raydiff --debug` prints",
                             traceback.format_exc()) from None

    # -- patch -----------------------------------------------------------------------------

    def patch_shard(self, item: PatchShardItem) -> ItemDone:
        """Write one patch shard (see the module docstring); returns its :class:`ShardWritten`."""
        t0 = time.perf_counter()
        spools = {part: temp_name(item.path) for part in ("indices", "values", "whole")}
        files = {part: open(p, "wb") for part, p in spools.items()}
        try:
            entries, specs, read = [], {"indices": [], "values": [], "whole": []}, 0
            for t in item.tensors:
                entry = self._patch_tensor(t, item.shard, files)
                read += t.tuned.nbytes + (t.base.nbytes if t.base else 0)
                if entry.kind == KIND_WHOLE:
                    specs["whole"].append(TensorSpec(key("whole", t.name), entry.dtype, entry.shape))
                elif entry.changed:
                    specs["indices"].append(TensorSpec(key("indices", t.name), entry.index_dtype, (entry.changed,)))
                    specs["values"].append(TensorSpec(key("values", t.name), entry.dtype, (entry.changed,)))
                entries.append(entry)
            for f in files.values():
                f.close()
            meta = {META_KEY: json.dumps([e.to_json() for e in entries], separators=(",", ":"))}
            with TensorFileWriter(item.path, specs["indices"] + specs["values"] + specs["whole"], meta) as w:
                for part in ("indices", "values", "whole"):
                    with open(spools[part], "rb") as f:
                        while chunk := f.read(_COPY):
                            w.write(chunk)
            written = ShardWritten(item.shard, w.total, w.digest, tuple(entries))
            return ItemDone(item.shard, read, time.perf_counter() - t0, written)
        finally:
            for part, f in files.items():
                f.close()
                if os.path.exists(spools[part]):
                    os.unlink(spools[part])

    def _patch_tensor(self, t: PatchTensor, shard: str, files: dict) -> TensorEntry:
        tuned, base = t.tuned, t.base
        size = DTYPES[tuned.dtype].itemsize
        ht = hashlib.sha256()
        if base is None:
            for start, stop in _slices(tuned.numel, size):
                bits = self.reader.read(tuned, start, stop)
                ht.update(bits)
                files["whole"].write(memoryview(bits).cast("B"))
            return TensorEntry(t.name, KIND_WHOLE, tuned.dtype, tuned.shape, tuned.numel, "", None,
                               ht.hexdigest(), shard)
        hb, changed, idx_dt = hashlib.sha256(), 0, index_dtype(tuned.numel)
        for start, stop in _slices(tuned.numel, size):
            b, tb = self.reader.read(base, start, stop), self.reader.read(tuned, start, stop)
            hb.update(b)
            ht.update(tb)
            idx, values = bitwise_changes(b, tb, start, idx_dt)
            if idx.size:
                files["indices"].write(memoryview(idx).cast("B"))
                files["values"].write(memoryview(np.ascontiguousarray(values)).cast("B"))
                changed += idx.size
        return TensorEntry(t.name, KIND_SPARSE, tuned.dtype, tuned.shape, changed, idx_dt, hb.hexdigest(),
                           ht.hexdigest(), shard if changed else "")

    # -- apply -----------------------------------------------------------------------------

    def rebuild(self, item: RebuildItem) -> ItemDone:
        """Write one tensor of the rebuilt checkpoint in place and check its SHA-256 (and its
        base's) against the patch.

        Raises:
            BaseMismatch: the base's bytes of the tensor are not those the patch was made from.
            InvalidPatch: the result's bytes are not the tuned bytes the patch recorded.
        """
        t0 = time.perf_counter()
        e = item.entry
        size = DTYPES[e.dtype].itemsize
        ht, read = hashlib.sha256(), 0
        fd = os.open(item.path, os.O_WRONLY)
        try:
            if e.kind == KIND_WHOLE:
                assert item.whole is not None
                for start, stop in _slices(e.numel, size):
                    bits = self.reader.read(item.whole, start, stop)
                    ht.update(bits)
                    pwrite_all(fd, bits, item.offset + start * size)
                read = e.numel * size
            else:
                assert item.base is not None
                hb, p = hashlib.sha256(), 0
                idx = self.reader.read(item.indices, 0, e.changed) if item.indices else np.zeros(0, np.int64)
                vals = self.reader.read(item.values, 0, e.changed) if item.values else None
                for start, stop in _slices(e.numel, size):
                    b = self.reader.read(item.base, start, stop)
                    hb.update(b)
                    q = p + int(np.searchsorted(idx[p:], stop)) if idx.size else 0
                    if q > p:
                        out = scatter(b, idx[p:q].astype(np.int64) - start, vals[p:q])
                    else:
                        out = b
                    p = q
                    ht.update(out)
                    pwrite_all(fd, out, item.offset + start * size)
                read = e.numel * size * 2 + (item.indices.nbytes if item.indices else 0)
                if p != idx.size:
                    raise InvalidPatch(f"patch entry of tensor {_show(e.name)} holds indices past its "
                                       f"{e.numel} elements; the patch is corrupt — make it again")
                if hb.hexdigest() != e.base_sha256:
                    raise BaseMismatch(
                        f"tensor {_show(e.name)} of the base ({_where(item.base.file)}) has SHA-256 "
                        f"{hb.hexdigest()[:16]}…, the patch was made against {str(e.base_sha256)[:16]}…: this is "
                        "not the base the patch was made from; apply it to that base")
        finally:
            os.close(fd)
        if ht.hexdigest() != e.tuned_sha256:
            raise InvalidPatch(f"tensor {_show(e.name)} rebuilt with SHA-256 {ht.hexdigest()[:16]}…, the patch "
                               f"recorded {e.tuned_sha256[:16]}… for the tuned checkpoint; the patch is corrupt — "
                               "make it again")
        return ItemDone(e.name, read, time.perf_counter() - t0)


def _where(path: str) -> str:
    return path.rsplit("/", 1)[-1]
