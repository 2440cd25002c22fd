"""``patch`` and ``apply``: what a finetune changed, bit for bit, as sharded safetensors — and back.

:func:`make_patch` resolves both checkpoints (headers only), groups the tuned tensors into
patch shards of about ``shard_bytes`` of input each, and has the artifact actors write one
shard per group (:mod:`raydiff.run.patch_work`): per tensor, the flat indices and tuned bits
of the entries whose bits differ, or the whole tensor when it is new in tuned or changed
shape or dtype. Its index, ``patch.index.json``, records both checkpoints' identities, every
tuned tensor's entry (kind, dtype, shape, changed entries, SHA-256 of its base and tuned
bytes), the tuned checkpoint's shard layout and each patch shard's size and SHA-256.

:func:`apply_patch` checks the patch whole first — its index's checksum, every shard's
presence, size and SHA-256, the base's tensors' dtypes and shapes — and only then writes:
each tuned shard preallocated under a temporary name, each tensor rebuilt in place by an
actor (base bits + scattered values, the base's and the result's SHA-256 checked against
the index), the shard renamed into place once all its tensors are.

Both are resumable and leave nothing half-written: the output folder holds a
``.raydiff-partial.json`` naming the job while it is unfinished; files are written under
temporary names and renamed once whole; the finished marker (the patch's index, or the
rebuilt checkpoint's ``raydiff-apply.json``) comes last. Run again with the same inputs and
``--out``, a command cut short skips the shards it finished.

Example:
    >>> make_patch("base/", "tuned/", "patch/")  # doctest: +SKIP
    >>> apply_patch("base/", "patch/", "rebuilt/")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from raydiff.dtypes import DTYPES
from raydiff.errors import BaseMismatch, InvalidCheckpoint, InvalidOption, InvalidPatch, OutputExists
from raydiff.inputs.checkpoint import INDEX_NAME, Checkpoint
from raydiff.inputs.refs import resolve
from raydiff.inputs.remote import HubAccess, is_remote
from raydiff.inputs.safetensors import TensorInfo, _show, parse_header
from raydiff.options import ClusterOptions
from raydiff.run.patch_work import (
    KIND_SPARSE,
    KIND_WHOLE,
    ItemDone,
    PatchShardItem,
    PatchTensor,
    RebuildItem,
    ShardWritten,
    TensorEntry,
    key,
    shard_entries,
)
from raydiff.store.tensorfiles import TensorSpec, finish, is_temp, preallocate, temp_name, write_small

PATCH_INDEX = "patch.index.json"
APPLIED = "raydiff-apply.json"
PARTIAL = ".raydiff-partial.json"
FORMAT, VERSION = "raydiff-patch", 1
#: Input bytes (base + tuned) per patch shard; a larger tensor gets a shard of its own.
DEFAULT_SHARD_BYTES = 1 << 30
_MAX_INDEX_BYTES = 500_000_000


@dataclass(frozen=True)
class PatchResult:
    """What :func:`make_patch` wrote.

    Attributes:
        path: the patch folder.
        shards: patch shard files.
        tensors: tuned tensors; ``sparse`` of them stored as changed entries, ``whole`` whole.
        dropped: tensors only in base (recorded by name; the rebuilt checkpoint has none).
        changed: entries stored (changed entries of sparse tensors, every entry of whole ones).
        patch_bytes: the patch's size (shards and index).
        tuned_bytes: the tuned checkpoint's tensor bytes.
        resumed: shards finished by an earlier, interrupted call were kept.
    """

    path: str
    shards: int
    tensors: int
    sparse: int
    whole: int
    dropped: int
    changed: int
    patch_bytes: int
    tuned_bytes: int
    resumed: bool
    seconds: float


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply_patch` wrote: the rebuilt checkpoint's folder, shards, tensors and bytes."""

    path: str
    shards: int
    tensors: int
    nbytes: int
    resumed: bool
    seconds: float


def _ident(ck: Checkpoint) -> dict:
    return {"ref": ck.ref, "revision": ck.revision, "fingerprint": ck.fingerprint}


def _hub(*cks: Checkpoint) -> HubAccess | None:
    if any(is_remote(ck.root) for ck in cks):
        from raydiff.inputs.hub import _api

        return HubAccess(endpoint=_api().endpoint)
    return None


def _run(items: list, cluster: ClusterOptions, hub: HubAccess | None, on_done: Callable[[ItemDone], None]) -> None:
    if not items:
        return
    from raydiff.run import actors  # Ray is imported only when there is work for it

    actors.run_artifacts(items, cluster, hub, on_done)


# -- the output folder -------------------------------------------------------------------------


def _read_json(path: str) -> object | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(_MAX_INDEX_BYTES))
    except (OSError, ValueError):
        return None


def _prepare(out: str, job: dict, force: bool, finished: str) -> bool:
    """Make ``out`` ready for ``job``: a new folder, or the unfinished folder of the same job
    (resumed: its temporaries removed). Returns whether it resumes.

    Raises:
        OutputExists: ``out`` exists and is not an unfinished folder of this job (without
            ``force``), or is a folder raydiff did not write (even with ``force``).
        InvalidOption: the folder ``out`` would be in does not exist.
    """
    if os.path.lexists(out) and not os.path.isdir(out):
        if not force:
            raise OutputExists(f"{out} exists; pass --force to replace it, or choose another --out")
        os.unlink(out)
    elif os.path.isdir(out):
        partial = _read_json(os.path.join(out, PARTIAL))
        if partial == job and not force:
            for name in os.listdir(out):
                if is_temp(name):
                    os.unlink(os.path.join(out, name))
            return True
        if not force:
            hint = " (an unfinished run of other inputs)" if partial is not None else ""
            raise OutputExists(f"{out} exists{hint}; pass --force to replace it, or choose another --out")
        if partial is None and not os.path.exists(os.path.join(out, finished)) and os.listdir(out):
            raise OutputExists(f"{out} is a folder raydiff did not write, so --force does not replace it; "
                               "remove it yourself or choose another --out")
        shutil.rmtree(out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InvalidOption(f"out names a folder in {parent}, which does not exist; create that folder first",
                            option="out")
    os.mkdir(out)
    write_small(os.path.join(out, PARTIAL), json.dumps(job, sort_keys=True).encode())
    return False


def _abandon(out: str) -> None:
    """After a failure: temporaries go, and a folder with nothing finished in it goes too."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        if is_temp(name):
            os.unlink(os.path.join(out, name))
    if set(os.listdir(out)) <= {PARTIAL}:
        shutil.rmtree(out, ignore_errors=True)


def _done(out: str, marker: str, data: bytes) -> None:
    write_small(os.path.join(out, marker), data)
    os.unlink(os.path.join(out, PARTIAL))


# -- patch -------------------------------------------------------------------------------------


def _groups(base: Checkpoint, tuned: Checkpoint, shard_bytes: int) -> list[list[PatchTensor]]:
    """Tuned tensors in name order, each with its base twin (same name, dtype and shape) or
    none, cut into groups of about ``shard_bytes`` of input."""
    groups: list[list[PatchTensor]] = [[]]
    size = 0
    for name, t in tuned.tensors.items():
        b = base.tensors.get(name)
        twin = b if b is not None and (b.dtype, b.shape) == (t.dtype, t.shape) else None
        cost = t.nbytes + (twin.nbytes if twin else 0)
        if groups[-1] and size + cost > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(PatchTensor(name, twin, t))
        size += cost
    return groups


def _written(path: str, name: str) -> ShardWritten | None:
    """A patch shard finished by an earlier call, or ``None`` when it cannot be read."""
    try:
        head = parse_header(path)
        entries = shard_entries(dict(head.metadata), path)
    except (InvalidCheckpoint, InvalidPatch):
        return None
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return ShardWritten(name, head.size, digest, entries)


def _tuned_layout(tuned: Checkpoint) -> dict:
    root_is_dir = not is_remote(tuned.root) and os.path.isdir(tuned.root)
    has_index = len(tuned.shards) > 1 or (root_is_dir and os.path.isfile(os.path.join(tuned.root, INDEX_NAME)))
    return {
        "index": has_index,
        "config": tuned.config,
        "shards": [{"name": s.path.rsplit("/", 1)[-1], "metadata": dict(s.metadata),
                    "tensors": [t.name for t in sorted(s.tensors, key=lambda t: t.offset)]} for s in tuned.shards],
    }


def _checksum(obj: Mapping) -> str:
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_patch(base: str, tuned: str, out: str, *, cluster: ClusterOptions | None = None,
               shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False,
               on_done: Callable[[ItemDone], None] | None = None) -> PatchResult:
    """Write the bitwise difference of ``tuned`` from ``base`` as a patch folder, on Ray.

    Args:
        base, tuned: checkpoint references (local path or ``org/name[@revision]``).
        out: the patch folder to write (local, or a path every Ray node mounts).
        cluster: Ray address and number of actors.
        shard_bytes: input bytes (base + tuned) per patch shard.
        force: replace ``out`` if it exists (a file, or a folder raydiff wrote).
        on_done: called as each patch shard is finished.

    Returns:
        What was written.

    Raises:
        CheckpointNotFound, InvalidCheckpoint, UnsupportedFormat: bad references or files.
        OutputExists: ``out`` exists and is not this patch's unfinished folder.
    """
    t0 = time.perf_counter()
    cluster = cluster or ClusterOptions()
    if shard_bytes < 1:
        raise InvalidOption(f"shard_bytes must be >= 1, got {shard_bytes}", option="shard_bytes")
    base_ck, tuned_ck = resolve(base), resolve(tuned)
    result_path, out = out, os.path.abspath(out)  # actors may run in another folder
    groups = _groups(base_ck, tuned_ck, shard_bytes)
    names = [f"patch-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    job = {"kind": "patch", "version": VERSION, "base": _ident(base_ck), "tuned": _ident(tuned_ck), "shards": names,
           "shard_bytes": shard_bytes}
    resumed = _prepare(out, job, force, PATCH_INDEX)
    written: dict[str, ShardWritten] = {}
    items = []
    for name, group in zip(names, groups):
        path = os.path.join(out, name)
        prior = _written(path, name) if os.path.exists(path) else None
        if prior is not None:
            written[name] = prior
        else:
            items.append(PatchShardItem(name, path, tuple(group)))

    def done(d: ItemDone) -> None:
        assert d.shard is not None
        written[d.shard.name] = d.shard
        if on_done is not None:
            on_done(d)

    try:
        _run(items, cluster, _hub(base_ck, tuned_ck), done)
    except BaseException:
        _abandon(out)
        raise
    entries = [e for n in names for e in written[n].entries]
    dropped = [{"name": n, "dtype": b.dtype, "shape": list(b.shape)} for n, b in base_ck.tensors.items()
               if n not in tuned_ck.tensors]
    index = {
        "format": FORMAT, "version": VERSION, "base": _ident(base_ck), "tuned": _ident(tuned_ck),
        "tuned_layout": _tuned_layout(tuned_ck), "tensors": [e.to_json() for e in entries], "dropped": dropped,
        "patch_shards": [{"name": n, "bytes": written[n].nbytes, "sha256": written[n].sha256} for n in names],
    }
    index["checksum"] = _checksum(index)
    data = json.dumps(index, indent=1).encode()
    _done(out, PATCH_INDEX, data)
    return PatchResult(
        path=result_path, shards=len(names), tensors=len(entries), sparse=sum(e.kind == KIND_SPARSE for e in entries),
        whole=sum(e.kind == KIND_WHOLE for e in entries), dropped=len(dropped), changed=sum(e.changed for e in entries),
        patch_bytes=sum(written[n].nbytes for n in names) + len(data), tuned_bytes=tuned_ck.nbytes,
        resumed=resumed, seconds=time.perf_counter() - t0)


# -- apply -------------------------------------------------------------------------------------


def read_patch(patch: str) -> dict:
    """A patch folder's index, checked: format, version and checksum.

    Raises:
        InvalidPatch: no index (or an unfinished patch), or one that is malformed or altered.
    """
    path = os.path.join(patch, PATCH_INDEX)
    if not os.path.isdir(patch):
        raise InvalidPatch(f"{patch}: no such patch folder")
    if not os.path.isfile(path):
        if os.path.exists(os.path.join(patch, PARTIAL)):
            raise InvalidPatch(f"{patch}: the patch is unfinished (a `raydiff patch` was cut short); run that "
                               "command again to finish it")
        raise InvalidPatch(f"{patch}: holds no {PATCH_INDEX}; not a raydiff patch")
    index = _read_json(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InvalidPatch(f"{path}: is not a raydiff patch index (truncated or not JSON); copy the patch again")
    if index.get("version") != VERSION:
        raise InvalidPatch(f"{path}: patch format version {index.get('version')!r}; this raydiff reads {VERSION}")
    if index.get("checksum") != _checksum(index):
        raise InvalidPatch(f"{path}: its checksum does not match its content; the index was changed or corrupted "
                           "— copy the patch again or make it again")
    return index


def _verify_shards(patch: str, index: dict) -> dict[str, dict[str, TensorInfo]]:
    """Every patch shard present, of the size and SHA-256 the index records; their headers."""
    shards = index["patch_shards"]
    for s in shards:
        path = os.path.join(patch, s["name"])
        if not os.path.isfile(path):
            raise InvalidPatch(f"{patch}: is missing {s['name']}, one of its {len(shards)} shards; copy the whole "
                               "patch folder again")
        size = os.path.getsize(path)
        if size != s["bytes"]:
            raise InvalidPatch(f"{path}: is {size} bytes, the patch's index records {s['bytes']}; the file is "
                               "truncated or was changed — copy it again")

    def digest(s: dict) -> str:
        with open(os.path.join(patch, s["name"]), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    with ThreadPoolExecutor(max(1, min(8, len(shards), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, shards))
    for s, d in zip(shards, digests):
        if d != s["sha256"]:
            raise InvalidPatch(f"{os.path.join(patch, s['name'])}: SHA-256 {d[:16]}… differs from the "
                               f"{s['sha256'][:16]}… the patch's index records; the file was changed or corrupted "
                               "— copy it again or make the patch again")
    try:
        return {s["name"]: {t.name: t for t in parse_header(os.path.join(patch, s["name"])).tensors} for s in shards}
    except InvalidCheckpoint as e:
        raise InvalidPatch(f"{e}") from None


def _locate(entry: TensorEntry, infos: dict[str, dict[str, TensorInfo]]) -> dict[str, TensorInfo | None]:
    """Where a tensor's patch entries are, checked against the dtypes and lengths recorded."""
    if entry.kind == KIND_SPARSE and not entry.changed:
        return {"indices": None, "values": None, "whole": None}
    held = infos.get(entry.patch_shard, {})
    want = ({"whole": (entry.dtype, entry.shape)} if entry.kind == KIND_WHOLE else
            {"indices": (entry.index_dtype, (entry.changed,)), "values": (entry.dtype, (entry.changed,))})
    out: dict[str, TensorInfo | None] = {"indices": None, "values": None, "whole": None}
    for part, (dtype, shape) in want.items():
        t = held.get(key(part, entry.name))
        if t is None or (t.dtype, t.shape) != (dtype, shape):
            raise InvalidPatch(f"patch shard {entry.patch_shard} does not hold {part} of tensor {_show(entry.name)} "
                               "as its index records; the patch is corrupt — make it again")
        out[part] = t
    return out


def _check_base(base: Checkpoint, index: dict, entries: list[TensorEntry]) -> None:
    recorded = index["base"]
    made = recorded["ref"] + (f"@{recorded['revision']}" if recorded.get("revision") else "")
    for e in entries:
        if e.kind != KIND_SPARSE:
            continue
        b = base.tensors.get(e.name)
        if b is None:
            raise BaseMismatch(f"base {base.ref} has no tensor {_show(e.name)}, which the patch's base ({made}) "
                               "has; apply the patch to the base it was made from")
        if (b.dtype, b.shape) != (e.dtype, e.shape):
            raise BaseMismatch(f"tensor {_show(e.name)} is {b.dtype} {list(b.shape)} in base {base.ref} but "
                               f"{e.dtype} {list(e.shape)} in the patch's base ({made}); apply the patch to the "
                               "base it was made from")


def apply_patch(base: str, patch: str, out: str, *, cluster: ClusterOptions | None = None, force: bool = False,
                on_done: Callable[[ItemDone], None] | None = None) -> ApplyResult:
    """Rebuild the tuned checkpoint a patch was made from, out of its base and the patch, on Ray.

    ``out`` gets tuned's shard files under their names (and an index when tuned had one,
    its ``config.json`` when it had one) with every tensor bit-identical to tuned's —
    checked by SHA-256 against the patch — in tuned's order within each shard.

    Args:
        base: the base checkpoint (local path or ``org/name[@revision]``).
        patch: a folder written by :func:`make_patch`.
        out: the folder to write (local, or a path every Ray node mounts).
        cluster: Ray address and number of actors.
        force: replace ``out`` if it exists (a file, or a folder raydiff wrote).
        on_done: called as each tensor is written.

    Raises:
        InvalidPatch: the patch is unfinished, missing a shard, truncated or altered (found
            before anything is written).
        BaseMismatch: ``base`` is not the checkpoint the patch was made from (its tensors'
            dtypes, shapes or SHA-256 differ from those recorded).
        OutputExists: ``out`` exists and is not this apply's unfinished folder.
    """
    t0 = time.perf_counter()
    cluster = cluster or ClusterOptions()
    index = read_patch(patch)
    try:
        entries = {e.name: e for e in (TensorEntry.from_json(d) for d in index["tensors"])}
        layout = index["tuned_layout"]
        shards = [(s["name"], s["metadata"], s["tensors"]) for s in layout["shards"]]
        listed = [n for _, _, tensors in shards for n in tensors]
        if sorted(listed) != sorted(entries) or any(e.dtype not in DTYPES for e in entries.values()):
            raise ValueError("its shard layout and its tensors disagree")
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidPatch(f"{patch}/{PATCH_INDEX}: malformed ({type(e).__name__}: {e}); make the patch again") from None
    infos = _verify_shards(patch, index)
    where = {name: _locate(e, infos) for name, e in entries.items()}
    base_ck = resolve(base)
    _check_base(base_ck, index, list(entries.values()))
    job = {"kind": "apply", "version": VERSION, "patch": index["checksum"], "base": _ident(base_ck)}
    result_path, out = out, os.path.abspath(out)  # actors may run in another folder
    resumed = _prepare(out, job, force, APPLIED)
    items, remaining, tmps, shard_of = [], {}, {}, {}
    try:
        for name, meta, tensors in shards:
            final = os.path.join(out, name)
            if os.path.exists(final):
                continue
            tmp = tmps[name] = temp_name(final)
            offsets = preallocate(tmp, [TensorSpec(n, entries[n].dtype, entries[n].shape) for n in tensors], meta)
            remaining[name] = 0
            for n, off in zip(tensors, offsets):
                e = entries[n]
                if e.numel == 0:
                    continue
                items.append(RebuildItem(e, tmp, off, base_ck.tensors.get(n) if e.kind == KIND_SPARSE else None,
                                         **where[n]))
                remaining[name] += 1
                shard_of[n] = name
        for name in [s for s, left in remaining.items() if not left]:
            finish(tmps.pop(name), os.path.join(out, name))

        def done(d: ItemDone) -> None:
            s = shard_of[d.key]
            remaining[s] -= 1
            if not remaining[s]:
                finish(tmps.pop(s), os.path.join(out, s))
            if on_done is not None:
                on_done(d)

        _run(items, cluster, _hub(base_ck), done)
    except (BaseMismatch, InvalidPatch):
        shutil.rmtree(out, ignore_errors=True)  # of no use with another base or patch: nothing stays
        raise
    except BaseException:
        _abandon(out)
        raise
    if layout.get("index"):
        weight_map = {n: name for name, _, tensors in shards for n in tensors}
        total = sum(entries[n].numel * _itemsize(entries[n].dtype) for n in weight_map)
        write_small(os.path.join(out, INDEX_NAME), json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode())
    if isinstance(layout.get("config"), dict):
        write_small(os.path.join(out, "config.json"), json.dumps(layout["config"], indent=2).encode())
    _done(out, APPLIED, json.dumps({"patch": os.path.abspath(patch), "patch_checksum": index["checksum"],
                                    "base": _ident(base_ck), "tuned": index["tuned"]}, indent=1).encode())
    nbytes = sum(e.numel * _itemsize(e.dtype) for e in entries.values())
    return ApplyResult(path=result_path, shards=len(shards), tensors=len(entries), nbytes=nbytes, resumed=resumed,
                       seconds=time.perf_counter() - t0)


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize
