"""Pairing: every tensor name of either checkpoint, matched with its counterpart or not,
every decision recorded (status, match, note) — nothing dropped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from raydiff.errors import PlanProblem
from raydiff.inputs.checkpoint import Checkpoint, TensorInfo
from raydiff.options import DiffOptions
from raydiff.plan.formats import SCALE_SUFFIX, BlockScale, block_scales, fused_split, rows_of, stack_split
from raydiff.records import (
    MATCH_EXACT,
    MATCH_FP8_BLOCKS,
    MATCH_FUSED_SLICE,
    MATCH_NONE,
    MATCH_RENAMED,
    MATCH_RESIZED,
    MATCH_TIED_BASE,
    MATCH_TIED_TUNED,
    MATCH_WIDENED,
    STATUS_BLOCK_SCALE,
    STATUS_DTYPE,
    STATUS_FUSED,
    STATUS_OK,
    STATUS_ONLY_BASE,
    STATUS_ONLY_TUNED,
    STATUS_ROWS_BASE,
    STATUS_ROWS_TUNED,
    STATUS_SHAPE,
)

LM_HEAD = "lm_head.weight"
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
              "gpt_neox.embed_in.weight", "embed_tokens.weight", "tok_embeddings.weight", "wte.weight")

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
class Pairing:
    """One row of the plan before it is cut into units: a name and what each side offers
    (with the block scales of an FP8 weight)."""

    name: str
    status: str
    match: str
    base: TensorInfo | None
    tuned: TensorInfo | None
    compare_dtype: str | None
    note: str
    base_scale: BlockScale | None = None
    tuned_scale: BlockScale | None = None


@dataclass
class _Side:
    """One checkpoint's tensors under the names they are paired by."""

    name: str
    ck: Checkpoint
    tensors: dict[str, TensorInfo]
    renamed: set[str]
    scales: dict[str, BlockScale]
    sliced: dict[str, str]  # split name → where its rows are in this side's fused tensor or stack
    prefix: tuple[str, str] | None = field(default=None)  # (its prefix, base's) when found without --rename


def _renamed(tensors: Mapping[str, TensorInfo], rules: tuple[tuple[str, str], ...],
             side: str) -> tuple[dict[str, TensorInfo], set[str]]:
    """Normalised name → tensor, and the names a rule renamed. First matching prefix wins."""
    out: dict[str, TensorInfo] = {}
    renamed = set()
    for name, info in tensors.items():
        new = name
        for old, repl in rules:
            if name.startswith(old):
                new = repl + name[len(old):]
                break
        if new in out:
            raise PlanProblem(f"rename maps both {out[new].name!r} and {name!r} of {side} to {new!r}; "
                              "make the rules more specific", option="rename")
        out[new] = info
        if new != name:
            renamed.add(new)
    return out, renamed


def _cuts(name: str) -> list[int]:
    """Where a dotted name can be cut into a prefix and the rest: its start and after each dot."""
    return [0] + [i + 1 for i, c in enumerate(name) if c == "."]


def prefix_rule(base: set[str], tuned: set[str]) -> tuple[str, str] | None:
    """``(tuned's prefix, base's)``: the one rewrite of a leading part of tuned's names that
    pairs the names that do not pair as they are, as when a finetune saved by
    ``GPT2LMHeadModel`` (``transformer.h.0.…``) meets the base's ``h.0.…``; ``None`` when
    there is none that pairs at least half of them and more than pair already.

    Each unpaired tuned name votes for the prefixes that leave its longest rest (two parts or
    more) equal to exactly one unpaired base name's rest.

    Example:
        >>> prefix_rule({"h.0.w", "h.1.w", "wte.weight"}, {"transformer.h.0.w", "transformer.h.1.w", "transformer.wte.weight"})
        ('transformer.', '')
    """
    b_only, t_only = base - tuned, tuned - base
    if len(b_only) < 2 or len(t_only) < 2:
        return None
    rests: dict[str, list[str]] = {}
    for n in sorted(b_only):
        for k in _cuts(n):
            if "." in n[k:]:
                rests.setdefault(n[k:], []).append(n[:k])
    votes: Counter[tuple[str, str]] = Counter()
    for n in t_only:
        for k in _cuts(n):
            found = rests.get(n[k:])
            if found:
                if len(found) == 1:  # its prefix is not n's: the two names are on different sides
                    votes[(n[:k], found[0])] += 1
                break
    if not votes:
        return None
    (old, new), count = votes.most_common(1)[0]
    if count < 2 or count <= len(base & tuned) or 2 * count < min(len(b_only), len(t_only)):
        return None
    return old, new


def _rename_to_base(b: _Side, t: _Side) -> None:
    """Apply :func:`prefix_rule` to tuned's unpaired names whose rewrite is an unpaired base name."""
    rule = prefix_rule(set(b.tensors), set(t.tensors))
    if rule is None:
        return
    old, new = rule
    for name in sorted(set(t.tensors) - set(b.tensors)):
        to = new + name[len(old):]
        if name.startswith(old) and to in b.tensors and to not in t.tensors:
            t.tensors[to] = t.tensors.pop(name)
            t.renamed.add(to)
    t.prefix = rule


def _ties(ck: Checkpoint) -> bool:
    return bool(ck.config and ck.config.get("tie_word_embeddings") is True)


def _side(name: str, ck: Checkpoint, rules: tuple[tuple[str, str], ...]) -> _Side:
    tensors, renamed = _renamed(ck.tensors, rules, name)
    by_name = {info.name: n for n, info in tensors.items()}
    scales = {by_name[w]: s for w, s in block_scales(ck.tensors, ck.config, ck.ref).items()}
    return _Side(name, ck, tensors, renamed, scales, {})


def _split_fused(own: _Side, other: _Side, out: list[Pairing]) -> None:
    """Replace each fused projection, or stack of experts, of ``own`` that ``other`` has
    split by its parts."""
    for name in sorted(own.tensors):
        info = own.tensors[name]
        if name in other.tensors or name in own.scales:  # block scales do not follow a row split
            continue
        stack = stack_split(name, info, other.tensors)
        split = stack or fused_split(name, info, [own.ck.config, other.ck.config], other.tensors)
        if split is None or any(part in own.tensors for part, _, _ in split):
            continue
        del own.tensors[name]
        if stack:
            experts, rows, cols = info.shape
            flat = TensorInfo(info.name, info.dtype, (experts * rows, cols), info.file, info.offset, info.nbytes)
            for part, start, stop in split:
                own.tensors[part] = rows_of(flat, start, stop)
                e = start // rows
                own.sliced[part] = (f"expert {e}, rows {start - e * rows}…{stop - 1 - e * rows} of {own.name}'s "
                                    f"stack of experts {info.name!r}")
            first = split[0][0]  # …experts.0.gate_proj.weight
            prefix = first[:first.rindex(".experts.") + len(".experts.")]
            kinds = "/".join(dict.fromkeys(p.rsplit(".", 2)[-2] for p, _, _ in split))
            note = (f"stack of {experts} experts in {own.name}; compared expert by expert with {other.name}'s "
                    f"{prefix}{{e}}.{kinds}.weight")
        else:
            for part, start, stop in split:
                own.tensors[part] = rows_of(info, start, stop)
                own.sliced[part] = f"rows {start}…{stop - 1} of {own.name}'s fused {info.name!r}"
            parts = ", ".join(f"{p.rsplit('.', 2)[-2]} (rows {a}…{b - 1})" for p, a, b in split)
            note = f"fused in {own.name}; compared part by part with {other.name}'s {parts}"
        out.append(Pairing(name, STATUS_FUSED, MATCH_NONE, info if own.name == "base" else None,
                           info if own.name == "tuned" else None, None, note))


def match_tensors(base: Checkpoint, tuned: Checkpoint, options: DiffOptions) -> list[Pairing]:
    """Pair the tensors of two checkpoints, deciding every quirk explicitly.

    Names are normalised by ``options.rename`` (prefix rules) on both sides, then paired;
    without rules, tuned's names that differ from base's by one prefix (:func:`prefix_rule`)
    take base's.
    A side without ``lm_head.weight`` whose ``config.json`` declares ``tie_word_embeddings``
    offers its embedding instead. A fused projection on one side is compared part by part
    with the split projections of the other (:mod:`raydiff.plan.formats`); an FP8 weight with
    block scales is compared as its dequantized value, its scale tensor paired with it.
    Tensors whose shapes differ only in the first dimension (resized vocabularies) are
    compared on their common rows, and the extra rows get a row of their own. Mixed float
    dtypes are compared in the wider one. Everything else that cannot be compared keeps a
    mismatch status — nothing is dropped.
    """
    b, t = _side("base", base, options.rename), _side("tuned", tuned, options.rename)
    if not options.rename:
        _rename_to_base(b, t)
    out: list[Pairing] = []
    ties: dict[str, str] = {}  # lm_head supplied by a tied embedding, per side
    for own, other in ((b, t), (t, b)):
        if LM_HEAD not in own.tensors and LM_HEAD in other.tensors and _ties(own.ck):
            emb = next((e for e in EMBEDDINGS if e in own.tensors), None)
            if emb is not None:
                own.tensors[LM_HEAD] = own.tensors[emb]
                ties[own.name] = emb
    for own, other in ((b, t), (t, b)):
        _split_fused(own, other, out)
    scale_names = {n for side in (b, t) for w, s in side.scales.items() for n in side.tensors
                   if n == w + SCALE_SUFFIX}
    for name in sorted(scale_names):
        owners = [side.name for side in (b, t) if name[: -len(SCALE_SUFFIX)] in side.scales]
        out.append(Pairing(name, STATUS_BLOCK_SCALE, MATCH_NONE, b.tensors.get(name), t.tensors.get(name), None,
                           f"block scales of {name[: -len(SCALE_SUFFIX)]} in {' and '.join(owners)}: compared as part "
                           "of that weight (its dequantized values; changed_scale_blocks counts changed scales)"))
    for name in sorted((set(b.tensors) | set(t.tensors)) - scale_names):
        out.extend(_pair(name, b, t, ties))
    return sorted(out, key=lambda p: (p.name, p.status != STATUS_OK))


def _pair(name: str, b: _Side, t: _Side, ties: Mapping[str, str]) -> list[Pairing]:
    bi, ti = b.tensors.get(name), t.tensors.get(name)
    matches, notes = [], []
    if name in b.renamed or name in t.renamed:
        matches.append(MATCH_RENAMED)
        notes.append("renamed from " + " / ".join(
            f"{s.tensors[name].name!r} in {s.name}" for s in (b, t) if name in s.renamed))
        if t.prefix and name in t.renamed:
            notes.append(f"tuned's names begin {t.prefix[0]!r} where base's begin {t.prefix[1]!r}, found without "
                         "--rename (give --rename to choose the rules)")
    for side in (b, t):
        if name == LM_HEAD and side.name in ties:
            matches.append(MATCH_TIED_BASE if side.name == "base" else MATCH_TIED_TUNED)
            notes.append(f"{side.name} has no {LM_HEAD}; its config ties it to {ties[side.name]}, compared against that")
        if name in side.sliced:
            matches.append(MATCH_FUSED_SLICE)
            notes.append(side.sliced[name])
    if bi is None or ti is None:
        status = STATUS_ONLY_TUNED if bi is None else STATUS_ONLY_BASE
        note = "; ".join(notes + [f"absent from {'base' if bi is None else 'tuned'}"])
        return [Pairing(name, status, MATCH_NONE, bi, ti, None, note)]
    bs, ts = b.scales.get(name), t.scales.get(name)
    extra: Pairing | None = None
    if bi.shape != ti.shape:
        if bi.shape[1:] == ti.shape[1:] and bi.shape and bi.shape[0] != ti.shape[0] and not (bs or ts):
            common = min(bi.shape[0], ti.shape[0])
            longer, side, status = (bi, "base", STATUS_ROWS_BASE) if bi.shape[0] > common else (ti, "tuned", STATUS_ROWS_TUNED)
            rows = rows_of(longer, common, longer.shape[0])
            extra_note = (f"rows {common}…{longer.shape[0] - 1} ({longer.shape[0] - common} rows) exist only "
                          f"in {side}: shape {list(bi.shape)} in base, {list(ti.shape)} in tuned")
            extra = Pairing(name, status, MATCH_RESIZED, rows if side == "base" else None,
                            rows if side == "tuned" else None, None, extra_note)
            bi, ti = rows_of(bi, 0, common), rows_of(ti, 0, common)
            matches.append(MATCH_RESIZED)
            notes.append(f"first {common} rows compared; {extra_note}")
        else:
            note = "; ".join(notes + [f"shape {list(bi.shape)} in base, {list(ti.shape)} in tuned"])
            return [Pairing(name, STATUS_SHAPE, MATCH_NONE, bi, ti, None, note)]
    if bs or ts:
        # dequantized values (code × block scale, in float32) against the other side's values
        other = [x.dtype for x, s in ((bi, bs), (ti, ts)) if not s]
        cdt = "F64" if "F64" in other else "F32"
        if other and compare_dtype(other[0], "F32") is None:
            note = "; ".join(notes + [f"dtype {bi.dtype} in base, {ti.dtype} in tuned cannot be compared"])
            return [Pairing(name, STATUS_DTYPE, MATCH_NONE, bi, ti, None, note)]
        matches.append(MATCH_FP8_BLOCKS)
        if other:
            matches.append(MATCH_WIDENED)
        for side, info, s in (("base", bi, bs), ("tuned", ti, ts)):
            if s:
                notes.append(f"{side}: {info.dtype} codes × {s.rows}×{s.cols} block scales, dequantized")
        notes.append(f"compared in {cdt}")
        pairs = [Pairing(name, STATUS_OK, "+".join(matches), bi, ti, cdt, "; ".join(notes), bs, ts)]
        return pairs
    cdt = compare_dtype(bi.dtype, ti.dtype)
    if cdt is None:
        note = "; ".join(notes + [f"dtype {bi.dtype} in base, {ti.dtype} in tuned cannot be compared"])
        return [Pairing(name, STATUS_DTYPE, MATCH_NONE, bi, ti, None, note)]
    if bi.dtype != ti.dtype:
        matches.append(MATCH_WIDENED)
        notes.append(f"{bi.dtype} vs {ti.dtype}, compared in {cdt}")
    pairs = [Pairing(name, STATUS_OK, "+".join(matches) or MATCH_EXACT, bi, ti, cdt, "; ".join(notes))]
    return pairs + ([extra] if extra is not None else [])
