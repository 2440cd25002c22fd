"""Change masks out of the store: one ``bool`` tensor per compared tensor, in a safetensors file.

:func:`export_mask` reads the ``units.parquet`` of the complete runs it is given, tensor by
tensor (a row group each), decodes each unit's stored mask into place and writes the
tensor's ``BOOL`` bytes (one byte per element, as safetensors stores bool) straight after
the header, so memory stays near the largest tensor whatever the checkpoint's size. An
element is set when it is changed — ``|Δ| > atol``, the run's ``changed`` criterion — in at
least ``min_runs`` of the runs. ``safetensors.torch.load_file`` gives masks ready for
``param.grad.mul_(mask)``.

Example:
    >>> export_mask("raydiff-store", ["rl-seed1", "rl-seed2"], "mask.safetensors", min_runs=2)  # doctest: +SKIP
    MaskExport(path='mask.safetensors', tensors=290, numel=..., set=...)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from raydiff.errors import BaseMismatch, InvalidOption, RunNotFound, StoreError
from raydiff.kernel.masks import CODEC_EMPTY
from raydiff.query.overlap import stored_bits
from raydiff.records import STATUS_OK, PlanRecord, RunRecord, from_table
from raydiff.store import Store, layout
from raydiff.store.tensorfiles import TensorFileWriter, TensorSpec, check_file_output

_COLS = ["tensor", "start", "stop", "changed", "mask_codec", "mask"]


@dataclass(frozen=True)
class MaskExport:
    """What :func:`export_mask` wrote: the file, its tensors, their elements, and how many
    elements are set."""

    path: str
    runs: tuple[str, ...]
    min_runs: int
    tensors: int
    numel: int
    set: int


def resolve_runs(store: Store, refs: Sequence[str]) -> list[RunRecord]:
    """The complete runs named by id or by name (a name means its most recently completed run),
    as ``raydiff overlap`` and ``run_ref`` resolve them; a run named twice counts once.

    Raises:
        RunNotFound: a reference names no complete run.
    """
    store.check_layout()
    cat = store.catalog()
    complete = cat.complete
    latest = cat.latest_by_name()
    ids = []
    for ref in refs:
        if ref in complete:
            ids.append(ref)
        elif ref in latest:
            ids.append(latest[ref])
        else:
            raise RunNotFound(f"no complete run has id or name {ref!r}; see `raydiff runs`")
    out = []
    for run_id in dict.fromkeys(ids):
        run = cat.run(run_id)
        if run is None:
            raise StoreError(f"store {store.display}: run {run_id} is complete but has no run record")
        out.append(run)
    return out


def same_base(runs: Sequence[RunRecord]) -> None:
    """Raise unless every run diffs against the same base (same reference, revision and files).

    Raises:
        BaseMismatch: naming two runs and both their bases.
    """
    first = runs[0]
    for r in runs[1:]:
        if (r.base, r.base_revision, r.base_fingerprint) != (first.base, first.base_revision, first.base_fingerprint):
            def show(x: RunRecord) -> str:
                rev = f"@{x.base_revision}" if x.base_revision else ""
                return f"{x.base}{rev} (files {x.base_fingerprint[:12]})"
            raise BaseMismatch(f"runs {first.name} ({first.run_id}) and {r.name} ({r.run_id}) have different bases: "
                               f"{show(first)} and {show(r)}; masks combine only runs over one base")


class _RunMasks:
    """One complete run's stored masks: which row groups of its ``units.parquet`` hold each tensor."""

    def __init__(self, store: Store, run: RunRecord) -> None:
        self.run = run
        self.path = store.path(layout.units_file(run.run_id))
        self.file = pq.ParquetFile(self.path, filesystem=store.fs)
        meta = self.file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        names = self.file.read(columns=["tensor"]).column("tensor").to_pylist()
        self.groups: dict[str, list[int]] = {}
        group_of = np.repeat(np.arange(len(sizes)), sizes)
        for name, g in zip(names, group_of.tolist()):
            gs = self.groups.setdefault(name, [])
            if not gs or gs[-1] != g:
                gs.append(g)
        plan = from_table(store.read(layout.plan_file(run.run_id), PlanRecord), PlanRecord)
        self.shapes = {p.tensor: tuple(p.base_shape or ()) for p in plan if p.status == STATUS_OK}

    def add_into(self, tensor: str, counts: np.ndarray) -> None:
        """Add this run's mask of ``tensor`` (one per element: 0 or 1) into ``counts``."""
        for g in self.groups.get(tensor, []):
            t = self.file.read_row_group(g, columns=_COLS)
            cols = {c: t.column(c) for c in _COLS}
            for i in range(t.num_rows):
                if cols["tensor"][i].as_py() != tensor:
                    continue
                codec = cols["mask_codec"][i].as_py()
                start, stop = cols["start"][i].as_py(), cols["stop"][i].as_py()
                changed = cols["changed"][i].as_py()
                if (codec == CODEC_EMPTY and changed == 0) or stop <= start:
                    continue
                value = cols["mask"][i]
                payload = (value.as_buffer() if value.is_valid else b"") or b""
                bits = stored_bits(codec, payload, changed, self.run.run_id, tensor, start, stop, self.path)
                counts[start:stop] += np.unpackbits(bits, count=stop - start, bitorder="little")


def export_mask(store: Store | str, runs: Sequence[str], out: str, min_runs: int = 1,
                force: bool = False) -> MaskExport:
    """Write the change masks of complete runs over one base as a safetensors file of ``bool`` tensors.

    Every tensor compared in one of the runs (status ``ok``) gets a tensor of its compared
    shape, set where the entry is changed (``|Δ| > atol``, the run's criterion) in at least
    ``min_runs`` runs; a run that did not compare a tensor counts as not changing it. The
    file is streamed tensor by tensor (memory: about the largest tensor) under a temporary
    name and renamed into place once whole.

    Args:
        store: the store (root or :class:`Store`).
        runs: complete runs, by id or name.
        out: the ``.safetensors`` file to write.
        min_runs: K: set where changed in at least K runs, 1 ≤ K ≤ number of runs.
        force: replace ``out`` if it exists.

    Returns:
        What was written.

    Raises:
        RunNotFound: a run is not a complete run of the store.
        BaseMismatch: the runs have different bases.
        InvalidOption: ``min_runs`` out of range; a tensor's compared shape differs between runs.
        OutputExists: ``out`` exists (without ``force``) or is a directory.
    """
    store = store if isinstance(store, Store) else Store(store)
    if not runs:
        raise InvalidOption("runs: give at least one run", option="runs")
    records = resolve_runs(store, runs)
    if not 1 <= min_runs <= len(records):
        raise InvalidOption(f"min_runs must be between 1 and the number of runs ({len(records)}), got {min_runs}",
                            option="min_runs")
    same_base(records)
    check_file_output(out, force, "mask file")
    masks = [_RunMasks(store, r) for r in records]
    shapes: dict[str, tuple[int, ...]] = {}
    for m in masks:
        for name, shape in m.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise InvalidOption(f"tensor {name!r} is compared as {list(shapes[name])} in one run and as "
                                    f"{list(shape)} in run {m.run.name} ({m.run.run_id}); export those runs apart")
    names = sorted(shapes)
    specs = [TensorSpec(n, "BOOL", shapes[n]) for n in names]
    meta = {"format": "pt", "raydiff": json.dumps({
        "runs": [r.run_id for r in records], "names": [r.name for r in records], "min_runs": min_runs,
        "criterion": [f"|delta| > {r.atol:g}" for r in records], "base": records[0].base})}
    count_type = np.uint8 if len(records) < 255 else np.uint16
    total = 0
    with TensorFileWriter(os.fspath(out), specs, meta) as w:
        for spec in specs:
            counts = np.zeros(spec.numel, count_type)
            for m in masks:
                m.add_into(spec.name, counts)
            chosen = counts >= min_runs if len(masks) > 1 or min_runs > 1 else counts.astype(bool, copy=False)
            total += int(np.count_nonzero(chosen))
            w.write(chosen.view(np.uint8))
    return MaskExport(path=os.fspath(out), runs=tuple(r.run_id for r in records), min_runs=min_runs,
                      tensors=len(specs), numel=sum(s.numel for s in specs), set=total)
