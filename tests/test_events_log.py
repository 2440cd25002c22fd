"""The watch events log stays small and loses nothing: appends and folds from two processes
(two watchers on one store) and readers at the same time, on the real filesystem."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from raydiff.records import WatchEventRecord
from raydiff.store import Store
from raydiff.store.log import RecordLog

ROOT = Path(__file__).resolve().parent.parent
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)

#: One watcher: appends N events one by one, folding after each, as ``write_watch_event`` does.
WRITER = """
import datetime as dt, sys, uuid
from raydiff.records import WatchEventRecord
from raydiff.store import Store
from raydiff.store.log import RecordLog

root, who, n, fold_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
log = RecordLog(Store(root), "watch/events", WatchEventRecord, key="event_id", order="recorded_at",
                fold_at=fold_at, period="month")
t0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
for i in range(n):
    log.append([WatchEventRecord(event_id=f"{who}{i:06d}" + uuid.uuid4().hex[:8], tick_id=who, watch="w",
                                 recorded_at=t0 + dt.timedelta(seconds=i), action="analyse", repo="org/x",
                                 refs=None, revision=None, base=None, base_revision=None, run_id=None,
                                 outcome="complete", attempt=1, error=None, retry_at=None, seconds=0.0)])
    log.fold()
"""


def _event(who: str, i: int) -> WatchEventRecord:
    return WatchEventRecord(event_id=f"{who}{i:06d}{uuid.uuid4().hex[:8]}", tick_id=who, watch="w",
                            recorded_at=T0 + dt.timedelta(seconds=i), action="analyse", repo="org/x", refs=None,
                            revision=None, base=None, base_revision=None, run_id=None, outcome="complete",
                            attempt=1, error=None, retry_at=None, seconds=0.0)


def _files(root: Path) -> list[Path]:
    return sorted((root / "watch" / "events").glob("*.parquet"))


def _log(root: Path, fold_at: int) -> RecordLog:
    return RecordLog(Store(str(root)), "watch/events", WatchEventRecord, key="event_id", order="recorded_at",
                     fold_at=fold_at, period="month")


def test_two_watcher_processes_folding_at_once_lose_no_event_and_keep_few_files(tmp_path):
    n, fold_at = 150, 8
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who, str(n), str(fold_at)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    log = _log(tmp_path, fold_at)
    seen, reads, most = 0, 0, 0
    while any(p.poll() is None for p in procs):  # a reader meanwhile: never an error, never fewer events
        now = log.read().num_rows
        assert now >= seen
        seen, reads, most = now, reads + 1, max(most, len(_files(tmp_path)))
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]

    ids = log.read().column("event_id").to_pylist()
    assert len(ids) == len(set(ids)) == 2 * n
    assert {i[:7] for i in ids} == {f"{w}{i:06d}" for w in "ab" for i in range(n)}
    on_disk = [pq.read_table(f).column("event_id").to_pylist() for f in _files(tmp_path)]
    assert set().union(*map(set, on_disk)) == set(ids)  # every event in some file …
    # … and the folder small all along: fewer than fold_at entries per writer and the
    # month's snapshot (two for a moment, when both processes folded at once)
    names = [f.name for f in _files(tmp_path)]
    assert sum(n.startswith("e-") for n in names) < fold_at and sum(n.startswith("s-") for n in names) <= 2
    assert reads > 3 and most <= 2 * fold_at + 2, (reads, most)
    log.fold(force=True)
    assert [f.name[:2] for f in _files(tmp_path)] == ["s-"]
    assert sorted(log.read().column("event_id").to_pylist()) == sorted(ids)


def test_a_fold_rewrites_only_the_periods_with_news(tmp_path):
    """One snapshot per month; a fold leaves a past month's snapshot alone and merges two
    snapshots of one month (what two folds at once leave)."""
    log = _log(tmp_path, fold_at=4)
    files = log.files
    for month, count in (("202501", 3), ("202502", 5)):  # entries written in past months
        for i in range(count):
            files.write(f"watch/events/e-{month}15T120000000000Z-{uuid.uuid4().hex}.parquet", [_event(month, i)],
                        WatchEventRecord)
    assert log.fold()
    names = [f.name for f in _files(tmp_path)]
    assert [n[:10] for n in names] == ["s-20250101", "s-20250201"]
    for i in range(4):  # this month: a fold merges these and leaves the two past snapshots as they are
        log.append([_event("now", i)])
    assert log.fold()
    after = [f.name for f in _files(tmp_path)]
    assert after[:2] == names and len(after) == 3 and after[2].startswith("s-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m"))
    # a second snapshot of January (a concurrent fold's): merged by the next fold, whatever month it is for
    files.write(f"watch/events/s-20250101T000000000000Z-{uuid.uuid4().hex}.parquet", [_event("jan", 9)], WatchEventRecord)
    log.append([_event("now", 9)])
    assert log.fold(force=True)
    final = [f.name for f in _files(tmp_path)]
    assert len(final) == 3 and final[1] == names[1]
    assert log.read().num_rows == 3 + 5 + 4 + 2


def test_write_watch_event_from_two_threads_with_readers_keeps_every_event(tmp_path):
    """The store's own path (fold at 64): every event a reader starts after sees it."""
    store = Store(str(tmp_path))
    n = 100
    written: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(who: str) -> None:
        try:
            for i in range(n):
                e = _event(who, i)
                store.write_watch_event(e)
                with lock:
                    written.append(e.event_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in "ab"]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        with lock:
            before = set(written)
        got = {e.event_id for e in store.watch_events()}
        assert before <= got, len(before - got)
        reads += 1
    for t in threads:
        t.join()
    assert not errors and reads > 1
    events = store.watch_events()
    assert sorted(e.event_id for e in events) == sorted(written) and len(events) == 2 * n
    assert len(_files(tmp_path)) <= 64 + 2  # fewer than 64 entries and the month's snapshot (or two)
