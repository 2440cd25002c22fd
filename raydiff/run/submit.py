"""``submit``: resolve references → plan → run the work (Ray actors, or this process's threads) → commit.

The one path data takes.

Example:
    >>> from raydiff.run.submit import submit
    >>> result = submit("base/", "tuned/")  # doctest: +SKIP
    >>> result.run_id, result.commit.changed  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from raydiff.inputs.checkpoint import Checkpoint
from raydiff.run.execute import Done, RunContext
from raydiff.kernel.diff import Criteria
from raydiff.options import SubmitOptions
from raydiff.errors import PlanProblem
from raydiff.plan import Plan, hash_tasks, make_plan, summarize
from raydiff.records import MATCH_EXACT, STATUS_OK
from raydiff.records import CommitRecord, PlanRecord, RunRecord
from raydiff.inputs.refs import Identity, resolve
from raydiff.inputs.remote import HubAccess, is_remote
from raydiff.store import Store

#: Bumped when a change to raydiff changes the results of an identical submission.
RESULTS_VERSION = 1


def raydiff_version() -> str:
    try:
        return version("raydiff")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@dataclass(frozen=True)
class Planned:
    """What the driver tells a progress display once the plan is known."""

    run: RunRecord
    units_total: int
    units_todo: int
    bytes_total: int
    bytes_todo: int
    spectra_total: int
    spectra_todo: int


@dataclass(frozen=True)
class SubmitResult:
    """The outcome of :func:`submit`.

    Attributes:
        run: the run's record (its ``name`` is the one given when it was first submitted).
        commit: the commit record (totals of the complete run).
        resumed: units were already in the store from an earlier, interrupted submission.
        already_complete: the run was complete before this call; nothing was recomputed.
        matching: one line on how tensors were matched and which were not compared.
    """

    run: RunRecord
    commit: CommitRecord
    resumed: bool
    already_complete: bool
    matching: str = ""

    @property
    def run_id(self) -> str:
        return self.run.run_id


class Progress:
    """Progress callbacks of :func:`submit`; the default does nothing (the library never prints)."""

    def planned(self, p: Planned) -> None:
        """The plan is known and the store says what is already done."""

    def advanced(self, done: Done) -> None:
        """One unit or spectrum finished and is in the store."""

    def note(self, message: str) -> None:
        """Something the user should know while the run lasts (diff actors Ray cannot place yet…)."""


def run_id_for(base: Checkpoint | Identity, tuned: Checkpoint | Identity, options: SubmitOptions) -> str:
    """Deterministic id of a (base, tuned, result-changing options) triple.

    Only ``ref``, ``revision`` and ``fingerprint`` of each side count, so an
    :class:`~raydiff.inputs.refs.Identity` (no download) gives the id a submission would get.
    """
    ident = {
        "v": RESULTS_VERSION,
        "base": [base.ref, base.revision, base.fingerprint],
        "tuned": [tuned.ref, tuned.revision, tuned.fingerprint],
        "diff": options.diff.identity(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def default_name(tuned: Checkpoint) -> str:
    """``--name`` default: the last part of the tuned path or repo id (with its revision)."""
    name = os.path.basename(tuned.ref.rstrip("/")) or tuned.ref
    if name.endswith(".safetensors") and os.path.isfile(tuned.ref):
        parent = os.path.basename(os.path.dirname(tuned.ref))
        name = parent or name
    return name


def plan_records(run_id: str, plan: Plan) -> list[PlanRecord]:
    return [
        PlanRecord(
            run_id=run_id, tensor_index=t.index, tensor=t.name, status=t.status, match=t.match, note=t.note,
            base_dtype=t.base.dtype if t.base else None, tuned_dtype=t.tuned.dtype if t.tuned else None,
            compare_dtype=t.compare_dtype, base_shape=t.base.shape if t.base else None,
            tuned_shape=t.tuned.shape if t.tuned else None, numel=t.numel, unit_elems=t.unit_elems,
            row_len=t.row_len, first_unit=t.first_unit, n_units=t.n_units, has_spectrum=t.spectrum, experts=t.experts,
        )
        for t in plan.tensors
    ]


def _check_strict(plan: Plan) -> None:
    odd = [t for t in plan.tensors if t.status != STATUS_OK or t.match != MATCH_EXACT]
    if odd:
        shown = "; ".join(f"{t.name} ({t.status if t.status != STATUS_OK else t.match}: {t.note})" for t in odd[:3])
        more = f"; … {len(odd) - 3} more" if len(odd) > 3 else ""
        raise PlanProblem(f"strict: {len(odd)} tensors are not matched exactly: {shown}{more}. "
                          "Without strict they are analysed with these decisions recorded", option="strict")


def submit(base: str, tuned: str, options: SubmitOptions | None = None,
           progress: Progress | None = None) -> SubmitResult:
    """Diff ``tuned`` against ``base`` (on Ray, or on this process's threads: ``options.cluster.backend``)
    and commit a complete run to the store.

    Resubmitting the same pair with the same result-changing options resumes the same run:
    units already in the store are skipped, and a complete run is returned as it is.

    Args:
        base, tuned: checkpoint references (local path or ``org/name[@revision]``).
        options: store, name, diff and cluster options.
        progress: callbacks for a progress display.

    Returns:
        The committed run.

    Raises:
        RaydiffError: bad references or checkpoints, unusable store, failed actors.
    """
    options = options or SubmitOptions()
    progress = progress or Progress()
    base_ck, tuned_ck = resolve(base), resolve(tuned)
    plan = make_plan(base_ck, tuned_ck, options.diff)
    if options.strict:
        _check_strict(plan)
    run_id = run_id_for(base_ck, tuned_ck, options)
    d = options.diff
    record = RunRecord(
        run_id=run_id, name=options.name or default_name(tuned_ck),
        base=base_ck.ref, base_revision=base_ck.revision, base_fingerprint=base_ck.fingerprint,
        tuned=tuned_ck.ref, tuned_revision=tuned_ck.revision, tuned_fingerprint=tuned_ck.fingerprint,
        created_at=dt.datetime.now(dt.timezone.utc), raydiff_version=raydiff_version(),
        atol=d.atol, rel_eta=d.rel_eta, ladder=d.ladder, rank_mode=d.rank, top_k=d.top_k, sketch_rank=d.sketch_rank,
        subspace_k=d.subspace_k, hashed=d.hash, chunk_elems=d.chunk_elems, n_tensors=len(plan.tensors), n_units=len(plan.units),
        n_spectra=len(plan.spectra), input_bytes=plan.input_bytes,
    )
    store = Store(options.store)
    planned = plan_records(run_id, plan)
    record = store.begin_run(record, planned)
    commit = store.commit_record(run_id)
    if commit is not None:
        store.finish(commit)  # a commit cut short before its catalog entry or its cleanup
        return SubmitResult(record, commit, resumed=False, already_complete=True, matching=summarize(plan))

    done_units = store.done_units(run_id)
    done_spectra = store.done_spectra(run_id)
    hashes = hash_tasks(plan, store.done_hashes(run_id)) if d.hash else []
    in_hashes = {u.unit_id for h in hashes for u in h.units}  # run (again) with their tensor's hash
    units = [u for u in plan.units if u.unit_id not in done_units and u.unit_id not in in_hashes]
    spectra = [s for s in plan.spectra if s.key not in done_spectra]
    progress.planned(Planned(
        run=record, units_total=len(plan.units), units_todo=len(units) + len(in_hashes), bytes_total=plan.input_bytes,
        bytes_todo=sum(u.nbytes for u in units) + sum(u.nbytes for h in hashes for u in h.units), spectra_total=len(plan.spectra), spectra_todo=len(spectra),
    ))
    hub = None
    if any(is_remote(ck.root) for ck in (base_ck, tuned_ck)):
        from raydiff.inputs.hub import _api

        hub = HubAccess(endpoint=_api().endpoint, fetch=options.cluster.hub_fetch)
    ctx = RunContext(run_id=run_id, store_root=store.root, criteria=Criteria(d.atol, d.rel_eta, d.ladder),
                     rank_mode=d.rank, top_k=d.top_k, sketch_rank=d.sketch_rank, hub=hub,
                     subspace_k=d.subspace_k)
    from raydiff.run import local

    # units.parquet is written as the units arrive, so that the commit has little left to do
    folding = store.folding(run_id, planned, done_units) if units or hashes else None

    def advanced(done: Done) -> None:
        if folding is not None and done.kind == "unit":
            folding.unit_done(done.key, done.record)
        progress.advanced(done)

    try:
        if not (units or spectra or hashes):
            pass  # every result is stored: only the commit is left
        elif local.chosen(options.cluster):
            local.run_work(ctx, units, spectra, options.cluster, advanced, progress.note, hashes)
        else:
            from raydiff.run import actors  # Ray is imported only when there is work for it

            actors.run_work(ctx, units, spectra, options.cluster, advanced, progress.note, hashes)
        commit = store.commit(record, planned, folding)
    finally:
        if folding is not None:
            folding.abandon()  # after a failure: the temporary goes (after the commit: nothing to do)
    resumed = bool(done_units or done_spectra)
    return SubmitResult(record, commit, resumed=resumed, already_complete=False, matching=summarize(plan))
