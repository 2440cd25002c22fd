"""safetensors files as frozen records: a shard's header parsed and validated, no tensor byte read.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``), then the data.
Everything here is validated strictly — checkpoints come from strangers — and every problem
is an :class:`~raydiff.errors.InvalidCheckpoint` naming the file and tensor.
Tensor names are data, never paths: nothing here builds a path from a tensor name.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from raydiff.dtypes import DTYPES
from raydiff.errors import CheckpointNotFound, InvalidCheckpoint, UnsupportedFormat

#: Refuse headers larger than this (the safetensors library uses the same 100 MB bound).
MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """Byte range ``[begin, end)`` in ``file`` of elements ``[start, stop)`` (flat)."""
        size = DTYPES[self.dtype].itemsize
        return self.offset + start * size, self.offset + stop * size


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one ``.safetensors`` file."""

    path: str
    size: int
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)


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


_PICKLE_ADVICE = (
    "raydiff never unpickles files (loading one can run arbitrary code). Convert it to safetensors "
    "in a trusted environment (e.g. `safetensors.torch.save_file(torch.load(f, weights_only=True), out)`) "
    "and point raydiff at the result"
)


def _pickle_refusal(path: str) -> UnsupportedFormat:
    return UnsupportedFormat(f"{_path(path)}: is a pickle checkpoint; {_PICKLE_ADVICE}")
