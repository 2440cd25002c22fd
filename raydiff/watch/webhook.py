"""Hugging Face Hub webhooks for ``raydiff watch --webhook``: a tick at once for the repo a
push names, with polling on the schedule still the fallback.

The Hub POSTs a JSON payload to the listener for every event of the repos a webhook follows
(https://huggingface.co/docs/hub/webhooks): ``event.scope`` ``repo.content`` for new commits,
tags and branches, with ``repo.name``, ``repo.type`` and ``updatedRefs`` (``ref``,
``oldSha``, ``newSha``). The listener checks the shared secret the Hub sends as
``X-Webhook-Secret`` (set on the webhook and in ``$RAYDIFF_WEBHOOK_SECRET``), finds the watch
entries of the repo and the watched branches and tags among the updated refs, and hands the
repo to :class:`Triggers`; the watch loop (:func:`~raydiff.watch.tick.run_forever`) runs
the tick. Every answer, and what it starts:

====================================================  ======  ==========================
request                                               status  starts
====================================================  ======  ==========================
``POST /webhook``, a watched branch or tag updated    202     a tick of that repo, or
                                                              nothing when one for it is
                                                              queued, or running for the
                                                              same commits (a burst)
the base repo's branch updated                        202     a tick of every entry
a repo no entry watches                               404     nothing
another event, repo type, or unwatched ref            202     nothing (``ignored``)
no ``X-Webhook-Secret`` / a wrong one                 401/403 nothing
no ``Content-Length`` / over :data:`MAX_BODY` bytes   411/413 nothing
not JSON, or not a webhook payload's shape            400     nothing
another method on ``/webhook``; another path          405/404 nothing
``GET /healthz``                                      200     nothing (for probes)
====================================================  ======  ==========================

Example:
    >>> triggers = Triggers()
    >>> triggers.request("org/tuned", {"a" * 40}), triggers.request("org/tuned", {"a" * 40})
    ('queued', 'duplicate')
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from raydiff.errors import InvalidOption
from raydiff.inputs.hub import is_pattern, is_sha
from raydiff.inputs.refs import parse_hub_id
from raydiff.watch.config import Tuned, WatchList

#: The environment variable holding the shared secret (never a flag: flags show in process lists).
SECRET_ENV = "RAYDIFF_WEBHOOK_SECRET"
#: Where the Hub posts (the webhook's target URL ends with it).
PATH = "/webhook"
HEALTH = "/healthz"
#: Largest body accepted; the Hub's payloads are a few KB.
MAX_BODY = 64 * 1024
#: A rejected body up to this size is read and dropped, so the sender gets the answer
#: rather than a reset connection; a larger one is cut off.
_DRAIN = 1 << 20
#: Asked of :class:`Triggers` for a tick of every entry (the base moved).
EVERY = ""


def watches(entry: Tuned, repo: str) -> bool:
    """Whether a ``[[tuned]]`` entry follows ``repo`` (its id, or a pattern matching it)."""
    return entry.repo == repo or (is_pattern(entry.repo) and fnmatch.fnmatchcase(repo, entry.repo))


class Triggers:
    """Ticks asked for between scheduled ones: one per repo, deduplicated; thread-safe.

    :meth:`request` (from the listener's threads) queues a repo unless a tick of it is
    already queued — that tick has not listed the repo yet, so it will see the new commits —
    or running for the same commits. The watch loop takes one repo at a time
    (:meth:`take`), ticks it and calls :meth:`done`.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._shas: dict[str, set[str]] = {}  # queued repo → the commits asked for
        self._running: tuple[str, frozenset[str]] | None = None

    def request(self, repo: str, shas: Iterable[str] = ()) -> str:
        """Ask for a tick of ``repo`` (:data:`EVERY`: every entry) for the commits ``shas``.

        Returns:
            ``"queued"``, or ``"duplicate"`` when a queued or running tick covers it.
        """
        shas = set(shas)
        with self._cond:
            if repo in self._shas:
                self._shas[repo] |= shas
                return "duplicate"
            if self._running is not None and self._running[0] == repo and shas and shas <= self._running[1]:
                return "duplicate"
            self._queue.append(repo)
            self._shas[repo] = shas
            self._cond.notify_all()
            return "queued"

    def take(self, timeout: float, stop: threading.Event | None = None) -> str | None:
        """The next repo to tick, waiting up to ``timeout`` seconds (``None``: none came, or
        ``stop`` was set). It counts as running until :meth:`done`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return None
                self._cond.wait(min(left, 0.2))  # short waits: a stop is seen within 0.2 s
            repo = self._queue.pop(0)
            self._running = (repo, frozenset(self._shas.pop(repo)))
            return repo

    def done(self, repo: str) -> None:
        """The tick of ``repo`` taken last is over."""
        with self._cond:
            if self._running is not None and self._running[0] == repo:
                self._running = None

    def pending(self) -> list[str]:
        """The repos queued, in order."""
        with self._cond:
            return list(self._queue)


# -- the payload ----------------------------------------------------------------------------


class _Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def route(watch: WatchList, payload: Any) -> tuple[str | None, frozenset[str], str]:
    """What a webhook payload asks of ``watch``.

    Returns:
        ``(repo, commits, why)``: the repo to tick (:data:`EVERY`: every entry; ``None``:
        nothing, the payload is about something not watched), the new commits of the watched
        branches and tags it names, and a one-line account.

    Raises:
        ValueError: not the shape of a Hub webhook payload (the message says what is wrong).
        LookupError: a repo no entry of ``watch`` follows.
    """
    if not isinstance(payload, dict):
        raise ValueError("the payload is not a JSON object")
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(event.get("scope"), str) or not isinstance(event.get("action"), str):
        raise ValueError("event.scope and event.action must be strings")
    if not isinstance(repo, dict) or not isinstance(repo.get("name"), str) or not isinstance(repo.get("type"), str):
        raise ValueError("repo.name and repo.type must be strings")
    refs = payload.get("updatedRefs")
    if refs is not None and (not isinstance(refs, list) or not all(
            isinstance(u, dict) and isinstance(u.get("ref"), str) and isinstance(u.get("newSha"), str | None)
            for u in refs)):
        raise ValueError("updatedRefs must be a list of {ref, newSha} objects")
    name, scope = repo["name"], event["scope"]
    if repo["type"] != "model":
        return None, frozenset(), f"{repo['type']} {name}: not a model repo"
    if scope != "repo.content" and not scope.startswith("repo.content."):
        return None, frozenset(), f"{name}: a {scope} event, not new content"
    updated = [(u["ref"], u["newSha"]) for u in refs or [] if u["newSha"]]  # a deleted ref has newSha null

    base = parse_hub_id(watch.base) if not os.path.exists(watch.base) else None
    if base is not None and base[0] == name:
        branch = base[1] or "main"
        if is_sha(branch):
            return None, frozenset(), f"{name}: the base is pinned to a commit"
        hits = [sha for ref, sha in updated if ref in (f"refs/heads/{branch}", f"refs/tags/{branch}")]
        if refs is not None and not hits:
            return None, frozenset(), f"{name}: the base's {branch} did not move"
        return EVERY, frozenset(hits), f"{name}: the base moved; every entry"

    entries = [t for t in watch.tuned if watches(t, name)]
    if not entries:
        raise LookupError(f"{name} is not watched by {watch.path}")
    hits = [sha for ref, sha in updated if any(_watched(t, ref) for t in entries)]
    if refs is not None and not hits:
        return None, frozenset(), f"{name}: no watched branch or tag moved"
    return name, frozenset(hits), f"{name}: " + (", ".join(sorted(h[:12] for h in hits)) or "updated")


def _watched(entry: Tuned, ref: str) -> bool:
    for prefix, patterns in (("refs/heads/", entry.branches), ("refs/tags/", entry.tags)):
        if ref.startswith(prefix) and any(fnmatch.fnmatchcase(ref[len(prefix):], p) for p in patterns):
            return True
    return False


# -- the listener ---------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"0.0.0.0:8080"``, ``"[::1]:8080"``; port 0: any free one).

    Raises:
        InvalidOption: not of that form (``option`` is ``webhook``).
    """
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidOption(f"webhook must be HOST:PORT, such as 0.0.0.0:8080, got {address!r}", option="webhook")
    return host, int(port)


class Listener:
    """An HTTP server for Hub webhooks, feeding :class:`Triggers`; a thread per request.

    Args:
        watch: the watch list (which repos, branches and tags are watched).
        triggers: where accepted deliveries go.
        address: ``HOST:PORT`` to listen on.
        secret: the shared secret; default ``$RAYDIFF_WEBHOOK_SECRET``.
        on_request: called with the status and a one-line account of every request.

    Raises:
        InvalidOption: no secret, a malformed address, or one that cannot be listened on.

    Example:
        >>> with Listener(watch, triggers, "127.0.0.1:0") as listener:  # doctest: +SKIP
        ...     print(listener.url)
        http://127.0.0.1:41235/webhook
    """

    def __init__(self, watch: WatchList, triggers: Triggers, address: str, secret: str | None = None,
                 on_request: Callable[[int, str], None] | None = None) -> None:
        host, port = parse_address(address)
        secret = secret if secret is not None else os.environ.get(SECRET_ENV, "")
        if not secret:
            raise InvalidOption(f"webhook needs the webhook's shared secret in ${SECRET_ENV} (the Hub sends it as "
                                "X-Webhook-Secret); set it, never on the command line", option="webhook")
        if not secret.isascii():
            raise InvalidOption(f"webhook: ${SECRET_ENV} must be ASCII (the Hub sends only ASCII secrets)",
                                option="webhook")
        handler = type("Handler", (_Handler,), {"watch": watch, "triggers": triggers, "secret": secret.encode(),
                                                "report": staticmethod(on_request or (lambda status, text: None))})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise InvalidOption(f"webhook {address}: cannot listen ({e.strerror or e})", option="webhook") from None
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The URL the Hub should post to (with the address actually bound)."""
        host, port = self.server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}{PATH}"

    def start(self) -> Listener:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="raydiff-webhook", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a slow sender may hold a thread
    watch: WatchList
    triggers: Triggers
    secret: bytes
    report: Callable[[int, str], None]

    def log_message(self, *args: object) -> None:  # the library never prints: `report` says it
        pass

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        if self.path == HEALTH:
            return self._answer(200, "ok", "ok", quiet=True)
        self._handle()

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET  # → 404 or 405

    def _handle(self) -> None:
        try:
            status, kind, text = self._deliver()
        except _Rejected as e:
            self._drain()
            status, kind, text = e.status, "rejected", str(e)
        self._answer(status, kind, text)

    def _deliver(self) -> tuple[int, str, str]:
        if self.path.split("?", 1)[0] != PATH:
            raise _Rejected(404, f"no such path {self.path[:100]!r}; the Hub posts to {PATH}")
        if self.command != "POST":
            raise _Rejected(405, f"{self.command} {PATH}: only POST")
        given = self.headers.get("X-Webhook-Secret")
        if given is None:
            raise _Rejected(401, "no X-Webhook-Secret header")
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self.secret):
            raise _Rejected(403, "wrong X-Webhook-Secret")
        length = self.headers.get("Content-Length")
        if length is None:
            raise _Rejected(411, "no Content-Length")
        if not length.isdigit():
            raise _Rejected(400, "Content-Length is not a number")
        if int(length) > MAX_BODY:
            raise _Rejected(413, f"body of {length} bytes; at most {MAX_BODY}")
        body = self.rfile.read(int(length))
        try:
            payload = json.loads(body)
            repo, shas, why = route(self.watch, payload)
        except (ValueError, UnicodeDecodeError) as e:
            return 400, "rejected", f"not a Hub webhook payload: {e}"
        except LookupError as e:
            return 404, "rejected", str(e)[:200]
        if repo is None:
            return 202, "ignored", why
        return 202, self.triggers.request(repo, shas), why

    def _drain(self) -> None:
        """Read a rejected request's body (up to a bound) so the answer reaches the sender."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= _DRAIN:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _answer(self, status: int, kind: str, text: str, quiet: bool = False) -> None:
        body = json.dumps({"status": kind, "message": text}).encode()
        self.send_response(status)
        if status == 405:
            self.send_header("Allow", "POST")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if not quiet:
            self.report(status, f"{kind}: {text}")
