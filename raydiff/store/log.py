"""An append-only log of records in one store folder, folded into snapshots as it grows.

Each append is a file of its own, ``e-<UTC time>-<id>.parquet``: two writers never touch
one file, so nothing is lost when they run at once. Reading the log reads every file in the
folder and keeps one record per key (a record may be in an entry and in the snapshot that
folded it). Once the folder holds :attr:`RecordLog.fold_at` entries, :meth:`RecordLog.fold`
writes everything it read into one ``s-<time>-<id>.parquet`` and then deletes exactly the
files it read. Files are never changed once written, so:

- each record is in some file at every moment: a file is deleted only by a fold that read
  it whole and has already written a file holding its records;
- a fold deletes nothing it did not read: an entry appended during the fold stays;
- two folds at once (two watchers) may read the same files: both write a snapshot, both
  delete the files they read (a file already deleted by the other is fine, its records are
  in the other's snapshot). A file one fold listed but another deleted before it could be
  read is left out of the first fold's snapshot — it is in the other's. The two snapshots
  hold some records twice, which every read deduplicates and the next fold merges.

A reader whose listing names a file deleted meanwhile lists again and reads what is new.
That needs a listing to name what the folder held when it was read, a file deleted a moment
later included: local folders are read with ``os.scandir`` for it (pyarrow's listing left
such files out; :meth:`raydiff.store.files.Files._listing`).

With a ``period`` (``"day"`` or ``"month"``) the log keeps one snapshot per period instead
of one in all: an entry belongs to the period it was written in (the time in its name), a
snapshot to the period its name starts with, and a fold merges, period by period, only the
periods that have entries or more than one snapshot (two folds at once, or a fold cut
short). A fold then costs the current period's records, not the whole history, a past
period's snapshot is never rewritten, and two snapshots of one period never outlive the
next fold. The folder holds one file per period plus fewer than ``fold_at`` entries (and,
for a moment, what folds running at once wrote). ``raydiff watch``'s events are kept by
month; the catalog of runs (:mod:`raydiff.store.catalog`) in one snapshot.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from raydiff.errors import StoreError
from raydiff.records import schema
from raydiff.store.files import Files

_ENTRY = re.compile(r"^e-\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet$")
_SNAPSHOT = re.compile(r"^s-\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet$")
#: Listings a read makes before it gives up on a folder that changes under every one.
_READ_ATTEMPTS = 20
#: A period's characters of a file name's time (``YYYYMMDD…``), and their padding to a time.
_PERIODS = {"day": 8, "month": 6}
_PAD = "01T000000000000Z"


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


class RecordLog:
    """The log in ``folder`` of a store, of records of ``kind``, one kept per ``key``.

    Args:
        files: the store's files.
        folder: store-relative folder.
        kind: record class (its schema is the files').
        key: the column that identifies a record (``run_id``, ``event_id``).
        order: among records of one key, the one with the smallest ``order`` is kept.
        fold_at: entries that make :meth:`fold` write a snapshot.
        period: ``"day"`` or ``"month"``: one snapshot per period of writing (``None``: one
            snapshot of everything).
    """

    def __init__(self, files: Files, folder: str, kind: type, key: str, order: str, fold_at: int = 16,
                 period: str | None = None) -> None:
        if period is not None and period not in _PERIODS:
            raise ValueError(f"period must be one of {', '.join(_PERIODS)} or None, got {period!r}")
        self.files, self.folder, self.kind, self.key, self.order = files, folder, kind, key, order
        self.fold_at, self.period = fold_at, period

    def append(self, records: Sequence) -> None:
        """Add records (one new file; nothing is read)."""
        if records:
            self.files.write(f"{self.folder}/e-{_stamp()}-{uuid.uuid4().hex}.parquet", list(records), self.kind)

    def names(self) -> list[str]:
        """The log's files: snapshots and entries."""
        return [n for n in self.files.list_dir(self.folder) if _ENTRY.match(n) or _SNAPSHOT.match(n)]

    def read(self) -> pa.Table:
        """Every record, one per key, sorted by key.

        Raises:
            StoreError: a file is unreadable, or the folder changed under every listing.
        """
        tables: dict[str, pa.Table] = {}
        for attempt in range(_READ_ATTEMPTS):
            # a file listed but deleted before it was read was folded into a newer snapshot:
            # list again and read what is new (files never change, so what was read stands)
            if not self._read_new(self.names(), tables):
                return self._merge(tables.values())
            time.sleep(0.01 * (attempt + 1))
        raise StoreError(f"store {self.files.display}: {self.folder} changed under {_READ_ATTEMPTS} listings "
                         "in a row; try again")

    def fold(self, force: bool = False) -> bool:
        """Merge the log's files into one snapshot (one per period, with ``period``) and
        delete the files it read, once the log holds :attr:`fold_at` entries (or anything to
        merge, with ``force``). Returns whether it folded.

        Safe to run in several processes at once and beside appends (see the module's doc);
        a file that vanishes under it is left to the fold that took it.

        Raises:
            StoreError: a file is unreadable or a snapshot cannot be written.
        """
        names = self.names()
        if sum(1 for n in names if _ENTRY.match(n)) < (1 if force else self.fold_at) and (not force or len(names) <= 1):
            return False
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(self._period_of(n), []).append(n)
        folded = False
        for period, group in sorted(groups.items()):
            if len(group) < 2 and not any(_ENTRY.match(n) for n in group):
                continue  # one snapshot: nothing to merge
            tables: dict[str, pa.Table] = {}
            self._read_new(group, tables)  # what vanished is in another fold's snapshot
            if not tables:
                continue
            stamp = f"{period}{_PAD[len(period) - 6:]}" if period else _stamp()
            self.files.write_table(f"{self.folder}/s-{stamp}-{uuid.uuid4().hex}.parquet", self._merge(tables.values()))
            for n in tables:  # only now: every record read is in the snapshot just written
                self.files.delete(f"{self.folder}/{n}")
            folded = True
        return folded

    # -- helpers ---------------------------------------------------------------------------

    def _read_new(self, names: list[str], tables: dict[str, pa.Table]) -> bool:
        """Read the files of ``names`` not in ``tables`` into it; whether one had vanished."""
        todo = [n for n in names if n not in tables]

        def one(n: str) -> pa.Table | None:
            rel = f"{self.folder}/{n}"
            try:
                return self.files.read(rel, kind=self.kind)
            except StoreError:
                if not self.files.exists(rel):  # deleted by a fold since the listing
                    return None
                raise

        if len(todo) > 1:
            with ThreadPoolExecutor(min(16, len(todo))) as pool:  # object stores: requests in flight at once
                got = list(pool.map(one, todo))
        else:
            got = [one(n) for n in todo]
        vanished = False
        for n, t in zip(todo, got):
            if t is None:
                vanished = True
            else:
                tables[n] = t
        return vanished

    def _merge(self, tables: Iterable[pa.Table]) -> pa.Table:
        tables = list(tables)
        table = pa.concat_tables(tables) if tables else schema(self.kind).empty_table()
        return _one_per_key(table, self.key, self.order)

    def _period_of(self, name: str) -> str:
        """The period a file belongs to: the start of the time in its name (``""``: no periods)."""
        return name[2:2 + _PERIODS[self.period]] if self.period else ""


def _one_per_key(table: pa.Table, key: str, order: str) -> pa.Table:
    if table.num_rows == 0:
        return table
    table = table.sort_by([(key, "ascending"), (order, "ascending")])
    keys = table.column(key).combine_chunks()
    changed = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))  # the first row of each key
    return table.filter(pa.concat_arrays([pa.array([True]), changed]))
