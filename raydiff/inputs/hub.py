"""The Hugging Face Hub through ``huggingface_hub``: commits of repos, listings, clear errors.

Everything honours the client's standard settings, read by ``huggingface_hub`` itself:
``HF_ENDPOINT``, ``HF_TOKEN`` or the token saved by ``hf auth login``, ``HF_HUB_OFFLINE`` and
the cache (``HF_HOME`` / ``HF_HUB_CACHE``). raydiff never reads, stores or prints a token:
every message that carries text from the client goes through :func:`redact` first.

Example:
    >>> [r.sha for r in list_revisions("org/name", branches=("main",))]  # doctest: +SKIP
    ['3f0c…']
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from raydiff.errors import CheckpointNotFound, HubError

_SHA = re.compile(r"^[0-9a-f]{40}$")
_GLOB = re.compile(r"[*?\[]")
# Hub user access tokens (`hf_` + 34 letters and digits; 20+ leaves names like hf_transfer
# alone), and whatever follows `Bearer` in a header dump.
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}|(?<=Bearer )\S+")


@dataclass(frozen=True)
class Revision:
    """A commit of a Hub repo and the watched branch and tag names that point at it.

    Attributes:
        repo: repo id ``org/name``.
        sha: the commit sha (40 hex digits).
        names: branch and tag names pointing at it, sorted (``("main", "v1.0")``).
    """

    repo: str
    sha: str
    names: tuple[str, ...]

    @property
    def ref(self) -> str:
        """The reference that pins this commit: ``org/name@<sha>``."""
        return f"{self.repo}@{self.sha}"


def is_sha(revision: str | None) -> bool:
    """Whether a revision is a full commit sha (immutable) rather than a branch or tag name."""
    return bool(revision and _SHA.match(revision))


def is_pattern(repo: str) -> bool:
    """Whether a repo id holds glob characters (``org/tuned-*``), i.e. names many repos."""
    return bool(_GLOB.search(repo))


def redact(text: str) -> str:
    """``text`` with the token in use and anything shaped like a Hub token replaced by ``***``.

    Example:
        >>> redact("token hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567 refused; set HF_TOKEN")
        'token *** refused; set HF_TOKEN'
    """
    token = _token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("***", text)


def _token() -> str | None:
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # a broken token file or OIDC exchange: no token to hide, the client will say why
        return None


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def resolve_sha(repo: str, revision: str | None) -> str:
    """The commit sha a branch, tag or sha of ``repo`` points at (``None``: the default branch).

    A full sha is returned as it is: commits are immutable, so no request is needed.

    Raises:
        CheckpointNotFound: no such repo or revision, or a private or gated one.
        HubError: the Hub cannot be reached or failed.
    """
    if is_sha(revision):
        return revision  # type: ignore[return-value]
    return commit_files(repo, revision)[0]


def commit_files(repo: str, revision: str | None) -> tuple[str, list[str]]:
    """The commit sha a revision of ``repo`` names and the paths of the files in it (one
    API call).

    Raises:
        CheckpointNotFound: no such repo or revision, or a private or gated one.
        HubError: the Hub cannot be reached, failed, or gave no commit sha.
    """
    with hub_errors(repo, revision):
        info = _api().model_info(repo, revision=revision)
    if not is_sha(info.sha):
        raise HubError(f"{_what(repo, revision)}: the Hub gave no commit sha for it; check HF_ENDPOINT")
    return info.sha, [s.rfilename for s in (info.siblings or [])]


def list_repos(pattern: str) -> list[str]:
    """Model repos whose id matches ``pattern`` (``org/name-*``; the ``org`` part is literal).

    Asks the Hub for the models of ``org`` whose name contains the pattern's literal prefix,
    then keeps the ids that match the whole pattern (case-sensitive, as ``fnmatch``).

    Raises:
        HubError: the Hub cannot be reached or failed.
    """
    author, _, name = pattern.partition("/")
    prefix = _GLOB.split(name, 1)[0]
    with hub_errors(pattern, None):
        ids = [m.id for m in _api().list_models(author=author, search=prefix or None)]
    return sorted({i for i in ids if fnmatch.fnmatchcase(i, pattern)})


def list_revisions(repo: str, branches: tuple[str, ...] = ("main",), tags: tuple[str, ...] = ()) -> list[Revision]:
    """The commits that ``repo``'s matching branches and tags point at, one per commit.

    Args:
        repo: repo id ``org/name``.
        branches, tags: names or glob patterns (``"v*"``) of the branches and tags to follow.

    Returns:
        One :class:`Revision` per distinct commit, sorted by its names.

    Raises:
        CheckpointNotFound: no such repo, or a private or gated one.
        HubError: the Hub cannot be reached or failed.
    """
    with hub_errors(repo, None):
        refs = _api().list_repo_refs(repo)
    names: dict[str, list[str]] = {}
    for ref in refs.branches:
        if any(fnmatch.fnmatchcase(ref.name, p) for p in branches):
            names.setdefault(ref.target_commit, []).append(ref.name)
    for ref in refs.tags:
        if any(fnmatch.fnmatchcase(ref.name, p) for p in tags):
            names.setdefault(ref.target_commit, []).append(ref.name)
    out = [Revision(repo, sha, tuple(sorted(n))) for sha, n in names.items()]
    return sorted(out, key=lambda r: (r.names, r.sha))


def _what(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision}" if revision else repo


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP library this ``huggingface_hub`` uses."""
    errors: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """Turn ``huggingface_hub`` errors raised inside into raydiff errors that say what to do.

    Raises:
        CheckpointNotFound: invalid id, no such repo or revision, private or gated repo, not
            in the cache while offline.
        HubError: the Hub cannot be reached, refused the token, or failed.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = _what(repo, revision)
    try:
        yield
    except HFValidationError as e:  # e.g. `a--b/c` or a 200-character name: no Hub repo can have it
        raise CheckpointNotFound(
            f"{what!r}: no such file or directory, and not a valid Hub repo id ({redact(str(e)).rstrip('.')}); "
            "check the path or the repo name"
        ) from None
    except GatedRepoError:
        raise CheckpointNotFound(
            f"{what}: the repo is gated; accept its conditions at {constants.ENDPOINT}/{repo} with your Hub "
            "account, then log in with that account (`hf auth login`) or set HF_TOKEN to one of its tokens"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointNotFound(f"{what}: the repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        if _token():
            raise CheckpointNotFound(
                f"{what}: no such Hub repo, or it is private and the token in use (HF_TOKEN or `hf auth login`) "
                "cannot read it; check the name, or use a token with read access to the repo"
            ) from None
        raise CheckpointNotFound(
            f"{what}: no such Hub repo, or it is private and no token is set; check the name, or log in "
            "(`hf auth login`) or set HF_TOKEN to a token with read access to the repo"
        ) from None
    except IncompleteSnapshotError:
        raise CheckpointNotFound(
            f"{what}: the local Hugging Face cache holds only part of it and the Hub cannot be reached; "
            "download it again with network access"
        ) from None
    except OfflineModeIsEnabled:  # an API call (listing, a branch → commit): the cache cannot answer it
        raise HubError(
            f"{what}: HF_HUB_OFFLINE is set, so the Hub cannot be asked for branches, tags or commits; "
            "unset HF_HUB_OFFLINE, or name the commit (org/name@<sha>) of a checkpoint in the cache"
        ) from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointNotFound(
                f"{what}: not in the local Hugging Face cache and the Hub cannot be reached "
                "(HF_HUB_OFFLINE is set or there is no network); download it first or unset HF_HUB_OFFLINE"
            ) from None
        raise HubError(
            f"{what}: the Hub at {constants.ENDPOINT} cannot be reached or failed, and it is not in the local "
            "cache; check the network (and HF_ENDPOINT), then try again"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(
                f"{what}: the Hub refused the token in use (HF_TOKEN or `hf auth login`) as invalid or expired; "
                "log in again or set HF_TOKEN to a valid token"
            ) from None
        raise HubError(
            f"{what}: the Hub at {constants.ENDPOINT} answered HTTP {status}; try again later"
        ) from None
    except _transport_errors() as e:
        raise HubError(
            f"{what}: cannot reach the Hub at {constants.ENDPOINT} ({type(e).__name__}: {redact(str(e))}); "
            "check the network and HF_ENDPOINT"
        ) from None
