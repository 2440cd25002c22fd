"""Checkpoints as frozen records: which files hold the tensors, and where each tensor lives.

A checkpoint is a local directory in Hugging Face layout (``model.safetensors``, or
``model.safetensors.index.json`` + shards, or any ``*.safetensors``), a single file, or the
same on the Hub at one commit (:mod:`raydiff.inputs.refs`). Its :class:`Checkpoint` record
holds the parsed headers of every shard and the identity a run records, never tensor data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from raydiff.errors import CheckpointNotFound, InvalidCheckpoint
from raydiff.inputs.safetensors import (
    PICKLE_SUFFIXES,
    ShardHeader,
    TensorInfo,
    _path,
    _pickle_refusal,
    _show,
    parse_header,
)

#: Refuse index / config JSON files larger than this.
MAX_JSON_BYTES = 50_000_000
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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
