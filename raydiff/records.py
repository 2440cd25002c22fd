"""The records raydiff stores, one frozen dataclass per Parquet file kind.

The Parquet schema of each kind is derived from its dataclass (:func:`schema`), and every
field's ``doc`` is carried into the Parquet field metadata, so the files describe
themselves. Layout of a store (``<root>/runs/<run_id>/``):

- ``run.parquet`` (:class:`RunRecord`) — written when the run starts;
- ``plan.parquet`` (:class:`PlanRecord`) — one row per tensor name of either side;
- ``units/u<unit_id>.parquet`` (:class:`UnitRecord`) — written by the actor that diffed it;
- ``spectra/s<tensor_index>.parquet`` (:class:`SpectrumRecord`) — rank of one matrix;
- ``tensors.parquet`` (:class:`TensorRecord`) — per-tensor totals, written at commit;
- ``commit.parquet`` (:class:`CommitRecord`) — written last: its presence means *complete*.

``raydiff watch`` adds ``<root>/watch/events/<time>-<event_id>.parquet``
(:class:`WatchEventRecord`), one file per event; chains of checkpoints add
``<root>/chains/<entry>.parquet`` (:class:`ChainStepRecord`), one record per step.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


#: Tensor statuses, as stored in the ``status`` column of the ``tensors`` view.
STATUS_OK = "ok"
STATUS_ONLY_BASE = "only_in_base"
STATUS_ONLY_TUNED = "only_in_tuned"
STATUS_SHAPE = "shape_mismatch"
STATUS_DTYPE = "dtype_mismatch"
STATUS_ROWS_BASE = "rows_only_in_base"
STATUS_ROWS_TUNED = "rows_only_in_tuned"
STATUS_FUSED = "fused"  # a fused projection compared part by part with the other side's split ones
STATUS_BLOCK_SCALE = "block_scale"  # the block scales of an FP8 weight, compared as part of it

#: How a compared pair was matched, as stored in the ``match`` column; several join with ``+``.
MATCH_EXACT = "exact"  # same name, shape and dtype
MATCH_WIDENED = "dtype_widened"  # dtypes differ; compared in the wider one
MATCH_RENAMED = "renamed"  # paired after --rename rules changed a name
MATCH_TIED_BASE = "tied_in_base"  # base has no lm_head; its tied embedding stands in
MATCH_TIED_TUNED = "tied_in_tuned"
MATCH_RESIZED = "resized_rows"  # first dimension differs; common rows compared
MATCH_FP8_BLOCKS = "fp8_block_scaled"  # FP8 codes × block scales, compared dequantized
MATCH_FUSED_SLICE = "fused_slice"  # rows of the other side's fused projection
MATCH_NONE = "none"  # not compared


def _c(doc: str) -> Any:
    return field(metadata={"doc": doc})


@dataclass(frozen=True)
class RunRecord:
    run_id: str = _c("Run id: digest of base, tuned and the options that change results")
    name: str = _c("Human name of the run (`--name`, default: the tuned reference's last part)")
    base: str = _c("Base reference as resolved: absolute local path or Hub repo id")
    base_revision: str | None = _c("Hub commit sha of the base (NULL for local paths)")
    base_fingerprint: str = _c("Digest of the base files' names, sizes and mtimes (or sha)")
    tuned: str = _c("Tuned reference as resolved: absolute local path or Hub repo id")
    tuned_revision: str | None = _c("Hub commit sha of the tuned checkpoint (NULL for local paths)")
    tuned_fingerprint: str = _c("Digest of the tuned files' names, sizes and mtimes (or sha)")
    created_at: dt.datetime = _c("When the run was first submitted (UTC)")
    raydiff_version: str = _c("raydiff version that planned the run")
    atol: float = _c("Absolute tolerance of the run's `changed` criterion")
    rel_eta: float = _c("η of the relative criterion `changed_rel`")
    ladder: tuple[float, ...] = _c("Absolute tolerances counted besides atol (the views' changed_1e8 … columns)")
    rank_mode: str = _c("Rank mode: exact, sketch or off")
    top_k: int = _c("Leading singular values stored per matrix")
    sketch_rank: int = _c("Sketch size for rank_mode = sketch")
    subspace_k: int | None = _c("k of the subspace metrics (principal angles, top-k spectral shift); 0: off; "
                                "NULL for runs of releases before them")
    hashed: bool | None = _c("Whether `--hash` recorded each tensor's SHA-256 on both sides (NULL: before the option)")
    chunk_elems: int = _c("Target elements per work unit (masks line up only for equal values)")
    n_tensors: int = _c("Tensor names in the plan (union of both sides)")
    n_units: int = _c("Element work units in the plan")
    n_spectra: int = _c("Matrices whose spectrum is computed")
    input_bytes: int = _c("Bytes of both sides read by the element units")


@dataclass(frozen=True)
class PlanRecord:
    run_id: str = _c("Run id")
    tensor_index: int = _c("Position of the tensor in the plan (names sorted)")
    tensor: str = _c("Tensor name")
    status: str = _c("ok, only_in_base, only_in_tuned, shape_mismatch, dtype_mismatch, rows_only_in_base, rows_only_in_tuned, fused or block_scale")
    match: str = _c("How the pair was matched: exact, renamed, tied_in_base/tuned, resized_rows, dtype_widened, fp8_block_scaled, fused_slice (joined by +), or none")
    note: str = _c("Detail of the status and match (empty when nothing to say)")
    base_dtype: str | None = _c("Stored dtype in base")
    tuned_dtype: str | None = _c("Stored dtype in tuned")
    compare_dtype: str | None = _c("Dtype the comparison is done in")
    base_shape: tuple[int, ...] | None = _c("Shape in base")
    tuned_shape: tuple[int, ...] | None = _c("Shape in tuned")
    numel: int = _c("Elements (of base if present, else of tuned)")
    unit_elems: int = _c("Elements per work unit of this tensor")
    row_len: int = _c("Row length (last dim) for tensors with ≥ 2 dims, else 0")
    first_unit: int = _c("unit_id of the tensor's first unit")
    n_units: int = _c("Number of units of the tensor (0 unless status = ok)")
    has_spectrum: bool = _c("Whether the spectrum of ΔW is computed (per expert for a stack of experts)")
    experts: int | None = _c("Experts of a 3-D stack of experts (units and spectra per expert); 0 otherwise")


@dataclass(frozen=True)
class UnitRecord:
    run_id: str = _c("Run id")
    unit_id: int = _c("Unit number within the run")
    tensor_index: int = _c("Tensor's plan index")
    tensor: str = _c("Tensor name")
    start: int = _c("First flat element of the unit")
    stop: int = _c("One past the last flat element")
    numel: int = _c("Elements in the unit")
    changed: int = _c("Entries with |Δ| > atol (the run's criterion; the mask)")
    changed_bits: int = _c("Entries whose stored bits differ")
    changed_ladder: tuple[int, ...] = _c("Entries with |Δ| > t for each t of the run's ladder (runs.ladder), in order")
    changed_rel: int = _c("Entries with |Δ| > η·max(|w|,|ŵ|)")
    changed_subprecision: int | None = _c("Mixed dtypes: changed entries that a re-save in the narrower dtype would erase")
    changed_code: int | None = _c("Block-scaled FP8 on both sides: entries whose FP8 code differs")
    changed_scale_blocks: int | None = _c("Block-scaled FP8 on both sides: scale blocks (of this unit's rows) whose scale differs")
    nonfinite: int = _c("Changed entries whose base or tuned value is NaN or ±Inf")
    max_abs_delta: float | None = _c("max |Δ| over entries finite on both sides (NULL for int/bool)")
    sum_abs_delta: float | None = _c("Σ |Δ| over entries finite on both sides")
    sum_sq_delta: float | None = _c("Σ Δ² over entries finite on both sides")
    sum_sq_base: float | None = _c("Σ w² over the unit's base entries")
    rows_touched: int | None = _c("Rows with a changed entry (≥ 2-D tensors)")
    cols_bitmap: bytes | None = _c("Packed LSB-first bitmap of columns with a changed entry")
    row_changed_sq: int | None = _c("Σ over the unit's rows of (changed entries in the row)² (≥ 2-D tensors)")
    col_changed: tuple[int, ...] | None = _c("Changed entries per column within the unit (≥ 2-D; empty when none)")
    mask_codec: str = _c("Codec of `mask`: empty, packbits, packbits+zstd or gaps+zstd")
    mask: bytes = _c("The compressed `changed` mask of the unit (LSB-first bits)")
    node_id: str = _c("Ray node that processed the unit")
    worker_pid: int = _c("Process id of the actor that processed the unit")
    seconds: float = _c("Wall time of read + kernel + write")
    rss_anon_bytes: int = _c("Anonymous (not file-backed) resident memory of the actor right after the kernel")
    finished_at: dt.datetime = _c("When the unit was written (UTC)")


@dataclass(frozen=True)
class SpectrumRecord:
    run_id: str = _c("Run id")
    tensor_index: int = _c("Tensor's plan index")
    tensor: str = _c("Tensor name")
    expert: int | None = _c("The expert's index, for a matrix of a stack of experts; NULL for a 2-D tensor")
    method: str = _c("exact or sketch")
    device: str = _c("torch device of the SVD")
    rank: int | None = _c("rank(ΔW) at matrix_rank's default tolerance (exact only)")
    max_rank: int = _c("min(m, n)")
    top_sv: tuple[float, ...] | None = _c("Leading singular values of ΔW, largest first (NULL when not computed)")
    stable_rank: float | None = _c("‖ΔW‖F² / σ1²")
    effective_rank: float | None = _c("exp(entropy of σ/Σσ) (exact only)")
    rank_1e1: int | None = _c("Singular values above 1e-1·σ1")
    rank_1e2: int | None = _c("Singular values above 1e-2·σ1")
    rank_1e3: int | None = _c("Singular values above 1e-3·σ1")
    fro: float | None = _c("‖ΔW‖F of the analysed matrix (NULL when ΔW is not finite)")
    energy_rank_99: int | None = _c("Smallest r with Σ_{i≤r} σᵢ² ≥ 0.99‖ΔW‖F² (NULL when the σ computed — a sketch's — do not reach it)")
    subspace_k: int | None = _c("k of the principal angles and of spectral_shift")
    principal_cos_u: tuple[float, ...] | None = _c("Cosines of the principal angles between the top-k left singular subspaces of W0 and W1, descending")
    principal_cos_v: tuple[float, ...] | None = _c("The same for the right singular subspaces")
    principal_angle_max_deg: float | None = _c("Largest principal angle of either side, degrees (from the sines)")
    spectral_shift: float | None = _c("‖σ₁:ₖ(W1) − σ₁:ₖ(W0)‖₂ / ‖σ₁:ₖ(W0)‖₂ over the top subspace_k singular values")
    spectral_shift_full: float | None = _c("The same over the whole spectrum (rank_mode = exact only)")
    low_mag_overlap_10: float | None = _c("|M_low(0.1) ∩ M| / |M|: changed entries among the 10 % of smallest |W0| (ties in)")
    low_mag_overlap_30: float | None = _c("The same for the 30 % of smallest |W0|")
    low_mag_overlap_50: float | None = _c("The same for the 50 % of smallest |W0|")
    low_mag_frac_10: float | None = _c("|M_low(0.1)| / numel: the overlap's baseline for a mask placed at random")
    low_mag_frac_30: float | None = _c("|M_low(0.3)| / numel")
    low_mag_frac_50: float | None = _c("|M_low(0.5)| / numel")
    seconds: float = _c("Wall time of the decomposition")
    science_seconds: float | None = _c("Wall time of the subspace, spectral-shift and magnitude-mask metrics")
    node_id: str = _c("Ray node that computed it")
    note: str | None = _c("Why the spectrum was not computed, e.g. 'ΔW has 3 non-finite entries (NaN or ±Inf)'; "
                          "NULL when it was")


@dataclass(frozen=True)
class HashRecord:
    run_id: str = _c("Run id")
    tensor_index: int = _c("Tensor's plan index")
    tensor: str = _c("Tensor name")
    base_sha256: str | None = _c("SHA-256 (hex) of the base tensor's stored bytes, in file order")
    tuned_sha256: str | None = _c("SHA-256 (hex) of the tuned tensor's stored bytes, in file order")


@dataclass(frozen=True)
class TensorRecord:
    run_id: str = _c("Run id")
    tensor_index: int = _c("Tensor's plan index")
    tensor: str = _c("Tensor name")
    status: str = _c("ok when compared, else only_in_base, only_in_tuned, shape_mismatch, dtype_mismatch, rows_only_in_base, rows_only_in_tuned, fused (compared part by part) or block_scale (compared with its weight)")
    match: str = _c("How the pair was matched: exact, renamed, tied_in_base/tuned, resized_rows, dtype_widened, fp8_block_scaled, fused_slice (joined by +), or none")
    note: str = _c("Detail of the status or of the comparison (e.g. mixed dtypes)")
    dtype: str = _c("Stored dtype (base's when present)")
    compare_dtype: str | None = _c("Dtype the comparison was done in")
    shape: tuple[int, ...] = _c("Shape (base's when present)")
    base_shape: tuple[int, ...] | None = _c("Shape in base")
    tuned_shape: tuple[int, ...] | None = _c("Shape in tuned")
    numel: int = _c("Elements")
    changed: int | None = _c("Entries with |Δ| > atol, summed over units")
    changed_bits: int | None = _c("Entries whose stored bits differ")
    changed_ladder: tuple[int, ...] | None = _c("Entries with |Δ| > t for each t of the run's ladder, in order")
    changed_rel: int | None = _c("Entries with |Δ| > η·max(|w|,|ŵ|)")
    changed_subprecision: int | None = _c("Mixed dtypes: changed entries that a re-save in the narrower dtype would erase")
    changed_code: int | None = _c("Block-scaled FP8 on both sides: entries whose FP8 code differs")
    changed_scale_blocks: int | None = _c("Block-scaled FP8 on both sides: scale blocks whose scale differs")
    nonfinite: int | None = _c("Changed entries whose base or tuned value is NaN or ±Inf")
    max_abs_delta: float | None = _c("max |Δ|")
    mean_abs_delta: float | None = _c("Σ|Δ| / numel")
    delta_fro: float | None = _c("‖ΔW‖F (finite entries)")
    base_fro: float | None = _c("‖W0‖F")
    rows: int | None = _c("Rows (product of all but the last dim) for ≥ 2-D tensors")
    rows_touched: int | None = _c("Rows with a changed entry")
    cols: int | None = _c("Columns (last dim) for ≥ 2-D tensors")
    cols_touched: int | None = _c("Columns with a changed entry")
    rank: int | None = _c("rank(ΔW) as the paper computes it (exact mode)")
    max_rank: int | None = _c("min(m, n) for 2-D tensors")
    rank_method: str | None = _c("exact or sketch; NULL when no spectrum was computed")
    stable_rank: float | None = _c("‖ΔW‖F² / σ1²")
    effective_rank: float | None = _c("exp(entropy of σ/Σσ)")
    rank_1e1: int | None = _c("Singular values above 1e-1·σ1")
    rank_1e2: int | None = _c("Singular values above 1e-2·σ1")
    rank_1e3: int | None = _c("Singular values above 1e-3·σ1")
    top_sv: tuple[float, ...] | None = _c("Leading singular values of ΔW")
    energy_rank_99: int | None = _c("Smallest r with Σ_{i≤r} σᵢ² ≥ 0.99‖ΔW‖F² (NULL when the σ computed — a sketch's — do not reach it)")
    subspace_k: int | None = _c("k of the principal angles and of spectral_shift")
    principal_cos_u: tuple[float, ...] | None = _c("Cosines of the principal angles between the top-k left singular subspaces of W0 and W1, descending")
    principal_cos_v: tuple[float, ...] | None = _c("The same for the right singular subspaces")
    principal_angle_max_deg: float | None = _c("Largest principal angle of either side, degrees (from the sines)")
    spectral_shift: float | None = _c("‖σ₁:ₖ(W1) − σ₁:ₖ(W0)‖₂ / ‖σ₁:ₖ(W0)‖₂ over the top subspace_k singular values")
    spectral_shift_full: float | None = _c("The same over the whole spectrum (rank_mode = exact only)")
    low_mag_overlap_10: float | None = _c("|M_low(0.1) ∩ M| / |M|: changed entries among the 10 % of smallest |W0| (ties in)")
    low_mag_overlap_30: float | None = _c("The same for the 30 % of smallest |W0|")
    low_mag_overlap_50: float | None = _c("The same for the 50 % of smallest |W0|")
    low_mag_frac_10: float | None = _c("|M_low(0.1)| / numel: the overlap's baseline for a mask placed at random")
    low_mag_frac_30: float | None = _c("|M_low(0.3)| / numel")
    low_mag_frac_50: float | None = _c("|M_low(0.5)| / numel")
    base_sha256: str | None = _c("`--hash`: SHA-256 (hex) of the base tensor's stored bytes, in file order")
    tuned_sha256: str | None = _c("`--hash`: SHA-256 (hex) of the tuned tensor's stored bytes, in file order")
    row_cv: float | None = _c("Coefficient of variation (std/mean) of the fraction of each row's entries changed")
    col_cv: float | None = _c("The same over columns")
    row_cv_random: float | None = _c("row_cv expected of the same number of changes placed at random")
    col_cv_random: float | None = _c("col_cv expected of the same number of changes placed at random")


@dataclass(frozen=True)
class CommitRecord:
    run_id: str = _c("Run id")
    completed_at: dt.datetime = _c("When the run was committed (UTC)")
    numel: int = _c("Elements compared (tensors with status ok)")
    changed: int = _c("Entries with |Δ| > atol over the whole model")
    changed_bits: int = _c("Entries whose stored bits differ over the whole model")
    n_units: int = _c("Units committed")
    n_spectra: int = _c("Spectra committed")
    n_mismatched: int = _c("Tensors with a status other than ok")
    n_spectra_skipped: int | None = _c("Spectra recorded as not computed (ΔW not finite); the reason is in the "
                                       "spectrum's and the tensor's note")


@dataclass(frozen=True)
class WatchEventRecord:
    event_id: str = _c("Event id (random hex)")
    tick_id: str = _c("Id of the watch tick that recorded it")
    watch: str = _c("Watch list name (`name` in the watch file, default: the file's stem)")
    recorded_at: dt.datetime = _c("When the event was recorded (UTC)")
    action: str = _c("resolve_base (base reference → commit), list (a repo's branches and tags, or a pattern's repos) or analyse (submit one revision)")
    repo: str = _c("Tuned repo id or pattern; the base reference for resolve_base")
    refs: tuple[str, ...] | None = _c("Watched branch and tag names pointing at the revision")
    revision: str | None = _c("Commit sha of the tuned revision (analyse)")
    base: str | None = _c("Base as resolved: Hub repo id or absolute path (analyse)")
    base_revision: str | None = _c("Commit sha of the base (NULL for a local base)")
    run_id: str | None = _c("Run started or resumed for the revision (analyse)")
    outcome: str = _c("started, complete or failed; recovered: a resolve_base or list that works again after failures; skipped: an analyse not needed (see reason)")
    attempt: int = _c("1 + the consecutive failures of the same subject before this event")
    error: str | None = _c("Why it failed, one line (tokens redacted)")
    retry_at: dt.datetime | None = _c("After a failure: earliest next attempt (back-off)")
    seconds: float = _c("Wall time of the attempt")
    reason: str | None = field(default=None, metadata={"doc": "Why an analyse was skipped: its safetensors files are those "
                                                              "of an analysed revision, whose run is run_id"})


@dataclass(frozen=True)
class ChainStepRecord:
    key: str = _c("The log's key: `<chain>#<step>#<run_vs_base>#<run_vs_prev>`; a step recorded again with other "
                  "runs (its checkpoint rewritten) supersedes the earlier record")
    chain: str = _c("Chain name (`raydiff submit … --chain NAME`, or `<repo>@<branch>` for a watched branch)")
    step: int = _c("Position of the checkpoint in the chain, from 1")
    base: str = _c("The chain's base as resolved: absolute local path or Hub repo id")
    base_revision: str | None = _c("Hub commit sha of the base (NULL for local paths)")
    tuned: str = _c("The step's checkpoint as resolved: absolute local path or Hub repo id")
    tuned_revision: str | None = _c("Hub commit sha of the step's checkpoint (NULL for local paths)")
    run_vs_base: str = _c("Complete run of the checkpoint against the base (atol 0)")
    run_vs_prev: str = _c("Complete run of the checkpoint against the previous step's (atol 0); step 1: run_vs_base")
    recorded_at: dt.datetime = _c("When the step was recorded (UTC)")


RECORD_KINDS: dict[str, type] = {
    "run": RunRecord,
    "plan": PlanRecord,
    "unit": UnitRecord,
    "spectrum": SpectrumRecord,
    "tensor": TensorRecord,
    "commit": CommitRecord,
    "watch_event": WatchEventRecord,
    "chain_step": ChainStepRecord,
}


def _arrow_type(tp: Any) -> tuple[pa.DataType, bool]:
    """Arrow type and nullability of a field annotation."""
    nullable = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) != len(typing.get_args(tp))
        (tp,) = args
        origin = typing.get_origin(tp)
    if origin is tuple:
        inner, _ = _arrow_type(typing.get_args(tp)[0])
        return pa.list_(inner), nullable
    simple = {int: pa.int64(), float: pa.float64(), str: pa.string(), bytes: pa.binary(),
              bool: pa.bool_(), dt.datetime: pa.timestamp("us", tz="UTC")}
    return simple[tp], nullable


@functools.cache
def schema(kind: type) -> pa.Schema:
    """The Parquet schema of a record class, with each field's doc as metadata.

    Example:
        >>> schema(CommitRecord).field("changed").type
        DataType(int64)
    """
    hints = typing.get_type_hints(kind)
    fields = []
    for f in dataclasses.fields(kind):
        t, nullable = _arrow_type(hints[f.name])
        fields.append(pa.field(f.name, t, nullable=nullable, metadata={"doc": f.metadata.get("doc", "")}))
    return pa.schema(fields, metadata={"raydiff.record": kind.__name__})


def to_table(records: list[Any], kind: type) -> pa.Table:
    """Records of one kind → an Arrow table with the derived schema."""
    s = schema(kind)
    cols = {f.name: [getattr(r, f.name) for r in records] for f in dataclasses.fields(kind)}
    return pa.Table.from_pydict(cols, schema=s)


#: Ladder columns of store layout 1 (before the ladder was one list), in the ladder's order.
_V1_LADDER = ("changed_1e8", "changed_1e7", "changed_1e6", "changed_1e5", "changed_1e4")
_V1_LADDER_VALUES = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)


def conform(table: pa.Table, kind: type) -> pa.Table:
    """A table read from a file of ``kind`` in the current schema: columns in order, cast,
    and what an older release's file lacks filled in — the ladder's five columns of store
    layout 1 become ``changed_ladder`` (and a layout-1 run's ``ladder`` the five values it
    counted), a column added since is NULL.

    Raises:
        ValueError: a column the file lacks cannot be NULL.
    """
    s = schema(kind)
    if table.schema.equals(s, check_metadata=False):
        return table
    cols = []
    names = set(table.column_names)
    for f in s:
        if f.name in names:
            col = table.column(f.name)
        elif f.name == "changed_ladder" and set(_V1_LADDER) <= names:
            steps = [table.column(n).to_pylist() for n in _V1_LADDER]
            col = pa.array([None if v[0] is None else list(v) for v in zip(*steps)], f.type)
        elif f.name == "ladder" and kind is RunRecord:
            col = pa.array([list(_V1_LADDER_VALUES)] * table.num_rows, f.type)
        elif f.nullable:
            col = pa.nulls(table.num_rows, f.type)
        else:
            raise ValueError(f"a {kind.__name__} file lacks the column {f.name}")
        cols.append(col.cast(f.type) if col.type != f.type else col)
    return pa.Table.from_arrays(cols, schema=s)


def from_table(table: pa.Table, kind: type) -> list[Any]:
    """An Arrow table with a record's columns → records (lists become tuples)."""
    names = [f.name for f in dataclasses.fields(kind)]
    rows = table.select(names).to_pylist()
    out = []
    for row in rows:
        for k, v in row.items():
            if isinstance(v, list):
                row[k] = tuple(v)
        out.append(kind(**row))
    return out
