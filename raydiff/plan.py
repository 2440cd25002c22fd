"""The plan: every tensor of either checkpoint paired by name and cut into work units.

Units are cut at deterministic element offsets that depend only on the tensor's shape and
``chunk_elems``, so the masks of different runs over the same base line up unit for unit.
Units of tensors with two or more dimensions cover whole rows (last dimension), which
lets rows-touched counts be summed over units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from raydiff.inputs.checkpoint import Checkpoint, TensorInfo
from raydiff.dtypes import DTYPES
from raydiff.errors import PlanProblem
from raydiff.records import (
    MATCH_EXACT,
    MATCH_NONE,
    MATCH_RENAMED,
    MATCH_RESIZED,
    MATCH_TIED_BASE,
    MATCH_TIED_TUNED,
    MATCH_WIDENED,
    STATUS_DTYPE,
    STATUS_OK,
    STATUS_ONLY_BASE,
    STATUS_ONLY_TUNED,
    STATUS_ROWS_BASE,
    STATUS_ROWS_TUNED,
    STATUS_SHAPE,
)
from raydiff.options import DiffOptions

LM_HEAD = "lm_head.weight"
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
              "gpt_neox.embed_in.weight", "embed_tokens.weight", "tok_embeddings.weight")

_FLOAT_WIDTH = {"F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def compare_dtype(a: str, b: str) -> str | None:
    """The dtype two tensors are compared in: their own if equal, else the narrowest float
    type holding both exactly; ``None`` when they cannot be compared (int vs float).

    Example:
        >>> compare_dtype("BF16", "F32"), compare_dtype("BF16", "F16"), compare_dtype("I8", "F32")
        ('F32', 'F32', None)
    """
    if a == b:
        return a
    if a in _FLOAT_WIDTH and b in _FLOAT_WIDTH:
        width = max(_FLOAT_WIDTH[a], _FLOAT_WIDTH[b])
        return "F64" if width == 8 else "F32"
    return None


@dataclass(frozen=True)
class TensorPlan:
    """One tensor name of either side and what will be done with it.

    Attributes:
        index: position in the plan (tensors sorted by name).
        name: tensor name.
        status: ``ok`` (compared) or a mismatch status.
        base, tuned: locations on each side (``None`` where absent).
        compare_dtype: dtype the comparison is done in (``None`` unless ``ok``).
        unit_elems: elements per unit (the last unit may be shorter).
        row_len: last dimension for tensors with ≥ 2 dims, else 0.
        first_unit, n_units: the tensor's units are ``first_unit … first_unit+n_units-1``.
        spectrum: whether the rank/spectrum of ΔW is computed.
        note: human-readable detail of the status.
        match: how the pair was matched (``exact``, ``renamed``, ``tied_in_base``…).
    """

    index: int
    name: str
    status: str
    base: TensorInfo | None
    tuned: TensorInfo | None
    compare_dtype: str | None
    unit_elems: int
    row_len: int
    first_unit: int
    n_units: int
    spectrum: bool
    note: str
    match: str = MATCH_EXACT

    @property
    def numel(self) -> int:
        info = self.base or self.tuned
        assert info is not None
        return info.numel


@dataclass(frozen=True)
class WorkUnit:
    """A slice ``[start, stop)`` of one tensor's flattened elements, on both sides."""

    unit_id: int
    tensor_index: int
    tensor: str
    start: int
    stop: int
    row_len: int
    base: TensorInfo
    tuned: TensorInfo
    compare_dtype: str

    @property
    def nbytes(self) -> int:
        """Input bytes this unit reads (base + tuned)."""
        return (self.stop - self.start) * (DTYPES[self.base.dtype].itemsize + DTYPES[self.tuned.dtype].itemsize)


@dataclass(frozen=True)
class SpectrumTask:
    """Rank/spectrum of ΔW for one 2-D tensor (reads the whole matrix on both sides)."""

    tensor_index: int
    tensor: str
    base: TensorInfo
    tuned: TensorInfo
    compare_dtype: str

    @property
    def flops(self) -> float:
        """Rough cost of an exact SVD of the matrix, for scheduling and estimates."""
        m, n = self.base.shape
        return 4.0 * m * n * min(m, n)


@dataclass(frozen=True)
class Plan:
    """Every tensor of both sides, the element work units and the spectrum tasks."""

    tensors: tuple[TensorPlan, ...]
    units: tuple[WorkUnit, ...]
    spectra: tuple[SpectrumTask, ...]

    @property
    def input_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def unit_elems_for(shape: tuple[int, ...], chunk_elems: int) -> tuple[int, int]:
    """``(unit_elems, row_len)`` for a tensor shape: whole rows for ≥ 2-D tensors."""
    if len(shape) >= 2 and shape[-1] > 0:
        row = shape[-1]
        return max(1, chunk_elems // row) * row, row
    return chunk_elems, 0


@dataclass(frozen=True)
class Pairing:
    """One row of the plan before it is cut into units: a name and what each side offers."""

    name: str
    status: str
    match: str
    base: TensorInfo | None
    tuned: TensorInfo | None
    compare_dtype: str | None
    note: str


def _renamed(tensors: Mapping[str, TensorInfo], rules: tuple[tuple[str, str], ...],
             side: str) -> dict[str, tuple[TensorInfo, bool]]:
    """Normalised name → (tensor, whether a rule renamed it). First matching prefix rule wins."""
    out: dict[str, tuple[TensorInfo, bool]] = {}
    for name, info in tensors.items():
        new = name
        for old, repl in rules:
            if name.startswith(old):
                new = repl + name[len(old):]
                break
        if new in out:
            other = out[new][0].name
            raise PlanProblem(f"rename maps both {other!r} and {name!r} of {side} to {new!r}; "
                              "make the rules more specific", option="rename")
        out[new] = (info, new != name)
    return out


def _rows(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """The rows ``[start, stop)`` (first dimension) of a tensor, as a tensor of their own."""
    row = info.numel // info.shape[0] if info.shape[0] else 0
    size = DTYPES[info.dtype].itemsize
    return TensorInfo(info.name, info.dtype, (stop - start,) + info.shape[1:], info.file,
                      info.offset + start * row * size, (stop - start) * row * size)


def _ties(ck: Checkpoint) -> bool:
    return bool(ck.config and ck.config.get("tie_word_embeddings") is True)


def match_tensors(base: Checkpoint, tuned: Checkpoint, options: DiffOptions) -> list[Pairing]:
    """Pair the tensors of two checkpoints, deciding every quirk explicitly.

    Names are normalised by ``options.rename`` (prefix rules) on both sides, then paired.
    A side without ``lm_head.weight`` whose ``config.json`` declares ``tie_word_embeddings``
    offers its embedding instead. Tensors whose shapes differ only in the first dimension
    (resized vocabularies) are compared on their common rows, and the extra rows get a row
    of their own. Mixed float dtypes are compared in the wider one. Everything else that
    cannot be compared keeps a mismatch status — nothing is dropped.
    """
    rules = options.rename
    bmap, tmap = _renamed(base.tensors, rules, "base"), _renamed(tuned.tensors, rules, "tuned")
    ties: dict[str, str] = {}  # lm_head supplied by a tied embedding, per side
    for side, own, other, ck in (("base", bmap, tmap, base), ("tuned", tmap, bmap, tuned)):
        if LM_HEAD not in own and LM_HEAD in other and _ties(ck):
            emb = next((e for e in EMBEDDINGS if e in own), None)
            if emb is not None:
                own[LM_HEAD] = (own[emb][0], own[emb][1])
                ties[side] = emb
    out: list[Pairing] = []
    for name in sorted(set(bmap) | set(tmap)):
        b, t = (bmap.get(name) or (None, False)), (tmap.get(name) or (None, False))
        bi, ti = b[0], t[0]
        matches = []
        notes = []
        if b[1] or t[1]:
            matches.append(MATCH_RENAMED)
            notes.append("renamed from " + " / ".join(
                f"{x.name!r} in {side}" for x, r, side in ((bi, b[1], "base"), (ti, t[1], "tuned")) if x and r))
        for side in ("base", "tuned"):
            if name == LM_HEAD and side in ties:
                matches.append(MATCH_TIED_BASE if side == "base" else MATCH_TIED_TUNED)
                notes.append(f"{side} has no {LM_HEAD}; its config ties it to {ties[side]}, compared against that")
        if bi is None or ti is None:
            status = STATUS_ONLY_TUNED if bi is None else STATUS_ONLY_BASE
            note = "; ".join(notes + [f"absent from {'base' if bi is None else 'tuned'}"])
            out.append(Pairing(name, status, MATCH_NONE, bi, ti, None, note))
            continue
        extra: Pairing | None = None
        if bi.shape != ti.shape:
            if bi.shape[1:] == ti.shape[1:] and bi.shape and bi.shape[0] != ti.shape[0]:
                common = min(bi.shape[0], ti.shape[0])
                longer, side, status = (bi, "base", STATUS_ROWS_BASE) if bi.shape[0] > common else (ti, "tuned", STATUS_ROWS_TUNED)
                rows = _rows(longer, common, longer.shape[0])
                extra_note = (f"rows {common}…{longer.shape[0] - 1} ({longer.shape[0] - common} rows) exist only "
                              f"in {side}: shape {list(bi.shape)} in base, {list(ti.shape)} in tuned")
                extra = Pairing(name, status, MATCH_RESIZED, rows if side == "base" else None,
                                rows if side == "tuned" else None, None, extra_note)
                bi, ti = _rows(bi, 0, common), _rows(ti, 0, common)
                matches.append(MATCH_RESIZED)
                notes.append(f"first {common} rows compared; {extra_note}")
            else:
                note = "; ".join(notes + [f"shape {list(bi.shape)} in base, {list(ti.shape)} in tuned"])
                out.append(Pairing(name, STATUS_SHAPE, MATCH_NONE, bi, ti, None, note))
                continue
        cdt = compare_dtype(bi.dtype, ti.dtype)
        if cdt is None:
            note = "; ".join(notes + [f"dtype {bi.dtype} in base, {ti.dtype} in tuned cannot be compared"])
            out.append(Pairing(name, STATUS_DTYPE, MATCH_NONE, bi, ti, None, note))
            continue
        if bi.dtype != ti.dtype:
            matches.append(MATCH_WIDENED)
            notes.append(f"{bi.dtype} vs {ti.dtype}, compared in {cdt}")
        out.append(Pairing(name, STATUS_OK, "+".join(matches) or MATCH_EXACT, bi, ti, cdt, "; ".join(notes)))
        if extra is not None:
            out.append(extra)
    return out


def make_plan(base: Checkpoint, tuned: Checkpoint, options: DiffOptions) -> Plan:
    """Pair the tensors of two checkpoints (:func:`match_tensors`) and cut them into units.

    Every tensor of either side appears in ``Plan.tensors``; those that cannot be compared
    carry a status saying why (never silently dropped).

    Example:
        >>> plan = make_plan(resolve(a), resolve(b), DiffOptions())  # doctest: +SKIP
    """
    tensors: list[TensorPlan] = []
    units: list[WorkUnit] = []
    spectra: list[SpectrumTask] = []
    for index, p in enumerate(match_tensors(base, tuned, options)):
        b, t, cdt = p.base, p.tuned, p.compare_dtype
        shape = (b or t).shape  # type: ignore[union-attr]
        unit_elems, row_len = unit_elems_for(shape, options.chunk_elems)
        first = len(units)
        if p.status == STATUS_OK:
            assert b is not None and t is not None and cdt is not None
            for start in range(0, b.numel, unit_elems):
                units.append(WorkUnit(len(units), index, p.name, start, min(b.numel, start + unit_elems),
                                      row_len, b, t, cdt))
        spectrum = (p.status == STATUS_OK and options.rank != "off" and len(shape) == 2 and min(shape) >= 1
                    and DTYPES[cdt].is_float)  # type: ignore[index]
        if spectrum:
            spectra.append(SpectrumTask(index, p.name, b, t, cdt))  # type: ignore[arg-type]
        tensors.append(TensorPlan(index, p.name, p.status, b, t, cdt, unit_elems, row_len, first,
                                  len(units) - first, spectrum, p.note, p.match))
    return Plan(tuple(tensors), tuple(units), tuple(spectra))


def summarize(plan: Plan, limit: int = 5) -> str:
    """One line saying how tensors were matched and listing the ones not compared.

    Example:
        >>> summarize(plan)  # doctest: +SKIP
        '290 tensors: 288 exact, 1 tied_in_base, 1 resized_rows; not compared: only_in_tuned 1 (a.b)'
    """
    counts: dict[str, int] = {}
    unmatched: dict[str, list[str]] = {}
    for t in plan.tensors:
        if t.status == STATUS_OK:
            for m in t.match.split("+"):
                counts[m] = counts.get(m, 0) + 1
        else:
            unmatched.setdefault(t.status, []).append(t.name)
    ok = sum(1 for t in plan.tensors if t.status == STATUS_OK)
    line = f"{ok} tensors compared: " + ", ".join(f"{n} {m}" for m, n in sorted(counts.items(), key=lambda x: -x[1]))
    if unmatched:
        parts = []
        for status, names in unmatched.items():
            shown = ", ".join(names[:limit]) + (f", … {len(names) - limit} more" if len(names) > limit else "")
            parts.append(f"{status} {len(names)} ({shown})")
        line += "; not compared: " + "; ".join(parts)
    return line
