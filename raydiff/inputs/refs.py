"""Checkpoint references → resolved :class:`~raydiff.inputs.checkpoint.Checkpoint` records.

A reference is a local path (directory in Hugging Face layout, or one ``.safetensors``
file) or a Hub id ``org/name[@revision]``. Local paths win when both readings are possible.

A Hub checkpoint is planned from what the Hub says about one commit, reading no tensor
byte: the file list (one API call, which also turns a branch or tag into the commit sha),
the index and ``config.json`` (small files, through the standard cache), and each shard's
header by HTTP range (:func:`raydiff.inputs.remote.read_header_bytes`). Its tensors are located
at ``hf://org/name@<sha>/<shard>``; the actors fetch their own bytes from there. Under
``HF_HUB_OFFLINE`` the checkpoint is read from the local Hugging Face cache instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

from raydiff.errors import CheckpointNotFound
from raydiff.inputs.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    _read_json,
    assemble,
    index_weight_map,
    load_checkpoint,
    revision_fingerprint,
    shard_names,
)
from raydiff.inputs.hub import _api, commit_files, hub_errors, resolve_sha
from raydiff.inputs.remote import location, read_header_bytes
from raydiff.inputs.safetensors import parse_header_bytes

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
#: Files taken from the cache for a Hub checkpoint offline: weights, index and config — never pickles.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json"]
#: Shard headers read at once when planning a Hub checkpoint.
HEADER_READERS = 8


@dataclass(frozen=True)
class Identity:
    """What a run records of a checkpoint: ``ref``, ``revision`` and ``fingerprint``, as in
    :class:`~raydiff.inputs.checkpoint.Checkpoint` (which has the same three attributes)."""

    ref: str
    revision: str | None
    fingerprint: str


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """Split ``org/name[@revision]`` into ``(repo_id, revision)``; ``None`` if not a Hub id.

    Example:
        >>> parse_hub_id("allenai/Llama-3.1-Tulu-3-8B-DPO@main")
        ('allenai/Llama-3.1-Tulu-3-8B-DPO', 'main')
    """
    m = _HUB_ID.match(ref)
    if not m or ".." in ref:
        return None
    return m.group("repo"), m.group("rev")


def resolve(ref: str) -> Checkpoint:
    """Resolve a reference to a checkpoint record, reading only the index and headers.

    Args:
        ref: local path, or Hub id ``org/name[@revision]`` (revision: branch, tag or sha).

    Returns:
        The checkpoint; ``ref`` holds an absolute path or the repo id, ``revision`` the
        Hub commit sha (``None`` for local references). A Hub checkpoint's fingerprint
        depends on its commit sha only, so ``org/name@main``, ``org/name@v1`` and
        ``org/name@<sha>`` naming one commit resolve to the same identity (and run id).

    Raises:
        CheckpointNotFound: neither an existing path nor a Hub repo that can be resolved
            (private and gated repos say how to get access).
        HubError: the Hub cannot be reached or failed.
    """
    if os.path.exists(ref):
        return load_checkpoint(ref)
    repo_id, revision = _hub_ref(ref)
    from huggingface_hub import constants

    if constants.is_offline_mode():
        path = _hub_snapshot(repo_id, revision)
        return load_checkpoint(path, ref=repo_id, revision=Path(path).name)
    return _hub_checkpoint(repo_id, revision)


def identify(ref: str) -> Identity:
    """The identity a run records for a reference, without downloading anything.

    A Hub reference costs one request to turn its branch or tag into a commit sha (none for
    a sha); a local one reads only its index and headers. ``identify(r)`` equals the
    ``(ref, revision, fingerprint)`` of ``resolve(r)``, so run ids can be computed before a
    checkpoint is fetched (``raydiff watch`` does, to skip what is already analysed).

    Example:
        >>> identify("org/name@main").revision  # doctest: +SKIP
        '3f0c9e…'

    Raises:
        CheckpointNotFound: as :func:`resolve`.
        HubError: the Hub cannot be reached or failed.
    """
    if os.path.exists(ref):
        ck = load_checkpoint(ref)
        return Identity(ck.ref, ck.revision, ck.fingerprint)
    repo_id, revision = _hub_ref(ref)
    sha = resolve_sha(repo_id, revision)
    return Identity(repo_id, sha, revision_fingerprint(sha))


def content_ids(repo_id: str, sha: str) -> dict[str, str]:
    """The content of what an analysis reads of a Hub commit (the files of
    :data:`HUB_PATTERNS`), by path: a safetensors file's LFS sha256, any other file's git
    blob id. One listing of the commit's files, nothing downloaded.

    Two commits with equal content ids give equal results against any base, so ``raydiff
    watch`` skips a commit that changed only, say, its README.

    Example:
        >>> content_ids("org/name", "3f0c" + "0" * 36)  # doctest: +SKIP
        {'config.json': '9a1b…', 'model.safetensors': 'e3b0c442…'}

    Raises:
        CheckpointNotFound: no such repo or commit, or a private or gated one.
        HubError: the Hub cannot be reached or failed.
    """
    import fnmatch

    with hub_errors(repo_id, sha):
        entries = list(_api().list_repo_tree(repo_id, revision=sha, recursive=True))
    out: dict[str, str] = {}
    for e in entries:
        path = getattr(e, "path", "")
        if getattr(e, "blob_id", None) and any(fnmatch.fnmatchcase(path, p) for p in HUB_PATTERNS):
            lfs = getattr(e, "lfs", None)
            out[path] = f"sha256:{lfs.sha256}" if lfs is not None else f"git:{e.blob_id}"
    return out


def _hub_ref(ref: str) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of a reference that is not a local path, or a clear error."""
    hub = parse_hub_id(ref)
    if hub is None:
        raise CheckpointNotFound(
            f"{ref!r}: no such file or directory, and not a Hub id of the form org/name[@revision]"
        )
    return hub


def _hub_checkpoint(repo_id: str, revision: str | None) -> Checkpoint:
    """A Hub commit planned from its file list, index, config and shard headers (by range)."""
    from huggingface_hub import hf_hub_download

    api = _api()
    sha, names = commit_files(repo_id, revision)
    root = location(repo_id, sha, "").rstrip("/")

    def small_json(name: str) -> object:
        with hub_errors(repo_id, revision):
            path = hf_hub_download(repo_id, name, revision=sha, endpoint=api.endpoint)
        return _read_json(Path(path), name)

    weight_map = None
    if INDEX_NAME in names:
        weight_map = index_weight_map(small_json(INDEX_NAME), f"{root}/{INDEX_NAME}")
    files = shard_names(root, names, weight_map)
    config = small_json("config.json") if "config.json" in names else None

    def header(name: str):
        loc = location(repo_id, sha, name)
        size, raw = read_header_bytes(loc, api.endpoint, revision=revision)
        return parse_header_bytes(loc, size, raw)

    with ThreadPoolExecutor(min(HEADER_READERS, max(len(files), 1))) as pool:
        shards = tuple(pool.map(header, files))
    return assemble(repo_id, sha, root, shards, weight_map, config if isinstance(config, dict) else None,
                    revision_fingerprint(sha))


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    """Local snapshot directory of a Hub revision in the HF cache (offline mode).

    Honours ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and
    ``HF_TOKEN`` exactly as ``huggingface_hub`` does. Fetches only :data:`HUB_PATTERNS`.
    """
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
