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
import fnmatch
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from raydiff.errors import RaydiffError
from raydiff.inputs.checkpoint import revision_fingerprint
from raydiff.inputs.hub import Revision, is_pattern, list_repos, list_revisions, redact
from raydiff.inputs.refs import Identity, content_ids, identify
from raydiff.records import RunRecord, WatchEventRecord, from_table
from raydiff.store import Store
from raydiff.watch.config import Retry, Tuned, WatchList
from raydiff.watch.webhook import EVERY, Triggers, watches

RESOLVE_BASE, LIST, ANALYSE = "resolve_base", "list", "analyse"
STARTED, COMPLETE, FAILED, RECOVERED, SKIPPED = "started", "complete", "failed", "recovered", "skipped"


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
        up_to_date: revisions found that already have a complete run (or were skipped before:
            their weights are those of one that has).
        waiting: subjects skipped because they are backing off after failures.
        only: the repo a webhook asked this tick for (``None``: every entry of the list).
    """

    tick_id: str
    started_at: dt.datetime
    events: tuple[WatchEventRecord, ...]
    up_to_date: int
    waiting: tuple[Waiting, ...]
    only: str | None = None

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
        self.skipped = {(e.revision, e.run_id) for e in mine if e.action == ANALYSE and e.outcome == SKIPPED}
        self.contents: dict[tuple[str, str], dict[str, str]] = {}  # (repo, sha) → content ids
        self.only: str | None = None
        self.events: list[WatchEventRecord] = []
        self.waiting: list[Waiting] = []
        self.up_to_date = 0

    def record(self, action: str, repo: str, outcome: str, *, seconds: float = 0.0, error: str | None = None,
               revision: Revision | None = None, base: Identity | None = None,
               run_id: str | None = None, reason: str | None = None) -> WatchEventRecord:
        key = _subject(action, repo, run_id)
        at = self.clock()
        attempt = self.backoff.count(key) + 1
        e = WatchEventRecord(
            event_id=uuid.uuid4().hex, tick_id=self.tick_id, watch=self.watch.name, recorded_at=at, action=action,
            repo=repo, refs=revision.names if revision else None, revision=revision.sha if revision else None,
            base=base.ref if base else None, base_revision=base.revision if base else None, run_id=run_id,
            outcome=outcome, attempt=attempt, error=error,
            retry_at=at + self.watch.retry.delay(attempt) if outcome == FAILED else None, seconds=seconds,
            reason=reason,
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
        return TickReport(self.tick_id, self.started_at, tuple(self.events), self.up_to_date, tuple(self.waiting),
                          self.only)


def _message(e: BaseException) -> str:
    """One line, no token: the library's message, or the type and text of an unexpected error."""
    text = str(e) if isinstance(e, RaydiffError) else f"{type(e).__name__}: {e}"
    return redact(" ".join(text.split()))


def tick(watch: WatchList, *, on_event: Callable[[WatchEventRecord], None] | None = None,
         clock: Callable[[], dt.datetime] = _now, only: str | None = None) -> TickReport:
    """Find the watched revisions that have no complete run yet and analyse them, once.

    Failures (the Hub down, a private repo, a revision that is not a valid checkpoint) are
    recorded as events and retried with back-off on later ticks; they never stop the tick.
    A revision whose safetensors files (and index and config) are those of a revision of
    the same branch or tag already analysed against the same base commit, with the same
    options, is not analysed again: a ``skipped`` event names that run.

    Args:
        watch: the watch list.
        on_event: called with each event as soon as it is recorded (for a live log).
        clock: the current time (UTC), for tests.
        only: a repo id: look at that repo alone, for the entries that watch it (a webhook
            named it); ``None``: every entry.

    Returns:
        What the tick did.

    Raises:
        StoreError: the store cannot be read or written (nothing can be recorded).
    """
    t = _Tick(watch, Store(watch.options.store), clock, on_event)
    t.only = only
    if t.backing_off(RESOLVE_BASE, watch.base):
        return t.report()
    base, ok = t.attempt(RESOLVE_BASE, watch.base, lambda: identify(watch.base))
    if not ok:
        return t.report()
    base_ref = f"{base.ref}@{base.revision}" if base.revision else base.ref
    for entry in watch.tuned:
        repos = [entry.repo]
        if only is not None:
            if not watches(entry, only):
                continue
            repos = [only]
        elif is_pattern(entry.repo):
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
                if _analyse(t, base, base_ref, rev) and entry.chain:
                    _follow_chains(t, entry, base, base_ref, rev)
    return t.report()


def _analyse(t: _Tick, base: Identity, base_ref: str, rev: Revision) -> bool:
    """Submit one revision against the base (both pinned to their commits) unless a complete
    run of the pair exists; record the attempt. Returns whether the revision has a complete
    run now (not when it was skipped: its weights are those of another revision)."""
    from raydiff.run.submit import run_id_for, submit

    options = t.watch.options
    tuned = Identity(rev.repo, rev.sha, revision_fingerprint(rev.sha))
    run_id = run_id_for(base, tuned, options)
    if t.store.is_complete(run_id):
        t.up_to_date += 1
        return True
    if _skip(t, base, rev):
        return False
    if t.backing_off(ANALYSE, rev.repo, rev.sha, run_id):
        return False
    name = f"{rev.repo.rsplit('/', 1)[-1]}@{rev.names[0]}"
    t.record(ANALYSE, rev.repo, STARTED, revision=rev, base=base, run_id=run_id)
    t0 = time.monotonic()
    try:
        result = submit(base_ref, rev.ref, dataclasses.replace(options, name=name))
    except Exception as e:  # one failing revision must never stop the watcher
        t.record(ANALYSE, rev.repo, FAILED, seconds=time.monotonic() - t0, error=_message(e), revision=rev,
                 base=base, run_id=run_id)
        return False
    t.record(ANALYSE, rev.repo, COMPLETE, seconds=time.monotonic() - t0, revision=rev, base=base,
             run_id=result.run_id)
    return True


def _follow_chains(t: _Tick, entry: Tuned, base: Identity, base_ref: str, rev: Revision) -> None:
    """Add an analysed revision to the chain of each watched branch pointing at it
    (``<repo>@<branch>``): analysed against the chain's last revision, and against the base,
    at atol 0 (:func:`raydiff.run.chain.extend_chain`). A revision already the chain's last
    adds nothing. The step's run against the previous revision is recorded as an analysis
    (``base``: that revision) when it has to be computed; failures back off as any analysis."""
    from raydiff.run.chain import chain_options, extend_chain
    from raydiff.run.submit import run_id_for

    options = chain_options(t.watch.options)
    tuned = Identity(rev.repo, rev.sha, revision_fingerprint(rev.sha))
    for branch in [n for n in rev.names if any(fnmatch.fnmatchcase(n, p) for p in entry.branches)]:
        chain, steps = _chain_of(t, rev.repo, branch, base)
        last = steps[-1] if steps else None
        if last is not None and (last.tuned, last.tuned_revision) == (rev.repo, rev.sha):
            continue
        prev = base if last is None or not last.tuned_revision else \
            Identity(last.tuned, last.tuned_revision, revision_fingerprint(last.tuned_revision))
        run_id = run_id_for(prev, tuned, options)
        if t.backing_off(ANALYSE, rev.repo, rev.sha, run_id):
            continue
        fresh = not t.store.is_complete(run_id)
        if fresh:
            t.record(ANALYSE, rev.repo, STARTED, revision=rev, base=prev, run_id=run_id)
        t0 = time.monotonic()
        try:
            extend_chain(base_ref, rev.ref, chain, t.watch.options)
        except Exception as e:  # one failing revision must never stop the watcher
            t.record(ANALYSE, rev.repo, FAILED, seconds=time.monotonic() - t0, error=_message(e), revision=rev,
                     base=prev, run_id=run_id)
            continue
        if fresh:
            t.record(ANALYSE, rev.repo, COMPLETE, seconds=time.monotonic() - t0, revision=rev, base=prev,
                     run_id=run_id)


def _chain_of(t: _Tick, repo: str, branch: str, base: Identity) -> tuple[str, list]:
    """The chain a branch's revisions join against ``base``, and its recorded steps:
    ``<repo>@<branch>``, or ``<repo>@<branch>~base-<sha>`` once that chain is over another
    base commit (a chain is over one base)."""
    chain = f"{repo}@{branch}"
    steps = t.store.chain_steps(chain)
    if steps and (steps[0].base, steps[0].base_revision) != (base.ref, base.revision):
        chain = f"{chain}~base-{(base.revision or base.fingerprint)[:12]}"
        steps = t.store.chain_steps(chain)
    return chain, steps


def _skip(t: _Tick, base: Identity, rev: Revision) -> bool:
    """Whether ``rev`` needs no analysis: its files are those of an analysed revision of one
    of its branches or tags (same base commit, same options). A first finding is recorded
    as a ``skipped`` event, later ticks count it up to date. A Hub failure here only means
    the revision is analysed."""
    prev = _stand_in(t, base, rev)
    if prev is None or not prev.tuned_revision:
        return False
    if (rev.sha, prev.run_id) in t.skipped:
        t.up_to_date += 1
        return True
    try:
        mine, theirs = _contents(t, rev.repo, rev.sha), _contents(t, rev.repo, prev.tuned_revision)
    except Exception:  # the analysis will meet (and record) the same problem
        return False
    if not any(p.endswith(".safetensors") for p in mine) or mine != theirs:
        return False
    reason = (f"its safetensors files, index and config are those of {prev.tuned_revision[:12]}, "
              f"analysed in run {prev.name} ({prev.run_id})")
    t.record(ANALYSE, rev.repo, SKIPPED, revision=rev, base=base, run_id=prev.run_id, reason=reason)
    t.skipped.add((rev.sha, prev.run_id))
    return True


def _contents(t: _Tick, repo: str, sha: str) -> dict[str, str]:
    key = (repo, sha)
    if key not in t.contents:
        t.contents[key] = content_ids(repo, sha)
    return t.contents[key]


def _stand_in(t: _Tick, base: Identity, rev: Revision) -> RunRecord | None:
    """The newest complete run of another commit of one of ``rev``'s branches or tags (a run
    named ``<repo name>@<branch or tag>``) with the id ``rev``'s run would have for that
    commit: same base commit, same options."""
    from raydiff.run.submit import run_id_for

    snap = t.store.catalog()
    runs = snap.runs.filter(pc.equal(snap.runs.column("tuned"), rev.repo))
    short = rev.repo.rsplit("/", 1)[-1]
    names, complete = {f"{short}@{n}" for n in rev.names}, snap.complete
    best: RunRecord | None = None
    for r in from_table(runs, RunRecord):
        sha = r.tuned_revision
        if r.run_id not in complete or r.name not in names or not sha or sha == rev.sha:
            continue
        if run_id_for(base, Identity(rev.repo, sha, revision_fingerprint(sha)), t.watch.options) != r.run_id:
            continue
        if best is None or r.created_at > best.created_at:
            best = r
    return best


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
                stop: threading.Event | None = None, clock: Callable[[], dt.datetime] = _now,
                triggers: Triggers | None = None) -> None:
    """Tick now, then whenever the schedule (or a retry) is due, until ``stop`` is set.

    Nothing is kept between ticks but the store, so stopping and starting again (or running
    :func:`tick` from cron instead) neither repeats an analysis nor misses a revision.

    Args:
        watch: the watch list.
        on_event: called with each recorded event.
        on_tick: called after each tick with its report and the time of the next scheduled one.
        on_error: called when a tick after the first fails as a whole (the store cannot be
            written), with the time of the retry; the loop goes on.
        stop: set it (from another thread) to return after the current tick, or at once
            while sleeping.
        clock: as :func:`tick`.
        triggers: ticks asked for between scheduled ones (by
            :class:`~raydiff.watch.webhook.Listener`): each runs at once, for its repo alone,
            in this loop — so no two ticks ever run at the same time.

    Raises:
        StoreError: the first tick cannot read or write the store (a wrong ``store``).
    """
    stop = stop or threading.Event()
    first, due, asked = True, clock(), None
    while not stop.is_set():
        if asked is None and clock() < due:
            asked = _wait(stop, triggers, due, clock)
            continue
        only = None if asked in (None, EVERY) else asked
        try:
            report = tick(watch, on_event=on_event, clock=clock, only=only)
        except RaydiffError as e:
            if first:
                raise
            if only is None:
                due = clock() + watch.retry.first
            if on_error is not None:
                on_error(e, due)
        else:
            now = clock()
            if only is None:
                due = next_tick(watch, report, now)
            elif report.next_retry is not None and report.next_retry < due:
                due = max(report.next_retry, now)
            if on_tick is not None:
                on_tick(report, due)
        finally:
            if asked is not None and triggers is not None:
                triggers.done(asked)
        first, asked = False, None


def _wait(stop: threading.Event, triggers: Triggers | None, due: dt.datetime,
          clock: Callable[[], dt.datetime]) -> str | None:
    """Sleep until ``due`` or a stop; return early with a tick a webhook asked for."""
    seconds = max(0.0, (due - clock()).total_seconds())
    if triggers is None:
        stop.wait(seconds)
        return None
    return triggers.take(seconds, stop)
