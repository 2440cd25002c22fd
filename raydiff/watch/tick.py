"""``raydiff watch`` ticks: analyse newly published revisions of Hub repos against a base, on a schedule.

A watch list (a TOML file, see :func:`load`) names a base, the tuned repos (or an
``org/name-*`` pattern) and which of their branches and tags to follow. Each :func:`tick`
lists the commits those branches and tags point at, submits the ones that have no complete
run yet, and records every attempt as a :class:`~raydiff.records.WatchEventRecord` in the
store (the ``watch_events`` view).

The watcher keeps no state of its own:

- *already analysed* means a complete run exists with the run id the revision would get
  (:func:`raydiff.run.submit.run_id_for` over the base commit, the tuned commit and the options),
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
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from raydiff.errors import RaydiffError
from raydiff.inputs.checkpoint import revision_fingerprint
from raydiff.inputs.hub import Revision, is_pattern, list_repos, list_revisions, redact
from raydiff.inputs.refs import Identity, identify
from raydiff.records import WatchEventRecord
from raydiff.store import Store
from raydiff.watch.config import Retry, WatchList

RESOLVE_BASE, LIST, ANALYSE = "resolve_base", "list", "analyse"
STARTED, COMPLETE, FAILED, RECOVERED = "started", "complete", "failed", "recovered"


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
    from raydiff.run.submit import run_id_for, submit

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
