"""Stores of an earlier layout converted in place (``raydiff store upgrade``).

Layout 1 (raydiff 0.1 before the catalog) kept every run as per-unit files with the ladder
as five columns, and ``watch/events`` as one file per event. Converting it:

1. each run, complete or not, gets its catalog entry; a complete run's unit and spectrum
   files are folded into ``units.parquet`` / ``spectra.parquet`` (the ladder becoming one
   list on the way), its ``tensors.parquet`` rewritten in the current schema, then its
   commit entered in the catalog and its per-unit files removed; an incomplete run's unit
   files are rewritten in the current schema, so a submission resumes it;
2. the watch events are folded into one snapshot of the events log;
3. last, ``raydiff-store.json`` says layout 2.

Every step can be repeated: an upgrade cut short is finished by running it again, and until
the layout file is written no release reads the store half-converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from raydiff.errors import StoreError
from raydiff.records import CommitRecord, PlanRecord, RunRecord, TensorRecord, UnitRecord, WatchEventRecord, from_table
from raydiff.store import layout
from raydiff.store.catalog import Catalog
from raydiff.store.commit import compact
from raydiff.store.store import Store

_V1_EVENT = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet$")


@dataclass(frozen=True)
class Upgraded:
    """What :func:`upgrade` did: runs converted (complete, incomplete), events folded, and
    whether the store was already of the current layout."""

    complete: int
    incomplete: int
    events: int
    already: bool


def upgrade(store: Store | str, note: Callable[[str], None] | None = None) -> Upgraded:
    """Convert a store of layout 1 to the current layout, in place.

    Args:
        store: the store (root or :class:`Store`).
        note: hears one line per run converted.

    Raises:
        StoreError: the store is of a layout newer than this release, or a file is unreadable.
    """
    store = Store(store) if isinstance(store, str) else store
    note = note or (lambda _m: None)
    version = store.layout_version()
    if version == layout.LAYOUT:
        return Upgraded(0, 0, 0, True)
    if version is not None:
        raise StoreError(f"store {store.display} has layout {version}, newer than this raydiff reads")
    catalog = Catalog(store)
    entered = set(catalog.runs.read().column("run_id").to_pylist())  # by an upgrade cut short
    complete = incomplete = 0
    for run_id in store.list_subdirs(layout.RUNS):
        if not layout.RUN_ID.match(run_id) or not store.exists(layout.run_file(run_id)):
            continue
        (run,) = from_table(store.read(layout.run_file(run_id), RunRecord), RunRecord)
        store.write(layout.run_file(run_id), [run], RunRecord)  # the run's ladder, recorded
        if run_id not in entered:
            catalog.runs.append([run])
        commit = store.commit_record(run_id)
        if commit is None:
            for name in store.list_dir(layout.units_dir(run_id)):  # resumable in the current schema
                rel = f"{layout.units_dir(run_id)}/{name}"
                store.write(rel, from_table(store.read(rel, UnitRecord), UnitRecord), UnitRecord)
            incomplete += 1
            note(f"run {run_id} ({run.name}): incomplete, entered in the catalog; submit it again to resume")
            continue
        plan = from_table(store.read(layout.plan_file(run_id), PlanRecord), PlanRecord)
        if store.list_dir(layout.units_dir(run_id)) or not store.exists(layout.units_file(run_id)):
            compact(store, run_id, plan)
        tensors = from_table(store.read(layout.tensors_file(run_id), TensorRecord), TensorRecord)
        store.write(layout.tensors_file(run_id), tensors, TensorRecord)
        store.write(layout.commit_file(run_id), [commit], CommitRecord)
        store.finish(commit)  # the catalog's commit entry, then the per-unit files' removal
        complete += 1
        note(f"run {run_id} ({run.name}): complete, folded into units.parquet and entered in the catalog")
    catalog.runs.fold(force=True)
    catalog.commits.fold(force=True)
    events = _events(store)
    store.write_bytes(layout.LAYOUT_FILE, f'{{"layout": {layout.LAYOUT}}}'.encode())
    return Upgraded(complete, incomplete, events, False)


def _events(store: Store) -> int:
    """Layout 1's one file per watch event, folded into the events log."""
    names = [n for n in store.list_dir(layout.WATCH_EVENTS) if _V1_EVENT.match(n)]
    if not names:
        return 0
    table = store.read_many([f"{layout.WATCH_EVENTS}/{n}" for n in names], WatchEventRecord)
    assert table is not None
    log = store.events()
    log.append(from_table(table, WatchEventRecord))
    for n in names:
        store.delete(f"{layout.WATCH_EVENTS}/{n}")
    log.fold(force=True)
    return table.num_rows
