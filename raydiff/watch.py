"""``raydiff watch``: analyse newly published revisions of Hub repos against a base, on a schedule.

A watch list (a TOML file, see :func:`load`) names a base, the tuned repos (or an
``org/name-*`` pattern) and which of their branches and tags to follow. Each :func:`tick`
lists the commits those branches and tags point at, submits the ones that have no complete
run yet, and records every attempt as a :class:`~raydiff.records.WatchEventRecord` in the
store (the ``watch_events`` view).

The watcher keeps no state of its own:

- *already analysed* means a complete run exists with the run id the revision would get
  (:func:`raydiff.submit.run_id_for` over the base commit, the tuned commit and the options),
  so a restart, a second watcher or a lost event file never causes a second analysis, and a
  revision published while the watcher was down is found by the next tick;
- *back-off* comes from the events: after ``n`` consecutive failures of the same subject
  (resolving the base, listing a repo, analysing a revision), the next attempt waits until
  ``last failure + min(first · 2**(n-1), max)``. A failing subject never blocks the others.

Example:
    >>> watch = load("watch.toml")  # doctest: +SKIP
    >>> report = tick(watch)  # doctest: +SKIP
    >>> [(e.repo, e.outcome) for e in report.events]  # doctest: +SKIP
    [('org/tuned', 'started'), ('org/tuned', 'complete')]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, before it joined the standard library
    import tomli as tomllib  # type: ignore[no-redef]

from raydiff.inputs.checkpoint import revision_fingerprint
from raydiff.errors import InvalidOption, InvalidWatchList, RaydiffError
from raydiff.inputs.hub import Revision, is_pattern, list_repos, list_revisions, redact
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions, default_store
from raydiff.records import WatchEventRecord
from raydiff.inputs.refs import Identity, identify, parse_hub_id
from raydiff.schedule import Cron, Every, Schedule, parse_duration
from raydiff.store import Store

RESOLVE_BASE, LIST, ANALYSE = "resolve_base", "list", "analyse"
STARTED, COMPLETE, FAILED, RECOVERED = "started", "complete", "failed", "recovered"


@dataclass(frozen=True)
class Tuned:
    """One ``[[tuned]]`` entry: a repo (or an ``org/name`` glob) and the refs to follow.

    Attributes:
        repo: ``org/name``, or a pattern such as ``org/name-*`` (the ``org`` part literal).
        branches: branch names or globs whose head commits are analysed (default ``main``).
        tags: tag names or globs whose commits are analysed (default none).
    """

    repo: str
    branches: tuple[str, ...] = ("main",)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Retry:
    """Back-off after failures: ``min(first · 2**(n-1), max)`` after the n-th in a row."""

    first: dt.timedelta = dt.timedelta(minutes=1)
    max: dt.timedelta = dt.timedelta(hours=1)

    def delay(self, failures: int) -> dt.timedelta:
        if failures <= 0:
            return dt.timedelta(0)
        return min(self.first * 2 ** min(failures - 1, 40), self.max)


@dataclass(frozen=True)
class WatchList:
    """A validated watch list.

    Attributes:
        path: the file it was read from (for messages).
        name: its name in ``watch_events`` (``name`` key, default the file's stem).
        base: the base reference (Hub ``org/name[@revision]`` or local path).
        tuned: the repos to watch.
        schedule: :class:`~raydiff.schedule.Every` or :class:`~raydiff.schedule.Cron`.
        options: the analysis options (store, diff and cluster options of ``submit``).
        retry: back-off after failures.
    """

    path: str
    name: str
    base: str
    tuned: tuple[Tuned, ...]
    schedule: Schedule
    options: SubmitOptions = field(default_factory=SubmitOptions)
    retry: Retry = field(default_factory=Retry)


# -- the watch file -----------------------------------------------------------------------

_TOP_KEYS = ("name", "store", "base", "every", "cron", "options", "retry", "tuned")
_TUNED_KEYS = ("repo", "branches", "tags")
_RETRY_KEYS = ("first", "max")
_DIFF_KEYS = {"atol": float, "rel_eta": float, "rank": str, "top_k": int, "sketch_rank": int,
              "chunk_elems": int, "rename": list}
_CLUSTER_KEYS = {"address": str, "workers": int, "gpus_per_actor": float, "hub_fetch": str}
_OPTION_KEYS = {**_DIFF_KEYS, **_CLUSTER_KEYS, "strict": bool}
_FLAG = re.compile(r"--([a-z][a-z-]*)")


class _Reader:
    """Checks keys and types of the parsed TOML, naming the file and key in every error."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> InvalidWatchList:
        return InvalidWatchList(f"{self.path}: {key}: {problem}" if key else f"{self.path}: {problem}")

    def keys(self, table: dict, allowed: Iterable[str], where: str) -> None:
        allowed = tuple(allowed)
        for k in table:
            if k not in allowed:
                raise self.fail(f"{where}{k}", f"unknown key; expected one of {', '.join(allowed)}")

    def typed(self, value: Any, kind: type, key: str) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {_KIND_NAMES[kind]}, got {value!r}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of non-empty strings, got {value!r}")
        return tuple(value)

    def duration(self, value: Any, key: str) -> dt.timedelta:
        try:
            d = parse_duration(self.typed(value, str, key))
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        if d < dt.timedelta(seconds=1):
            raise self.fail(key, "must be at least 1s")
        return d


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


def load(path: str | os.PathLike[str], store: str | None = None) -> WatchList:
    """Read and validate a watch file.

    Args:
        path: the TOML file.
        store: overrides its ``store`` key (default: the key, else ``$RAYDIFF_STORE`` or
            ``./raydiff-store``).

    Returns:
        The watch list.

    Raises:
        InvalidWatchList: unreadable file, TOML syntax error, unknown key, wrong type or
            value; the message names the file and the key.

    Example (``watch.toml``)::

        base = "org/base@main"
        every = "10m"
        [[tuned]]
        repo = "org/tuned-*"
        tags = ["v*"]
    """
    p = os.fspath(path)
    r = _Reader(p)
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise r.fail("", f"not valid TOML ({e})") from None
    except OSError as e:
        raise r.fail("", f"cannot be read ({e.strerror or e})") from None
    return parse(doc, p, store)


def parse(doc: dict[str, Any], path: str = "watch.toml", store: str | None = None) -> WatchList:
    """Validate a parsed watch file (see :func:`load`)."""
    r = _Reader(path)
    r.keys(doc, _TOP_KEYS, "")
    if "base" not in doc:
        raise r.fail("base", "missing; name the base checkpoint, e.g. base = \"org/base@main\"")
    base = r.typed(doc["base"], str, "base")
    if is_pattern(base) or not (parse_hub_id(base) or os.path.exists(base)):
        raise r.fail("base", f"{base!r} is neither an existing path nor a Hub id org/name[@revision]")
    name = r.typed(doc.get("name", Path(path).stem), str, "name") or Path(path).stem

    if ("every" in doc) == ("cron" in doc):
        raise r.fail("every", "give exactly one of every = \"10m\" or cron = \"*/15 * * * *\"")
    if "every" in doc:
        schedule: Schedule = Every(r.duration(doc["every"], "every"))
    else:
        try:
            schedule = Cron.parse(r.typed(doc["cron"], str, "cron"))
        except ValueError as e:
            raise r.fail("cron", str(e)) from None

    tuned_doc = doc.get("tuned")
    if not isinstance(tuned_doc, list) or not tuned_doc or not all(isinstance(t, dict) for t in tuned_doc):
        raise r.fail("tuned", "missing or not a list of [[tuned]] tables; add at least one with repo = \"org/name\"")
    tuned = tuple(_tuned(r, t, f"tuned[{i}]") for i, t in enumerate(tuned_doc))

    retry_doc = r.typed(doc.get("retry", {}), dict, "retry")
    r.keys(retry_doc, _RETRY_KEYS, "retry.")
    retry = Retry(**{k: r.duration(v, f"retry.{k}") for k, v in retry_doc.items()})
    if retry.first > retry.max:
        raise r.fail("retry.first", f"is longer than retry.max ({retry.max})")

    opts = r.typed(doc.get("options", {}), dict, "options")
    r.keys(opts, _OPTION_KEYS, "options.")
    values = {k: r.typed(v, _OPTION_KEYS[k], f"options.{k}") for k, v in opts.items()}
    rules = []
    for rule in values.pop("rename", []):
        old, sep, new = rule.partition("=") if isinstance(rule, str) else ("", "", "")
        if not sep or not old:
            raise r.fail("options.rename", f"rules are \"OLD=NEW\" with a non-empty OLD prefix, got {rule!r}")
        rules.append((old, new))
    try:
        options = SubmitOptions(
            store=store or r.typed(doc.get("store", default_store()), str, "store"),
            strict=values.pop("strict", False),
            diff=DiffOptions(rename=tuple(rules), **{k: v for k, v in values.items() if k in _DIFF_KEYS}),
            cluster=ClusterOptions(**{k: v for k, v in values.items() if k in _CLUSTER_KEYS}),
        )
    except InvalidOption as e:
        # the message names the flag (`--top-k`); the file's key is `top_k`
        raise r.fail("options", _FLAG.sub(lambda m: m[1].replace("-", "_"), str(e))) from None
    return WatchList(path=path, name=name, base=base, tuned=tuned, schedule=schedule, options=options, retry=retry)


def _tuned(r: _Reader, t: dict, where: str) -> Tuned:
    r.keys(t, _TUNED_KEYS, f"{where}.")
    if "repo" not in t:
        raise r.fail(f"{where}.repo", "missing; give the repo id org/name or a pattern org/name-*")
    repo = r.typed(t["repo"], str, f"{where}.repo")
    org, slash, rest = repo.partition("/")
    if not slash or not rest or "@" in repo or is_pattern(org) or (not is_pattern(repo) and parse_hub_id(repo) is None):
        raise r.fail(f"{where}.repo", f"{repo!r} is not a Hub repo id org/name or a pattern org/name-* "
                     "(the org part is literal; branches and tags go in `branches` and `tags`)")
    branches = r.strings(t.get("branches", ["main"]), f"{where}.branches")
    tags = r.strings(t.get("tags", []), f"{where}.tags")
    if not branches and not tags:
        raise r.fail(where, "follows no branch and no tag; set branches = [\"main\"] or tags = [\"v*\"]")
    return Tuned(repo, branches, tags)


# -- one tick ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """A subject skipped this tick because its back-off has not elapsed."""

    action: str
    repo: str
    revision: str | None
    failures: int
    retry_at: dt.datetime


@dataclass(frozen=True)
class TickReport:
    """What one :func:`tick` did.

    Attributes:
        tick_id: id shared by the tick's events.
        started_at: when the tick began (UTC).
        events: the events it recorded, in order.
        up_to_date: revisions found that already have a complete run.
        waiting: subjects skipped because they are backing off after failures.
    """

    tick_id: str
    started_at: dt.datetime
    events: tuple[WatchEventRecord, ...]
    up_to_date: int
    waiting: tuple[Waiting, ...]

    @property
    def next_retry(self) -> dt.datetime | None:
        """The earliest moment a failed or waiting subject may be tried again."""
        times = [w.retry_at for w in self.waiting] + [e.retry_at for e in self.events if e.retry_at]
        return min(times, default=None)

    def count(self, outcome: str) -> int:
        return sum(e.outcome == outcome for e in self.events)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _subject(action: str, repo: str, run_id: str | None) -> tuple[str, str]:
    return (action, run_id or "") if action == ANALYSE else (action, repo)


class _Backoff:
    """Consecutive failures per subject, from the watch list's past events."""

    def __init__(self, events: Iterable[WatchEventRecord], retry: Retry) -> None:
        self.retry = retry
        self.failures: dict[tuple[str, str], tuple[int, dt.datetime]] = {}
        for e in events:
            self.note(e)

    def note(self, e: WatchEventRecord) -> None:
        key = _subject(e.action, e.repo, e.run_id)
        if e.outcome == FAILED:
            n, _ = self.failures.get(key, (0, e.recorded_at))
            self.failures[key] = (n + 1, e.recorded_at)
        elif e.outcome in (COMPLETE, RECOVERED):
            self.failures.pop(key, None)

    def count(self, key: tuple[str, str]) -> int:
        return self.failures.get(key, (0, None))[0]

    def due(self, key: tuple[str, str]) -> dt.datetime | None:
        """When the subject may be tried again (``None``: it is not failing)."""
        n, last = self.failures.get(key, (0, None))
        return last + self.retry.delay(n) if n else None


class _Tick:
    def __init__(self, watch: WatchList, store: Store, clock: Callable[[], dt.datetime],
                 on_event: Callable[[WatchEventRecord], None] | None) -> None:
        self.watch, self.store, self.clock, self.on_event = watch, store, clock, on_event
        self.tick_id = uuid.uuid4().hex
        self.started_at = clock()
        mine = [e for e in store.watch_events() if e.watch == watch.name]
        self.backoff = _Backoff(mine, watch.retry)
        self.events: list[WatchEventRecord] = []
        self.waiting: list[Waiting] = []
        self.up_to_date = 0

    def record(self, action: str, repo: str, outcome: str, *, seconds: float = 0.0, error: str | None = None,
               revision: Revision | None = None, base: Identity | None = None,
               run_id: str | None = None) -> WatchEventRecord:
        key = _subject(action, repo, run_id)
        at = self.clock()
        attempt = self.backoff.count(key) + 1
        e = WatchEventRecord(
            event_id=uuid.uuid4().hex, tick_id=self.tick_id, watch=self.watch.name, recorded_at=at, action=action,
            repo=repo, refs=revision.names if revision else None, revision=revision.sha if revision else None,
            base=base.ref if base else None, base_revision=base.revision if base else None, run_id=run_id,
            outcome=outcome, attempt=attempt, error=error,
            retry_at=at + self.watch.retry.delay(attempt) if outcome == FAILED else None, seconds=seconds,
        )
        self.store.write_watch_event(e)
        self.backoff.note(e)
        self.events.append(e)
        if self.on_event is not None:
            self.on_event(e)
        return e

    def backing_off(self, action: str, repo: str, revision: str | None = None, run_id: str | None = None) -> bool:
        key = _subject(action, repo, run_id)
        due = self.backoff.due(key)
        if due is not None and self.clock() < due:
            self.waiting.append(Waiting(action, repo, revision, self.backoff.count(key), due))
            return True
        return False

    def attempt(self, action: str, repo: str, fn: Callable[[], Any]) -> tuple[Any, bool]:
        """Run one listing step; a failure is recorded, a first success after failures too."""
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # one failing subject must never stop the watcher
            self.record(action, repo, FAILED, seconds=time.monotonic() - t0, error=_message(e))
            return None, False
        if self.backoff.count(_subject(action, repo, None)):
            self.record(action, repo, RECOVERED, seconds=time.monotonic() - t0)
        return value, True

    def report(self) -> TickReport:
        return TickReport(self.tick_id, self.started_at, tuple(self.events), self.up_to_date, tuple(self.waiting))


def _message(e: BaseException) -> str:
    """One line, no token: the library's message, or the type and text of an unexpected error."""
    text = str(e) if isinstance(e, RaydiffError) else f"{type(e).__name__}: {e}"
    return redact(" ".join(text.split()))


def tick(watch: WatchList, *, on_event: Callable[[WatchEventRecord], None] | None = None,
         clock: Callable[[], dt.datetime] = _now) -> TickReport:
    """Find the watched revisions that have no complete run yet and analyse them, once.

    Failures (the Hub down, a private repo, a revision that is not a valid checkpoint) are
    recorded as events and retried with back-off on later ticks; they never stop the tick.

    Args:
        watch: the watch list.
        on_event: called with each event as soon as it is recorded (for a live log).
        clock: the current time (UTC), for tests.

    Returns:
        What the tick did.

    Raises:
        StoreError: the store cannot be read or written (nothing can be recorded).
    """
    t = _Tick(watch, Store(watch.options.store), clock, on_event)
    if t.backing_off(RESOLVE_BASE, watch.base):
        return t.report()
    base, ok = t.attempt(RESOLVE_BASE, watch.base, lambda: identify(watch.base))
    if not ok:
        return t.report()
    base_ref = f"{base.ref}@{base.revision}" if base.revision else base.ref
    for entry in watch.tuned:
        repos = [entry.repo]
        if is_pattern(entry.repo):
            if t.backing_off(LIST, entry.repo):
                continue
            repos, ok = t.attempt(LIST, entry.repo, lambda: list_repos(entry.repo))
            if not ok:
                continue
        for repo in repos:
            if t.backing_off(LIST, repo):
                continue
            revisions, ok = t.attempt(LIST, repo, lambda: list_revisions(repo, entry.branches, entry.tags))
            if not ok:
                continue
            for rev in revisions:
                _analyse(t, base, base_ref, rev)
    return t.report()


def _analyse(t: _Tick, base: Identity, base_ref: str, rev: Revision) -> None:
    """Submit one revision against the base (both pinned to their commits) unless a complete
    run of the pair exists; record the attempt."""
    from raydiff.submit import run_id_for, submit

    options = t.watch.options
    tuned = Identity(rev.repo, rev.sha, revision_fingerprint(rev.sha))
    run_id = run_id_for(base, tuned, options)
    if t.store.is_complete(run_id):
        t.up_to_date += 1
        return
    if t.backing_off(ANALYSE, rev.repo, rev.sha, run_id):
        return
    name = f"{rev.repo.rsplit('/', 1)[-1]}@{rev.names[0]}"
    t.record(ANALYSE, rev.repo, STARTED, revision=rev, base=base, run_id=run_id)
    t0 = time.monotonic()
    try:
        result = submit(base_ref, rev.ref, dataclasses.replace(options, name=name))
    except Exception as e:  # one failing revision must never stop the watcher
        t.record(ANALYSE, rev.repo, FAILED, seconds=time.monotonic() - t0, error=_message(e), revision=rev,
                 base=base, run_id=run_id)
        return
    t.record(ANALYSE, rev.repo, COMPLETE, seconds=time.monotonic() - t0, revision=rev, base=base,
             run_id=result.run_id)


# -- the long-running form ------------------------------------------------------------------


def next_tick(watch: WatchList, report: TickReport, now: dt.datetime) -> dt.datetime:
    """When the tick after ``report`` is due: the schedule's next time, or an earlier retry."""
    due = watch.schedule.next_after(report.started_at)
    if due is None:  # a cron expression that stops matching (validated at load, so never)
        due = now + dt.timedelta(days=1)
    retry = report.next_retry
    if retry is not None and retry < due:
        due = retry
    return max(due, now)


def run_forever(watch: WatchList, *, on_event: Callable[[WatchEventRecord], None] | None = None,
                on_tick: Callable[[TickReport, dt.datetime], None] | None = None,
                on_error: Callable[[RaydiffError, dt.datetime], None] | None = None,
                stop: threading.Event | None = None, clock: Callable[[], dt.datetime] = _now) -> None:
    """Tick now, then whenever the schedule (or a retry) is due, until ``stop`` is set.

    Nothing is kept between ticks but the store, so stopping and starting again (or running
    :func:`tick` from cron instead) neither repeats an analysis nor misses a revision.

    Args:
        watch: the watch list.
        on_event: called with each recorded event.
        on_tick: called after each tick with its report and the time of the next one.
        on_error: called when a tick after the first fails as a whole (the store cannot be
            written), with the time of the retry; the loop goes on.
        stop: set it (from another thread) to return after the current tick, or at once
            while sleeping.
        clock: as :func:`tick`.

    Raises:
        StoreError: the first tick cannot read or write the store (a wrong ``store``).
    """
    stop = stop or threading.Event()
    first = True
    while not stop.is_set():
        try:
            report = tick(watch, on_event=on_event, clock=clock)
        except RaydiffError as e:
            if first:
                raise
            due = clock() + watch.retry.first
            if on_error is not None:
                on_error(e, due)
        else:
            due = next_tick(watch, report, clock())
            if on_tick is not None:
                on_tick(report, due)
        first = False
        stop.wait(max(0.0, (due - clock()).total_seconds()))
