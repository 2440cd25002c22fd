"""Checkpoints as frozen records: safetensors headers and index, parsed before any tensor byte.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``), then the data.
Everything here is validated strictly — checkpoints come from strangers — and every problem
is an :class:`~raydiff.errors.InvalidCheckpoint` naming the file and tensor.
Tensor names are data, never paths: nothing here builds a path from a tensor name.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raydiff.errors import CheckpointNotFound, InvalidCheckpoint, UnsupportedFormat
from raydiff.remote import is_remote

if TYPE_CHECKING:
    from raydiff.remote import HubFiles

#: Refuse headers larger than this (the safetensors library uses the same 100 MB bound).
MAX_HEADER_BYTES = 100_000_000
#: Refuse index / config JSON files larger than this.
MAX_JSON_BYTES = 50_000_000
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its code, size, kind and the numpy dtype of its raw bits."""

    code: str
    itemsize: int
    kind: str  # "float", "int" or "bool"
    bits: str  # numpy dtype of the stored bits (unsigned int of the same width)

    @property
    def is_float(self) -> bool:
        return self.kind == "float"


DTYPES: Mapping[str, DType] = {
    d.code: d
    for d in (
        DType("F64", 8, "float", "<u8"),
        DType("F32", 4, "float", "<u4"),
        DType("F16", 2, "float", "<u2"),
        DType("BF16", 2, "float", "<u2"),
        DType("F8_E4M3", 1, "float", "u1"),
        DType("F8_E5M2", 1, "float", "u1"),
        DType("I64", 8, "int", "<u8"),
        DType("I32", 4, "int", "<u4"),
        DType("I16", 2, "int", "<u2"),
        DType("I8", 1, "int", "u1"),
        DType("U64", 8, "int", "<u8"),
        DType("U32", 4, "int", "<u4"),
        DType("U16", 2, "int", "<u2"),
        DType("U8", 1, "int", "u1"),
        DType("BOOL", 1, "bool", "u1"),
    )
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live, from its shard's header.

    Attributes:
        name: tensor name exactly as stored (data, never used as a path).
        dtype: safetensors dtype code, e.g. ``"BF16"``.
        shape: tensor shape (``()`` for a scalar).
        file: absolute path of the shard holding it.
        offset: absolute byte offset of its first byte in ``file``.
        nbytes: size of its data in bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one ``.safetensors`` file."""

    path: str
    size: int
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as resolved: its identity and every tensor's location, no tensor data.

    Attributes:
        ref: the reference as resolved: an absolute local path or a Hub repo id.
        revision: commit sha for Hub references, ``None`` for local ones.
        root: local directory (or file) the shards were read from.
        shards: parsed headers of every shard, in file-name order.
        tensors: tensor name → location.
        config: contents of ``config.json`` if present.
        fingerprint: stable digest of the files' identity: names, sizes and mtimes for
            local references; for Hub references the commit sha alone
            (:func:`revision_fingerprint`), so the same commit has the same identity on every
            machine and whichever branch or tag named it.
    """

    ref: str
    revision: str | None
    root: str
    shards: tuple[ShardHeader, ...]
    tensors: Mapping[str, TensorInfo]
    config: Mapping[str, object] | None
    fingerprint: str

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _shape_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Parse and validate the header of one safetensors file without reading tensor data.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The shard's header with absolute offsets for every tensor.

    Raises:
        InvalidCheckpoint: truncated file, oversized or non-JSON header, unknown dtype,
            offsets outside the file, overlapping, or not matching shape × dtype size; a
            pickle renamed to ``.safetensors`` (refused, never unpickled).

    Example:
        >>> parse_header("model.safetensors").tensors[0].dtype  # doctest: +SKIP
        'BF16'
    """
    p = os.path.abspath(path)
    where = _path(p)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = header_length(p, size, prefix)
            raw = f.read(n)
    except FileNotFoundError as e:
        raise CheckpointNotFound(f"{where}: no such file") from e
    except IsADirectoryError as e:
        raise InvalidCheckpoint(f"{where}: is a directory, expected a .safetensors file") from e
    except OSError as e:  # a name too long, a symlink loop, no permission, an I/O error
        raise InvalidCheckpoint(f"{where}: cannot be read ({e.strerror or e}); check the file") from None
    return parse_header_bytes(p, size, raw)


def header_length(where: str, size: int, prefix: bytes) -> int:
    """The header length a safetensors file's 8-byte ``prefix`` declares, checked against the
    file's ``size`` before any more of it is read (local files and Hub ranges alike).

    Raises:
        InvalidCheckpoint: too short, a pickle under a .safetensors name, an oversized header,
            or a header longer than the file.
    """
    where = _path(where)
    if len(prefix) < 8:
        raise InvalidCheckpoint(
            f"{where}: file is {size} bytes, too short for a safetensors header; "
            "the file is truncated — download or save it again"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if (n > MAX_HEADER_BYTES or 8 + n > size) and _looks_pickled(prefix):
        raise InvalidCheckpoint(
            f"{where}: is a pickle (or torch.save zip) under a .safetensors name, not "
            f"safetensors; {_PICKLE_ADVICE}"
        )
    if n > MAX_HEADER_BYTES:
        raise InvalidCheckpoint(
            f"{where}: header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte limit; "
            "this is not a valid safetensors file"
        )
    if 8 + n > size:
        raise InvalidCheckpoint(
            f"{where}: header claims {n} bytes but the file has only {size - 8} after the "
            "length prefix; the file is truncated — download or save it again"
        )
    return n


def _looks_pickled(prefix: bytes) -> bool:
    """A pickle (``\\x80`` + protocol 2–5) or a ``torch.save`` zip, renamed to ``.safetensors``."""
    return (prefix[0] == 0x80 and 2 <= prefix[1] <= 5) or prefix[:4] == b"PK\x03\x04"


class _DupDict(dict):
    """A JSON object that named ``dup`` more than once (``json`` alone keeps the last silently)."""

    dup: str


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            break
        seen.add(key)
    out = _DupDict(d)
    out.dup = key
    return out


def parse_header_bytes(p: str, size: int, raw: bytes) -> ShardHeader:
    """Validate a header's JSON bytes (``raw``, after the length prefix) of the file at
    ``p`` (a path or a Hub location) of ``size`` bytes; :func:`parse_header` without the I/O."""
    where = _path(p)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpoint(f"{where}: header is not valid UTF-8 JSON ({e}); not a safetensors file") from None
    except (ValueError, RecursionError):  # a 5000-digit number, or [[[[…]]]] nested past the stack
        raise InvalidCheckpoint(
            f"{where}: header JSON holds a number too long or nesting too deep to be a safetensors "
            "header; not a safetensors file"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidCheckpoint(f"{where}: header is JSON but not an object; not a safetensors file")
    if isinstance(obj, _DupDict):
        raise InvalidCheckpoint(
            f"{where}: header lists tensor {_show(obj.dup)} twice; the file is ambiguous — save it again"
        )
    data_start = 8 + len(raw)
    data_len = size - data_start
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidCheckpoint(
            f"{where}: __metadata__ must map strings to strings; the header is corrupt — save the file again"
        )
    tensors: list[TensorInfo] = []
    for name, entry in obj.items():
        tensors.append(_parse_entry(p, name, entry, data_start, data_len))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise InvalidCheckpoint(
                f"{where}: tensors {_show(name_a)} and {_show(name_b)} overlap in the file; "
                "the header is corrupt"
            )
    tensors.sort(key=lambda t: t.name)
    return ShardHeader(path=p, size=size, data_start=data_start, tensors=tuple(tensors), metadata=metadata)


def _show(name: str, limit: int = 120) -> str:
    """A tensor name quoted for a message: control characters escaped, long names cut."""
    r = json.dumps(name, ensure_ascii=True)
    return r if len(r) <= limit else r[: limit - 5] + "…\" (" + str(len(name)) + " chars)"


def _path(path: str | os.PathLike[str]) -> str:
    """A path for a message: as it is, or quoted like :func:`_show` when a file name from a
    stranger holds a newline or other unprintable character (an error stays one line)."""
    s = os.fspath(path)
    return s if s.isprintable() else _show(s, limit=400)


def _brief(value: object, limit: int = 60) -> str:
    """A header value for a message: its repr, cut so a hostile value cannot flood the line."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def _parse_entry(p: str, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    where = f"{_path(p)}: tensor {_show(name)}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800" escape: a str no Parquet file or terminal can hold
        raise InvalidCheckpoint(
            f"{where}: the name is not valid Unicode (a lone surrogate); the header is corrupt"
        ) from None
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(f"{where}: header entry is not an object; the header is corrupt")
    if isinstance(entry, _DupDict):
        raise InvalidCheckpoint(f"{where}: header entry gives {_show(entry.dup)} twice; the header is corrupt")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        known = ", ".join(DTYPES)
        raise InvalidCheckpoint(
            f"{where}: unknown dtype {_brief(dtype)} (raydiff reads {known}); "
            "save the tensor in one of those"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape
    ):
        raise InvalidCheckpoint(
            f"{where}: shape {_brief(shape)} is not a list of non-negative integers; the header is corrupt"
        )
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InvalidCheckpoint(
            f"{where}: data_offsets {_brief(offsets)} is not a pair of integers; the header is corrupt"
        )
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InvalidCheckpoint(
            f"{where}: data_offsets [{begin}, {end}] lie outside the file's {data_len} data "
            "bytes; the file is truncated or corrupt"
        )
    numel = _shape_numel(tuple(shape))
    expected = numel * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise InvalidCheckpoint(
            f"{where}: holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}; "
            "the header is corrupt"
        )
    return TensorInfo(name, dtype, tuple(shape), p, data_start + begin, end - begin)


def _read_json(path: Path, what: str) -> object:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InvalidCheckpoint(f"{_path(path)}: {what} is {size} bytes, over the {MAX_JSON_BYTES}-byte limit")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpoint(
            f"{_path(path)}: {what} is not valid JSON ({e}); the file is corrupt — download or save it again"
        ) from None
    except (ValueError, RecursionError):  # a 5000-digit number, or nesting past the stack
        raise InvalidCheckpoint(
            f"{_path(path)}: {what} holds a number too long or nesting too deep; the file is corrupt — "
            "download or save it again"
        ) from None
    except OSError as e:
        raise InvalidCheckpoint(f"{_path(path)}: {what} cannot be read ({e.strerror or e})") from None


def _is_file(path: Path) -> bool:
    """``Path.is_file`` that is ``False``, not an exception, for a name too long to exist."""
    try:
        return path.is_file()
    except OSError:
        return False


def revision_fingerprint(revision: str) -> str:
    """The fingerprint of a Hub checkpoint at a commit: a digest of the commit sha alone.

    A commit fixes every file's content, so nothing about the local copy (cache path, file
    mtimes after a re-download) may change it; it is computable before any download.

    Example:
        >>> revision_fingerprint("a" * 40) == revision_fingerprint("a" * 40)
        True
    """
    return hashlib.sha256(f"hub-commit\0{revision}".encode()).hexdigest()[:32]


def load_checkpoint(path: str | os.PathLike[str], *, ref: str | None = None,
                    revision: str | None = None) -> Checkpoint:
    """Read a local checkpoint's index and shard headers into a :class:`Checkpoint`.

    Accepts a directory in Hugging Face layout (``model.safetensors.index.json`` + shards,
    ``model.safetensors``, or any ``*.safetensors`` files) or a single ``.safetensors`` file.

    Args:
        path: local directory or file.
        ref: the reference to record (defaults to the absolute path).
        revision: the revision to record (Hub commit sha), if any; when given, the
            fingerprint is :func:`revision_fingerprint` of it instead of the files' mtimes.

    Raises:
        CheckpointNotFound: nothing at ``path`` or no safetensors files in it.
        UnsupportedFormat: only pickle checkpoints (``.bin``/``.pt``) are present.
        InvalidCheckpoint: malformed index or shard, or a tensor stored twice.
    """
    root = Path(path).absolute()
    if not os.path.exists(root):
        raise CheckpointNotFound(f"{_path(root)}: no such file or directory")
    if not (root.is_file() or root.is_dir()):
        raise InvalidCheckpoint(
            f"{_path(root)}: is neither a directory nor a regular file; point raydiff at a "
            "checkpoint directory or a .safetensors file"
        )
    config = None
    weight_map = None
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(str(root))
        files = [root]
        cfg = root.parent / "config.json"
    else:
        if _is_file(root / INDEX_NAME):
            weight_map = index_weight_map(_read_json(root / INDEX_NAME, INDEX_NAME), f"{root}/{INDEX_NAME}")
        present = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES or _is_file(p)]
        files = [root / n for n in shard_names(str(root), present, weight_map)]
        cfg = root / "config.json"
    if _is_file(cfg):
        c = _read_json(cfg, "config.json")
        config = c if isinstance(c, dict) else None
    shards = tuple(parse_header(f) for f in files)
    if revision:
        fingerprint = revision_fingerprint(revision)
    else:
        digest = hashlib.sha256()
        for f in files:
            st = f.stat()
            digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        fingerprint = digest.hexdigest()[:32]
    return assemble(ref or str(root), revision, str(root), shards, weight_map, config, fingerprint)


def assemble(ref: str, revision: str | None, root: str, shards: tuple[ShardHeader, ...],
             weight_map: Mapping[str, str] | None, config: Mapping[str, object] | None,
             fingerprint: str) -> Checkpoint:
    """A :class:`Checkpoint` from parsed shard headers, local or on the Hub.

    Raises:
        InvalidCheckpoint: a tensor stored in two shards, or an index that does not match
            the shards' headers.
    """
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for t in shard.tensors:
            if t.name in tensors:
                raise InvalidCheckpoint(
                    f"{_path(root)}: tensor {_show(t.name)} is stored twice, in "
                    f"{_path(_basename(tensors[t.name].file))} and {_path(_basename(t.file))}; "
                    "the checkpoint is ambiguous — remove one copy"
                )
            tensors[t.name] = t
    if weight_map is not None:
        for name, shard in weight_map.items():
            t = tensors.get(name)
            if t is None or _basename(t.file) != shard:
                raise InvalidCheckpoint(
                    f"{_path(root + '/' + INDEX_NAME)}: lists tensor {_show(name)} in {_path(shard)}, but that "
                    "shard's header does not hold it; the index and shards are from different saves"
                )
    return Checkpoint(ref=ref, revision=revision, root=root, shards=shards, tensors=dict(sorted(tensors.items())),
                      config=config, fingerprint=fingerprint)


def _basename(file: str) -> str:
    return file.rsplit("/", 1)[-1]


_PICKLE_ADVICE = (
    "raydiff never unpickles files (loading one can run arbitrary code). Convert it to safetensors "
    "in a trusted environment (e.g. `safetensors.torch.save_file(torch.load(f, weights_only=True), out)`) "
    "and point raydiff at the result"
)


def _pickle_refusal(path: str) -> UnsupportedFormat:
    return UnsupportedFormat(f"{_path(path)}: is a pickle checkpoint; {_PICKLE_ADVICE}")


def index_weight_map(index: object, where: str) -> dict[str, str]:
    """The validated ``weight_map`` (tensor name → shard file name) of a parsed index JSON.

    Args:
        index: the parsed ``model.safetensors.index.json``.
        where: its path or Hub location, for messages.

    Raises:
        InvalidCheckpoint: no weight_map, a shard name that is not a plain file name (a
            path outside the checkpoint), or a shard that is not ``.safetensors``.
        UnsupportedFormat: a shard is a pickle.
    """
    wm = index.get("weight_map") if isinstance(index, dict) else None
    shown = _path(where)
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise InvalidCheckpoint(
            f"{shown}: has no weight_map of tensor name → shard file; the index is corrupt — download it again"
        )
    folder = where.rsplit("/", 1)[0]
    for shard in sorted(set(wm.values())):
        if shard != os.path.basename(shard) or shard in ("", ".", "..") or "\\" in shard or "\0" in shard:
            raise InvalidCheckpoint(
                f"{shown}: shard name {_show(shard)} is not a plain file name in the "
                "checkpoint directory; refusing to read outside it"
            )
        if not shard.endswith(".safetensors"):
            if shard.endswith(PICKLE_SUFFIXES):
                raise _pickle_refusal(f"{folder}/{shard}")
            raise InvalidCheckpoint(f"{shown}: shard {_show(shard)} is not a .safetensors file")
    return wm


def shard_names(root: str, present: list[str], weight_map: Mapping[str, str] | None) -> list[str]:
    """Which of the files ``present`` in a checkpoint (local directory or Hub commit ``root``)
    hold its tensors: the index's shards, else ``model.safetensors``, else every
    ``*.safetensors`` file (any names), sorted.

    Raises:
        InvalidCheckpoint: the index names a shard that is not present.
        UnsupportedFormat: only pickle checkpoints are present.
        CheckpointNotFound: no safetensors files at all.
    """
    have = set(present)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        for f in files:
            if f not in have:
                raise InvalidCheckpoint(
                    f"{_path(root + '/' + INDEX_NAME)}: names shard {_path(f)}, which is missing from "
                    f"{_path(root)}; the download is incomplete — fetch the missing shard"
                )
        return files
    if SINGLE_NAME in have:
        return [SINGLE_NAME]
    files = sorted(n for n in have if n.endswith(".safetensors") and "/" not in n)
    if files:
        return files
    pickles = sorted(n for n in have if n.endswith(PICKLE_SUFFIXES) and "/" not in n)
    if pickles:
        raise _pickle_refusal(f"{root}/{pickles[0]}")
    raise CheckpointNotFound(
        f"{_path(root)}: holds no .safetensors files (expected {SINGLE_NAME} or {INDEX_NAME} and shards)"
    )


class TensorReader:
    """Reads of tensor bytes: zero-copy through read-only memory maps, one per file.

    Hub files (``hf://`` locations) are read through ``hub``, a
    :class:`raydiff.remote.HubFiles`: memory-mapped from the node's Hugging Face cache
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
        off = info.offset + start * d.itemsize
        count = stop - start
        path = info.file
        if is_remote(path):
            if self._hub is None:
                from raydiff.remote import HubAccess, HubFiles

                self._hub = HubFiles(HubAccess())
            local = self._hub.local_path(path)
            if local is None:
                data = self._hub.read(path, off, off + count * d.itemsize, f"tensor {_show(info.name)}")
                out = np.frombuffer(data, dtype=np.dtype(d.bits), count=count)
                out.flags.writeable = False
                return out
            path = local
        m = self._map(path)
        if off + count * d.itemsize > len(m):
            raise InvalidCheckpoint(
                f"{_path(info.file)}: tensor {_show(info.name)} extends past the end of the file; "
                "the file changed or was truncated since its header was read"
            )
        return np.frombuffer(m, dtype=np.dtype(d.bits), count=count, offset=off)

    def close(self) -> None:
        self._maps.clear()
