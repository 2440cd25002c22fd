"""The Parquet store: where actors write unit results and the driver commits runs.

Layout under the root (a local directory or any URI pyarrow's filesystems take, such as
``s3://bucket/prefix``)::

    runs/<run_id>/run.parquet            RunRecord, written when the run starts
    runs/<run_id>/plan.parquet           PlanRecord per tensor name
    runs/<run_id>/units/u00000042.parquet     UnitRecord (stats + compressed mask)
    runs/<run_id>/spectra/s00000007.parquet   SpectrumRecord
    runs/<run_id>/tensors.parquet        TensorRecord per tensor, written at commit
    runs/<run_id>/commit.parquet         CommitRecord, written last
    watch/events/<time>-<id>.parquet     WatchEventRecord, one per `raydiff watch` event

Every file is written whole or not at all: locally to a temporary name then renamed (atomic
on POSIX), on object stores by a single PUT. A run is *complete* exactly when its
``commit.parquet`` exists; until then it is incomplete and a resubmission resumes it,
skipping the units already written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import uuid
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydiff.dtypes import DTYPES
from raydiff.errors import StoreError
from raydiff.records import (
    STATUS_OK,
    CommitRecord,
    PlanRecord,
    RunRecord,
    SpectrumRecord,
    TensorRecord,
    UnitRecord,
    WatchEventRecord,
    from_table,
    to_table,
)

_RUN_ID = re.compile(r"^[0-9a-f]{8,64}$")
_UNIT_FILE = re.compile(r"^u(\d{8,})\.parquet$")
_SPECTRUM_FILE = re.compile(r"^s(\d{8,})\.parquet$")
#: ``watch/events/<UTC time>-<event id>.parquet``: names sort by time.
EVENT_FILE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet$")


def _is_uri(root: str) -> bool:
    return "://" in root


def redact(root: str) -> str:
    """A store root safe to print: credentials in ``scheme://key:secret@…`` are masked.

    Example:
        >>> redact("s3://AKIA:s3cr3t@bucket/prefix?region=eu-west-1")
        's3://***@bucket/prefix?region=eu-west-1'
    """
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1***@", root)


class Store:
    """A store root and the operations on it. Cheap to create; safe to send to Ray actors.

    Example:
        >>> s = Store("./raydiff-store"); [r.name for r, _ in s.runs()]  # doctest: +SKIP
    """

    def __init__(self, root: str) -> None:
        self.root = root if _is_uri(root) else os.path.abspath(root)
        self.display = redact(self.root)  # for messages: never print credentials
        self._fs: pafs.FileSystem | None = None
        self._base = ""

    def __reduce__(self):  # filesystems are not all picklable; rebuild on the other side
        return (Store, (self.root,))

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            try:
                if _is_uri(self.root):
                    self._fs, self._base = pafs.FileSystem.from_uri(self.root)
                else:
                    self._fs, self._base = pafs.LocalFileSystem(), self.root
            except (pa.ArrowException, OSError, ValueError) as e:
                raise StoreError(f"store {self.display}: cannot open ({e})") from None
        return self._fs

    @property
    def is_local(self) -> bool:
        return not _is_uri(self.root)

    # -- paths ------------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        """Filesystem path of a store-relative path."""
        _ = self.fs
        return f"{self._base.rstrip('/')}/{rel}"

    @staticmethod
    def run_dir(run_id: str) -> str:
        if not _RUN_ID.match(run_id):
            raise StoreError(f"{run_id!r} is not a run id (hex digest)")
        return f"runs/{run_id}"

    # -- primitive I/O ------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def write(self, rel: str, records: list, kind: type) -> None:
        """Write records as one Parquet file, atomically (whole file or nothing)."""
        table = to_table(records, kind)
        full = self.path(rel)
        fs = self.fs
        fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{full}.tmp-{uuid.uuid4().hex}"
            try:
                _write_parquet(table, tmp, fs)
                os.replace(tmp, full)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            _write_parquet(table, full, fs)

    def read(self, rel: str, kind: type, columns: list[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"store {self.display}: cannot read {rel} ({e})") from None

    def list_dir(self, rel: str) -> list[str]:
        """Names of the finished files directly in a store directory (temporaries excluded)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))

    def read_many(self, rels: Iterable[str], columns: list[str] | None = None) -> pa.Table | None:
        paths = [self.path(r) for r in rels]
        if not paths:
            return None
        try:
            return pq.ParquetDataset(paths, filesystem=self.fs).read(columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"store {self.display}: cannot read results ({e})") from None

    # -- runs ----------------------------------------------------------------------------------

    def begin_run(self, run: RunRecord, plan: list[PlanRecord]) -> RunRecord:
        """Record a run's start, or return the existing record when the run already exists."""
        d = self.run_dir(run.run_id)
        if self.exists(f"{d}/run.parquet"):
            (existing,) = from_table(self.read(f"{d}/run.parquet", RunRecord), RunRecord)
            return existing
        self.write(f"{d}/plan.parquet", plan, PlanRecord)
        self.write(f"{d}/run.parquet", [run], RunRecord)
        return run

    def check_visible(self, run_id: str, where: str) -> None:
        """Raise unless this process sees the run the driver started (a shared store root).

        Raises:
            StoreError: the store root is a path that only the driver's node has.
        """
        if not self.exists(f"{self.run_dir(run_id)}/run.parquet"):
            raise StoreError(
                f"store {self.display} is not shared with {where}: the run record the driver wrote is "
                "not visible there. On a multi-node cluster give --store a path every node mounts "
                "(NFS, a shared volume) or an object-store URI such as s3://bucket/prefix"
            )

    def is_complete(self, run_id: str) -> bool:
        return self.exists(f"{self.run_dir(run_id)}/commit.parquet")

    def commit_record(self, run_id: str) -> CommitRecord | None:
        """A run's commit record, or ``None`` while the run is incomplete."""
        rel = f"{self.run_dir(run_id)}/commit.parquet"
        if not self.exists(rel):
            return None
        (commit,) = from_table(self.read(rel, CommitRecord), CommitRecord)
        return commit

    def write_unit(self, rec: UnitRecord) -> None:
        self.write(f"{self.run_dir(rec.run_id)}/units/u{rec.unit_id:08d}.parquet", [rec], UnitRecord)

    def write_spectrum(self, rec: SpectrumRecord) -> None:
        self.write(f"{self.run_dir(rec.run_id)}/spectra/s{rec.tensor_index:08d}.parquet", [rec], SpectrumRecord)

    def done_units(self, run_id: str) -> set[int]:
        """Unit ids already written for a run."""
        names = self.list_dir(f"{self.run_dir(run_id)}/units")
        return {int(m.group(1)) for n in names if (m := _UNIT_FILE.match(n))}

    def done_spectra(self, run_id: str) -> set[int]:
        """Tensor indices whose spectrum is already written for a run."""
        names = self.list_dir(f"{self.run_dir(run_id)}/spectra")
        return {int(m.group(1)) for n in names if (m := _SPECTRUM_FILE.match(n))}

    def runs(self) -> list[tuple[RunRecord, CommitRecord | None]]:
        """Every run in the store with its commit record (``None`` while incomplete)."""
        sel = pafs.FileSelector(self.path("runs"), allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.Directory or not _RUN_ID.match(info.base_name):
                continue
            d = f"runs/{info.base_name}"
            if not self.exists(f"{d}/run.parquet"):
                continue
            (run,) = from_table(self.read(f"{d}/run.parquet", RunRecord), RunRecord)
            out.append((run, self.commit_record(info.base_name)))
        return sorted(out, key=lambda rc: rc[0].created_at)

    # -- watch events --------------------------------------------------------------------------

    def write_watch_event(self, event: WatchEventRecord) -> None:
        """Record one ``raydiff watch`` event in a file of its own (never rewritten)."""
        at = event.recorded_at.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        self.write(f"watch/events/{at}-{event.event_id}.parquet", [event], WatchEventRecord)

    def watch_events(self) -> list[WatchEventRecord]:
        """Every watch event in the store, oldest first."""
        names = [n for n in self.list_dir("watch/events") if EVENT_FILE.match(n)]
        table = self.read_many(f"watch/events/{n}" for n in names)
        events = from_table(table, WatchEventRecord) if table is not None else []
        return sorted(events, key=lambda e: (e.recorded_at, e.event_id))

    def commit(self, run: RunRecord, plan: list[PlanRecord],
               written: Mapping[int, UnitRecord] | None = None) -> CommitRecord:
        """Aggregate a run's units and spectra per tensor and mark the run complete.

        ``plan`` is the run's plan (one :class:`PlanRecord` per tensor); ``written`` holds unit
        records (masks left out) that this process saw written, by unit id; only the other
        units' files are read back. Every unit file must exist.

        Raises:
            StoreError: a unit or spectrum of the plan is missing (the run stays incomplete).
        """
        d = self.run_dir(run.run_id)
        unit_ids = [u for p in plan for u in range(p.first_unit, p.first_unit + p.n_units)]
        spectra_of = [p for p in plan if p.has_spectrum]
        done = self.done_units(run.run_id)
        missing = [u for u in unit_ids if u not in done]
        if missing:
            raise StoreError(f"run {run.run_id}: {len(missing)} units not written (first: {missing[0]}); "
                             "submit again to resume")
        spec_done = self.done_spectra(run.run_id)
        missing_s = [p.tensor for p in spectra_of if p.tensor_index not in spec_done]
        if missing_s:
            raise StoreError(f"run {run.run_id}: spectrum of {missing_s[0]!r} not written; submit again to resume")
        unit_cols = [f.name for f in dataclasses.fields(UnitRecord) if f.name != "mask"]
        written = written or {}
        known = [written[u] for u in unit_ids if u in written]
        parts = [to_table(known, UnitRecord).select(unit_cols)] if known else []
        read = self.read_many([f"{d}/units/u{u:08d}.parquet" for u in unit_ids if u not in written], unit_cols)
        parts += [read] if read is not None else []
        units = pa.concat_tables(parts) if parts else None
        spectra = self.read_many([f"{d}/spectra/s{p.tensor_index:08d}.parquet" for p in spectra_of])
        tensors = _aggregate(run.run_id, plan, units, spectra, len(run.ladder))
        self.write(f"{d}/tensors.parquet", tensors, TensorRecord)
        ok = [t for t in tensors if t.status == STATUS_OK]
        commit = CommitRecord(
            run_id=run.run_id,
            completed_at=dt.datetime.now(dt.timezone.utc),
            numel=sum(t.numel for t in ok),
            changed=sum(t.changed or 0 for t in ok),
            changed_bits=sum(t.changed_bits or 0 for t in ok),
            n_units=len(unit_ids),
            n_spectra=len(spectra_of),
            n_mismatched=len(tensors) - len(ok),
            n_spectra_skipped=sum(1 for r in (spectra.to_pylist() if spectra is not None else []) if r.get("note")),
        )
        self.write(f"{d}/commit.parquet", [commit], CommitRecord)
        return commit


_SUMMED = ("changed", "changed_bits", "changed_rel", "nonfinite")
_SUMMED_OPTIONAL = ("changed_subprecision",)  # NULL unless some unit has a value


def _aggregate(run_id: str, plan: list[PlanRecord], units: pa.Table | None,
               spectra: pa.Table | None, steps: int) -> list[TensorRecord]:
    """Per-tensor totals from unit rows (``steps``: the run's ladder length)."""
    by_tensor: dict[int, list[dict]] = {}
    if units is not None:
        for row in units.to_pylist():
            by_tensor.setdefault(row["tensor_index"], []).append(row)
    spec = {row["tensor_index"]: row for row in (spectra.to_pylist() if spectra is not None else [])}
    out = []
    for tp in plan:
        shape = tp.base_shape if tp.base_shape is not None else tp.tuned_shape
        dtype = tp.base_dtype or tp.tuned_dtype
        assert shape is not None and dtype is not None
        rows = cols = None
        if len(shape) >= 2:
            cols = shape[-1]
            rows = tp.numel // cols if cols else 0
        agg: dict[str, object] = {k: None for k in _SUMMED + _SUMMED_OPTIONAL + ("changed_ladder",)}
        stats: dict[str, object] = dict(max_abs_delta=None, mean_abs_delta=None, delta_fro=None,
                                        base_fro=None, rows_touched=None, cols_touched=None)
        if tp.status == STATUS_OK:
            rs = sorted(by_tensor.get(tp.tensor_index, []), key=lambda r: r["unit_id"])
            for k in _SUMMED:
                agg[k] = sum(r[k] for r in rs)
            agg["changed_ladder"] = tuple(int(x) for x in np.sum(
                [r["changed_ladder"] for r in rs] or [(0,) * steps], axis=0, dtype=np.int64))
            for k in _SUMMED_OPTIONAL:
                vals = [r[k] for r in rs if r[k] is not None]
                agg[k] = sum(vals) if vals else None
            if tp.compare_dtype and DTYPES[tp.compare_dtype].is_float:
                stats["max_abs_delta"] = max((r["max_abs_delta"] for r in rs), default=0.0)
                sum_abs = sum(r["sum_abs_delta"] for r in rs)
                stats["mean_abs_delta"] = sum_abs / tp.numel if tp.numel else None
                stats["delta_fro"] = float(np.sqrt(sum(r["sum_sq_delta"] for r in rs)))
                stats["base_fro"] = float(np.sqrt(sum(r["sum_sq_base"] for r in rs)))
            if rows is not None:
                stats["rows_touched"] = sum(r["rows_touched"] for r in rs)
                acc = np.zeros((cols + 7) // 8, np.uint8)
                for r in rs:
                    if r["cols_bitmap"]:
                        acc |= np.frombuffer(r["cols_bitmap"], np.uint8)
                stats["cols_touched"] = int(np.bitwise_count(acc).sum())
        s = spec.get(tp.tensor_index)
        note = tp.note
        if s and s.get("note"):  # recorded, not computed: the rank columns stay NULL
            note = "; ".join(x for x in (note, f"spectrum not computed: {s['note']}") if x)
            s = None
        out.append(TensorRecord(
            run_id=run_id, tensor_index=tp.tensor_index, tensor=tp.tensor, status=tp.status, match=tp.match,
            note=note, dtype=dtype, compare_dtype=tp.compare_dtype, shape=shape, base_shape=tp.base_shape,
            tuned_shape=tp.tuned_shape, numel=tp.numel, **agg, **stats, rows=rows, cols=cols,  # type: ignore[arg-type]
            rank=s["rank"] if s else None, max_rank=s["max_rank"] if s else (min(shape) if len(shape) == 2 else None),
            rank_method=s["method"] if s else None, stable_rank=s["stable_rank"] if s else None,
            effective_rank=s["effective_rank"] if s else None, rank_1e1=s["rank_1e1"] if s else None,
            rank_1e2=s["rank_1e2"] if s else None, rank_1e3=s["rank_1e3"] if s else None,
            top_sv=tuple(s["top_sv"]) if s else None,
        ))
    return out


def _write_parquet(table: pa.Table, path: str, fs: pafs.FileSystem) -> None:
    """zstd for everything but binary columns: the masks in them are compressed already, and
    Parquet's statistics and dictionary of a megabyte-sized value only cost time. A one-row
    file (a unit, a spectrum, a run) is written uncompressed and without dictionaries, which
    cannot shrink one value: 0.7 ms less per unit."""
    plain = [f.name for f in table.schema if not pa.types.is_binary(f.type)]
    if table.num_rows <= 1:
        pq.write_table(table, path, filesystem=fs, compression="none", use_dictionary=False,
                       write_statistics=plain)
        return
    pq.write_table(table, path, filesystem=fs,
                   compression={f.name: "zstd" if f.name in plain else "none" for f in table.schema},
                   use_dictionary=plain, write_statistics=plain)
