"""The store of runs: where actors write unit results and the driver commits runs.

The layout is :mod:`raydiff.store.layout`. A run's life:

1. :meth:`Store.begin_run` writes its plan, its catalog entry and its ``run.parquet``;
2. actors write one file per unit and per spectrum (:meth:`Store.write_unit`,
   :meth:`Store.write_spectrum`), each whole or not at all;
3. :meth:`Store.commit` folds them into ``units.parquet`` and ``spectra.parquet``, writes
   ``tensors.parquet`` and ``commit.parquet``, then the catalog's commit entry — from that
   moment the run is complete, and queries see it whole — and removes the per-unit files.

A driver killed at any point leaves a run that is either complete (with leftover per-unit
files the next submission of it removes) or incomplete and resumable: a query reads a
complete run's folded files only, an incomplete run's per-unit files only, never both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json

from raydiff.errors import StoreError
from raydiff.records import (
    STATUS_OK,
    CommitRecord,
    HashRecord,
    PlanRecord,
    RunRecord,
    SpectrumRecord,
    TensorRecord,
    UnitRecord,
    WatchEventRecord,
    ChainStepRecord,
    from_table,
)
from raydiff.store import layout
from raydiff.store.catalog import Catalog, Snapshot
from raydiff.store.commit import Folding, aggregate, compact, spectrum_keys
from raydiff.store.files import Files
from raydiff.store.log import RecordLog


class Store(Files):
    """A store root and the operations on its runs. Cheap to create; safe to send to Ray actors.

    Example:
        >>> Store("./raydiff-store").catalog().complete  # doctest: +SKIP
        {'3f2a…'}
    """

    # -- the layout ------------------------------------------------------------------------

    def layout_version(self) -> int | None:
        """The layout the store says it has; ``None`` for a store written before layouts were
        recorded (layout 1: no catalog), or for an empty root."""
        if not self.exists(layout.LAYOUT_FILE):
            return None
        try:
            with self.fs.open_input_stream(self.path(layout.LAYOUT_FILE)) as f:
                return int(json.loads(f.read().decode())["layout"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"store {self.display}: {layout.LAYOUT_FILE} is unreadable ({e})") from None

    def check_layout(self) -> None:
        """Raise unless this release can read and write the store.

        Raises:
            StoreError: a store of layout 1 (written by raydiff 0.1 before this release: run
                ``raydiff store upgrade``), or of a layout newer than this release.
        """
        version = self.layout_version()
        if version == layout.LAYOUT:
            return
        if version is None:
            # the first run of a new store writes the layout file before anything under runs/:
            # runs/ seen, the file is read again (another process may have just made the store)
            if self.list_subdirs(layout.RUNS) and self.layout_version() is None:
                raise StoreError(
                    f"store {self.display} was written by an earlier raydiff (layout 1, no catalog); "
                    f"convert it once with `raydiff store upgrade --store {self.display}`"
                )
            return  # empty: the first run writes the layout file
        raise StoreError(f"store {self.display} has layout {version}, newer than this raydiff reads "
                         f"({layout.LAYOUT}); upgrade raydiff")

    def _claim(self) -> None:
        if not self.exists(layout.LAYOUT_FILE):
            self.write_bytes(layout.LAYOUT_FILE, json.dumps({"layout": layout.LAYOUT}).encode())

    # -- the catalog -----------------------------------------------------------------------

    def catalog(self) -> Snapshot:
        """Which runs the store holds and which are complete (a listing and a few small files)."""
        return Catalog(self).read()

    def is_complete(self, run_id: str) -> bool:
        return run_id in self.catalog().complete

    def run_record(self, run_id: str) -> RunRecord | None:
        rel = layout.run_file(run_id)
        if not self.exists(rel):
            return None
        (run,) = from_table(self.read(rel, RunRecord), RunRecord)
        return run

    def commit_record(self, run_id: str) -> CommitRecord | None:
        """A run's commit record, or ``None`` while the run is incomplete."""
        rel = layout.commit_file(run_id)
        if not self.exists(rel):
            return None
        (commit,) = from_table(self.read(rel, CommitRecord), CommitRecord)
        return commit

    # -- a run -----------------------------------------------------------------------------

    def begin_run(self, run: RunRecord, plan: list[PlanRecord]) -> RunRecord:
        """Record a run's start, or return the existing record when the run already exists."""
        self.check_layout()
        existing = self.run_record(run.run_id)
        if existing is not None:
            return existing
        self._claim()
        self.write(layout.plan_file(run.run_id), plan, PlanRecord)
        Catalog(self).add_run(run)  # before run.parquet: a run whose record exists is in the catalog
        self.write(layout.run_file(run.run_id), [run], RunRecord)
        return run

    def check_visible(self, run_id: str, where: str) -> None:
        """Raise unless this process sees the run the driver started (a shared store root).

        Raises:
            StoreError: the store root is a path that only the driver's node has.
        """
        if not self.exists(layout.run_file(run_id)):
            raise StoreError(
                f"store {self.display} is not shared with {where}: the run record the driver wrote is "
                "not visible there. On a multi-node cluster give --store a path every node mounts "
                "(NFS, a shared volume) or an object-store URI such as s3://bucket/prefix"
            )

    def write_unit(self, rec: UnitRecord) -> None:
        self._write_part(rec.run_id, layout.unit_file(rec.run_id, rec.unit_id), rec, UnitRecord)

    def write_spectrum(self, rec: SpectrumRecord) -> None:
        self._write_part(rec.run_id, layout.spectrum_file(rec.run_id, rec.tensor_index, rec.expert), rec,
                         SpectrumRecord)

    def _write_part(self, run_id: str, rel: str, rec: object, kind: type) -> None:
        """Write one unit's or spectrum's file. Another process submitting the same run may
        commit it meanwhile and remove the folder under this write: the run is then complete
        and the part is no longer needed, so the write is dropped (its commit has it)."""
        try:
            self.write(rel, [rec], kind)
        except FileNotFoundError:
            if self.commit_record(run_id) is None:
                raise

    def write_hash(self, rec: HashRecord) -> None:
        self._write_part(rec.run_id, layout.hash_file(rec.run_id, rec.tensor_index), rec, HashRecord)

    def done_hashes(self, run_id: str) -> set[int]:
        """Tensor indexes whose ``--hash`` pair is already written for an incomplete run."""
        names = self.list_dir(layout.hashes_dir(run_id))
        return {int(m.group(1)) for n in names if (m := layout.HASH_FILE.match(n))}

    def done_units(self, run_id: str) -> set[int]:
        """Unit ids already written for an incomplete run."""
        names = self.list_dir(layout.units_dir(run_id))
        return {int(m.group(1)) for n in names if (m := layout.UNIT_FILE.match(n))}

    def done_spectra(self, run_id: str) -> set[tuple[int, int]]:
        """``(tensor index, expert or -1)`` of the spectra already written for an incomplete run."""
        names = self.list_dir(layout.spectra_dir(run_id))
        return {(int(m.group(1)), int(m.group(2)) if m.group(2) else -1)
                for n in names if (m := layout.SPECTRUM_FILE.match(n))}

    def folding(self, run_id: str, plan: list[PlanRecord], done: set[int]) -> Folding:
        """Start folding a run's units into its ``units.parquet`` as they are stored
        (:class:`~raydiff.store.commit.Folding`; ``done``: the units already stored)."""
        return Folding(self, run_id, plan, done)

    def commit(self, run: RunRecord, plan: list[PlanRecord], folding: Folding | None = None) -> CommitRecord:
        """Fold a run's units and spectra into its per-run files, total them per tensor and
        mark the run complete.

        ``plan`` is the run's plan (one :class:`PlanRecord` per tensor); ``folding``, the
        units folded while the run went on, if any. When another process committed the run
        meanwhile, its commit is returned.

        Raises:
            StoreError: a unit or spectrum of the plan is missing (the run stays incomplete).
        """
        d = run.run_id
        unit_ids = [u for p in plan for u in range(p.first_unit, p.first_unit + p.n_units)]
        spectra_of = spectrum_keys(plan)
        done = self.done_units(d)
        missing = [u for u in unit_ids if u not in done]
        if missing:
            if (other := self._committed_elsewhere(d)) is not None:
                return other
            raise StoreError(f"run {d}: {len(missing)} units not written (first: {missing[0]}); "
                             "submit again to resume")
        spec_done = self.done_spectra(d)
        missing_s = [f"{plan[i].tensor}" + (f" (expert {e})" if e >= 0 else "") for i, e in spectra_of
                     if (plan[i].tensor_index, e) not in spec_done]
        if missing_s:
            if (other := self._committed_elsewhere(d)) is not None:
                return other
            raise StoreError(f"run {d}: the spectrum of {missing_s[0]} is not written; submit again to resume")
        hashes = None
        if run.hashed:
            have = self.done_hashes(d)
            missing_h = [p.tensor for p in plan if p.tensor_index not in have and (p.base_dtype or p.tuned_dtype)]
            if missing_h:
                if (other := self._committed_elsewhere(d)) is not None:
                    return other
                raise StoreError(f"run {d}: the SHA-256 of {missing_h[0]} is not written; submit again to resume")
            table = self.read_many([layout.hash_file(d, p.tensor_index) for p in plan if p.tensor_index in have],
                                   HashRecord)
            hashes = {r["tensor_index"]: r for r in (table.to_pylist() if table is not None else [])}
        try:
            units, spectra = compact(self, d, plan, folding)
        except StoreError:
            if (other := self._committed_elsewhere(d)) is not None:  # its cleanup took our inputs
                return other
            raise
        tensors = aggregate(d, plan, units, spectra, len(run.ladder), hashes)
        self.write(layout.tensors_file(d), tensors, TensorRecord)
        ok = [t for t in tensors if t.status == STATUS_OK]
        commit = CommitRecord(
            run_id=d,
            completed_at=dt.datetime.now(dt.timezone.utc),
            numel=sum(t.numel for t in ok),
            changed=sum(t.changed or 0 for t in ok),
            changed_bits=sum(t.changed_bits or 0 for t in ok),
            n_units=len(unit_ids),
            n_spectra=len(spectra_of),
            n_mismatched=len(tensors) - len(ok),
            n_spectra_skipped=sum(1 for r in (spectra.to_pylist() if spectra is not None else []) if r.get("note")),
        )
        self.write(layout.commit_file(d), [commit], CommitRecord)
        self.finish(commit)
        return commit

    def _committed_elsewhere(self, run_id: str) -> CommitRecord | None:
        commit = self.commit_record(run_id)
        if commit is not None:
            self.finish(commit)
        return commit

    def finish(self, commit: CommitRecord) -> None:
        """The last steps of a commit, repeated safely by a later submission of the run: its
        catalog entry (the run is complete from here on), then the per-unit files' removal."""
        if commit.run_id not in self.catalog().complete:
            Catalog(self).add_commit(commit)
        for rel in (layout.units_dir(commit.run_id), layout.spectra_dir(commit.run_id),
                    layout.hashes_dir(commit.run_id)):
            with contextlib.suppress(StoreError):
                self.delete_dir(rel)

    # -- watch events ------------------------------------------------------------------------

    def events(self) -> RecordLog:
        """The log of ``raydiff watch`` events."""
        return RecordLog(self, layout.WATCH_EVENTS, WatchEventRecord, key="event_id", order="recorded_at",
                         fold_at=64, period="month")

    def write_watch_event(self, event: WatchEventRecord) -> None:
        """Record one ``raydiff watch`` event (a file of its own, folded with others later)."""
        log = self.events()
        log.append([event])
        log.fold()

    def watch_events(self) -> list[WatchEventRecord]:
        """Every watch event in the store, oldest first."""
        events = from_table(self.events().read(), WatchEventRecord)
        return sorted(events, key=lambda e: (e.recorded_at, e.event_id))

    # -- chains of checkpoints -----------------------------------------------------------------

    def chains(self) -> RecordLog:
        """The log of chain steps (``raydiff submit … --chain``, watched branches with ``chain``)."""
        return RecordLog(self, layout.CHAINS, ChainStepRecord, key="key", order="recorded_at")

    def record_chain_steps(self, steps: list[ChainStepRecord]) -> None:
        """Record steps of chains (one new file, folded with others later)."""
        if steps:
            log = self.chains()
            log.append(steps)
            log.fold()

    def chain_steps(self, chain: str | None = None) -> list[ChainStepRecord]:
        """The steps of ``chain`` (of every chain with ``None``) by chain and step: per step
        the record written last (a step recorded again with other runs supersedes the earlier)."""
        latest: dict[tuple[str, int], ChainStepRecord] = {}
        for r in sorted(from_table(self.chains().read(), ChainStepRecord), key=lambda r: (r.recorded_at, r.key)):
            if chain is None or r.chain == chain:
                latest[(r.chain, r.step)] = r
        return [latest[k] for k in sorted(latest)]
