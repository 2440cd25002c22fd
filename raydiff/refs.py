"""Checkpoint references → resolved :class:`~raydiff.checkpoint.Checkpoint` records.

A reference is a local path (directory in Hugging Face layout, or one ``.safetensors``
file) or a Hub id ``org/name[@revision]``. Local paths win when both readings are possible.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from raydiff.checkpoint import Checkpoint, load_checkpoint
from raydiff.errors import CheckpointNotFound

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
#: Files fetched for a Hub checkpoint: weights, index and config — never pickles.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json"]


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
        Hub commit sha (``None`` for local references).

    Raises:
        CheckpointNotFound: neither an existing path nor a Hub repo that can be resolved.
    """
    if os.path.exists(ref):
        return load_checkpoint(ref)
    hub = parse_hub_id(ref)
    if hub is None:
        raise CheckpointNotFound(
            f"{ref!r}: no such file or directory, and not a Hub id of the form org/name[@revision]"
        )
    repo_id, revision = hub
    path = _hub_snapshot(repo_id, revision)
    return load_checkpoint(path, ref=repo_id, revision=Path(path).name)


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    """Local snapshot directory of a Hub revision: from the HF cache, else downloaded.

    Honours ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and
    ``HF_TOKEN`` exactly as ``huggingface_hub`` does.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except HFValidationError as e:  # e.g. `a--b/c` or a 200-character name: no Hub repo can have it
        raise CheckpointNotFound(
            f"{what!r}: no such file or directory, and not a valid Hub repo id ({str(e).rstrip('.')}); "
            "check the path or the repo name"
        ) from None
    except GatedRepoError:
        raise CheckpointNotFound(
            f"{what}: the repo is gated; accept its terms on the Hub, then log in "
            "(`huggingface-cli login`) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFound(
            f"{what}: no such Hub repo, or it is private; check the name, or log in / set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointNotFound(f"{what}: the repo has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise CheckpointNotFound(
            f"{what}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network); download it first or unset HF_HUB_OFFLINE"
        ) from None
