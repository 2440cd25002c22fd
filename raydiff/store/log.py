"""An append-only log of records in one store folder, folded into snapshots as it grows.

Each append is a file of its own, ``e-<UTC time>-<id>.parquet``: two writers never touch
one file, so nothing is lost when they run at once. Reading the log reads every file in the
folder and keeps one record per key (a record may be in an entry and in the snapshot that
folded it). Once the folder holds :attr:`RecordLog.fold_at` entries, :meth:`RecordLog.fold`
writes everything it read into one ``s-<time>-<id>.parquet`` and then deletes exactly the
files it read: whatever happens in between, each record is in some file, and a file is
deleted only after a file holding its records exists. Two folds at once only make two
snapshots, which the next read deduplicates and the next fold merges. A reader whose
listing names a file deleted meanwhile lists again.

So a log costs one listing and a bounded number of small files to read, however many
records it holds: the catalog of runs (:mod:`raydiff.store.catalog`) and ``raydiff watch``'s
events are logs.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from raydiff.records import schema
from raydiff.store.files import Files, retry_vanished

_ENTRY = re.compile(r"^e-\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet$")
_SNAPSHOT = re.compile(r"^s-\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet$")


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
    """

    def __init__(self, files: Files, folder: str, kind: type, key: str, order: str, fold_at: int = 16) -> None:
        self.files, self.folder, self.kind, self.key, self.order = files, folder, kind, key, order
        self.fold_at = fold_at

    def append(self, records: Sequence) -> None:
        """Add records (one new file; nothing is read)."""
        if records:
            self.files.write(f"{self.folder}/e-{_stamp()}-{uuid.uuid4().hex}.parquet", list(records), self.kind)

    def names(self) -> list[str]:
        """The log's files: snapshots and entries."""
        return [n for n in self.files.list_dir(self.folder) if _ENTRY.match(n) or _SNAPSHOT.match(n)]

    def read(self) -> pa.Table:
        """Every record, one per key, sorted by key."""
        return retry_vanished(lambda: self._read(self.names())[0])

    def _read(self, names: list[str]) -> tuple[pa.Table, list[str]]:
        table = self.files.read_many([f"{self.folder}/{n}" for n in names], self.kind)
        return _one_per_key(table if table is not None else schema(self.kind).empty_table(), self.key,
                            self.order), names

    def fold(self, force: bool = False) -> bool:
        """Write the log as one snapshot and delete the files it replaces, once it holds
        :attr:`fold_at` entries (or any files, with ``force``). Returns whether it folded."""
        names = self.names()
        entries = sum(1 for n in names if _ENTRY.match(n))
        if entries < (1 if force else self.fold_at) and (not force or len(names) <= 1):
            return False
        table, read = retry_vanished(lambda: self._read(self.names()))
        self.files.write_table(f"{self.folder}/s-{_stamp()}-{uuid.uuid4().hex}.parquet", table)
        for n in read:
            self.files.delete(f"{self.folder}/{n}")
        return True


def _one_per_key(table: pa.Table, key: str, order: str) -> pa.Table:
    if table.num_rows == 0:
        return table
    table = table.sort_by([(key, "ascending"), (order, "ascending")])
    keys = table.column(key).combine_chunks()
    changed = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))  # the first row of each key
    return table.filter(pa.concat_arrays([pa.array([True]), changed]))
