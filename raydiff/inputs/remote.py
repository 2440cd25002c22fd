"""Bytes of Hub files, read where they are needed: by HTTP range, or from the node's HF cache.

A Hub checkpoint's tensors are located by ``hf://org/name@<sha>/<file>`` (:func:`location`):
the commit, never a branch, so every read of a run sees the same bytes. The driver reads
only the shard headers (:func:`read_header_bytes`, two small ranges per shard);
each actor then reads its own units' bytes with :class:`HubFiles`:

- a file already in the node's Hugging Face cache at that commit is memory-mapped from
  there, with no request at all;
- ``fetch="ranges"`` (default) asks for exactly the unit's bytes with one ``Range`` request
  per side, streamed into one buffer: nothing is written to disk, and tensors the plan
  does not compare are never fetched;
- ``fetch="cache"`` downloads each needed shard once into the node's cache (the standard
  ``hf_hub_download``, whose file lock makes the actors of a node share one download), so
  later runs against the same base read it locally.

Requests go through ``huggingface_hub``'s own HTTP client and token handling (``HF_TOKEN``
or the saved login of the node the actor runs on). Redirects to the CDN are followed
without the ``Authorization`` header, as ``huggingface_hub`` itself does. Transient
failures (connection lost, 429, 5xx) are retried with back-off; the rest become the
errors of :func:`raydiff.hub.hub_errors`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from raydiff.errors import HubError, InvalidCheckpoint
from raydiff.inputs.hub import _transport_errors, hub_errors
from raydiff.inputs.safetensors import header_length
from raydiff.options import HUB_FETCH

#: Scheme of Hub file locations in :class:`~raydiff.checkpoint.TensorInfo`.
HUB_SCHEME = "hf://"
_LOCATION = re.compile(r"^hf://(?P<repo>[^@/]+/[^@/]+)@(?P<sha>[0-9a-f]{40})/(?P<file>.+)$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRY_STATUS = (429, 500, 502, 503, 504)
_ATTEMPTS = 5
_TIMEOUT_S = 60.0


def location(repo: str, sha: str, filename: str) -> str:
    """The location of a file of a Hub commit, as tensors record it.

    Example:
        >>> location("org/name", "a" * 40, "model.safetensors")[:22]
        'hf://org/name@aaaaaaaa'
    """
    return f"{HUB_SCHEME}{repo}@{sha}/{filename}"


def parse_location(loc: str) -> tuple[str, str, str]:
    """``(repo, sha, filename)`` of a :func:`location`."""
    m = _LOCATION.match(loc)
    if m is None:
        raise ValueError(f"not a Hub file location: {loc!r}")
    return m["repo"], m["sha"], m["file"]


def is_remote(path: str) -> bool:
    return path.startswith(HUB_SCHEME)


def _api(endpoint: str | None):
    from huggingface_hub import HfApi

    from raydiff.inputs import hub

    return HfApi(endpoint=endpoint) if endpoint else hub._api()


def get_range(loc: str, start: int, stop: int, endpoint: str | None = None,
              revision: str | None = "") -> tuple[memoryview, int]:
    """Bytes ``[start, stop)`` of a Hub file and the file's total size.

    Args:
        loc: a :func:`location`.
        start, stop: the byte range (``stop`` past the end of a file is cut to its end).
        endpoint: the Hub to ask (default: ``huggingface_hub``'s, i.e. ``HF_ENDPOINT``).
        revision: the revision to name in errors, as the user gave it (``None``: none;
            default: the commit sha).

    Raises:
        CheckpointNotFound: repo, revision or file gone, private or gated.
        HubError: the Hub failed after retries, or answered without honouring the range.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    repo, sha, filename = parse_location(loc)
    api = _api(endpoint)
    url = hf_hub_url(repo, filename, revision=sha, endpoint=api.endpoint)
    headers = {**build_hf_headers(token=api.token), "Range": f"bytes={start}-{stop - 1}",
               "Accept-Encoding": "identity"}
    buf = memoryview(bytearray(stop - start))  # the body streams into it: one copy, no join
    retryable = (*_transport_errors(), _ShortBody)
    with hub_errors(repo, sha if revision == "" else revision):
        for attempt in range(_ATTEMPTS):
            try:
                with get_session().stream("GET", url, headers=headers, timeout=_TIMEOUT_S) as r:
                    if r.status_code in _RETRY_STATUS and attempt + 1 < _ATTEMPTS:
                        time.sleep(min(2.0**attempt, 8.0))
                        continue
                    if r.status_code >= 400:
                        r.read()  # the error's body, for huggingface_hub's message
                        hf_raise_for_status(r)
                    total, end = _content_range(r, loc, start, stop)
                    want = end - start
                    n = 0
                    for chunk in r.iter_bytes():
                        if n + len(chunk) > want:
                            raise HubError(f"{loc}: the Hub sent more bytes than the range asked; try again")
                        buf[n:n + len(chunk)] = chunk
                        n += len(chunk)
                    if n != want:
                        raise _ShortBody(f"{loc}: connection closed after {n} of {want} bytes")
                    return buf[:n], total
            except retryable as e:
                if attempt + 1 == _ATTEMPTS:
                    if isinstance(e, _ShortBody):
                        raise HubError(f"{e} on each of {_ATTEMPTS} tries; check the network, then submit again "
                                       "(the run resumes)") from None
                    raise
                time.sleep(min(2.0**attempt, 8.0))
    raise AssertionError("unreachable")


class _ShortBody(Exception):
    """The body ended before the range did: a dropped connection, retried like one."""


def _content_range(r, loc: str, start: int, stop: int) -> tuple[int, int]:
    """``(file size, end of the bytes sent)`` of a response, checked against what was asked."""
    if r.status_code != 206:
        raise HubError(
            f"{loc}: the Hub answered HTTP {r.status_code} to a byte-range request instead of 206; raydiff reads "
            "Hub files by range — use an endpoint that supports Range (huggingface.co does), or download the "
            "checkpoint and pass its directory"
        )
    m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
    if m is None or m[3] == "*" or int(m[1]) != start:
        raise HubError(f"{loc}: the Hub's Content-Range {r.headers.get('Content-Range')!r} does not answer "
                       f"bytes={start}-{stop - 1}; try again")
    total = int(m[3])
    end = int(m[2]) + 1
    if end != min(stop, total):
        raise HubError(f"{loc}: the Hub sent bytes {start}-{end - 1} of {total}, not {start}-{stop - 1}; try again")
    return total, end


def read_header_bytes(loc: str, endpoint: str | None = None, revision: str | None = "") -> tuple[int, bytes]:
    """``(file size, header JSON bytes)`` of a Hub safetensors file, by range.

    Two requests: the 8-byte length prefix, then exactly the header it declares, once
    :func:`raydiff.checkpoint.header_length` has checked that length against the file's
    size. Not one tensor byte is read (a larger first request, as ``huggingface_hub``'s
    ``get_safetensors_metadata`` makes, would save a round trip but read tensor data).
    """

    prefix, size = get_range(loc, 0, 8, endpoint, revision=revision)
    n = header_length(loc, size, bytes(prefix))
    header, _ = get_range(loc, 8, 8 + n, endpoint, revision=revision)
    return size, bytes(header)


@dataclass(frozen=True)
class HubAccess:
    """How an actor reaches Hub files: the endpoint the driver resolved against, and
    ``fetch`` — ``ranges`` or ``cache`` (see the module docstring)."""

    endpoint: str | None = None
    fetch: str = "ranges"

    def __post_init__(self) -> None:
        if self.fetch not in HUB_FETCH:
            raise ValueError(f"hub fetch must be one of {', '.join(HUB_FETCH)}, not {self.fetch!r}")


class HubFiles:
    """One process's view of Hub files: local paths where the node has them, ranges otherwise.

    Example:
        >>> HubFiles(HubAccess()).local_path("hf://org/name@" + "a" * 40 + "/x.safetensors")  # doctest: +SKIP
    """

    def __init__(self, access: HubAccess) -> None:
        self.access = access
        self._local: dict[str, str | None] = {}

    def local_path(self, loc: str) -> str | None:
        """The node's cached copy of a Hub file (downloaded first when ``fetch="cache"``), or
        ``None`` when its bytes are to be read by range."""
        if loc in self._local:
            return self._local[loc]
        from huggingface_hub import try_to_load_from_cache

        repo, sha, filename = parse_location(loc)
        path = try_to_load_from_cache(repo, filename, revision=sha)
        if not isinstance(path, str) and self.access.fetch == "cache":
            from huggingface_hub import hf_hub_download

            with hub_errors(repo, sha):
                path = hf_hub_download(repo, filename, revision=sha, endpoint=_api(self.access.endpoint).endpoint)
        self._local[loc] = path if isinstance(path, str) else None
        return self._local[loc]

    def read(self, loc: str, start: int, stop: int, what: str) -> memoryview:
        """Bytes ``[start, stop)`` of a Hub file by range; ``what`` names the tensor for errors."""
        data, total = get_range(loc, start, stop, self.access.endpoint)
        if len(data) != stop - start:
            raise InvalidCheckpoint(
                f"{loc}: {what} extends past the end of the file ({total} bytes); the file on the Hub does not "
                "match the header read when the run was planned"
            )
        return data
