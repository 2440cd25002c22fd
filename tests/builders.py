"""Tiny builders of real safetensors checkpoints, and independent reference computations.

The references here use torch and numpy directly on the full arrays — never raydiff's
kernel — so tests compare raydiff against an independent computation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


def write_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], shards: int | Sequence[Sequence[str]] = 1,
                     config: Mapping | None = None, shard_name: str = "model-{i:05d}-of-{n:05d}.safetensors") -> Path:
    """Write a checkpoint in Hugging Face layout: one ``model.safetensors`` or an index + shards.

    ``shards`` is a count (tensors dealt round-robin in name order) or explicit name groups.
    """
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if isinstance(shards, int):
        groups = [names[i::shards] for i in range(shards)]
    else:
        groups = [list(g) for g in shards]
    groups = [g for g in groups if g]
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if len(groups) == 1 and isinstance(shards, int):
        save_file({k: tensors[k].contiguous() for k in groups[0]}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = shard_name.format(i=i, n=len(groups))
        save_file({k: tensors[k].contiguous() for k in group}, str(path / fname))
        weight_map.update({k: fname for k in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return path


#: What the kernel promises for Δ sums and Σw² (its float32 runs of ≤ 512 additions, summed
#: in float64): relative error ≤ 512·2⁻²⁴ ≈ 3.05e-5. Counts, masks and the max are exact.
SUM_REL = 3.1e-5


def ref_diff(base: torch.Tensor, tuned: torch.Tensor, atol: float = 1e-5, eta: float = 1e-3) -> dict:
    """Reference counts for one tensor pair, computed the paper's way with torch/numpy."""
    if base.dtype == tuned.dtype:
        iv = _INT_VIEW.get(base.dtype)
        bits_b = base.view(iv) if iv else base
        bits_t = tuned.view(iv) if iv else tuned
        neq = (bits_b != bits_t).numpy().ravel()
        if base.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            delta = tuned - base  # the paper's way: Δ in the stored dtype
        elif base.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            delta = tuned.float() - base.float()  # torch has no fp8 arithmetic; raydiff uses f32
        else:
            delta = None
    else:
        wide = torch.float64 if torch.float64 in (base.dtype, tuned.dtype) else torch.float32
        bw, tw = base.to(wide), tuned.to(wide)
        neq = (bw.view(_INT_VIEW[wide]) != tw.view(_INT_VIEW[wide])).numpy().ravel()
        delta = tw - bw
    out = {"numel": base.numel(), "changed_bits": int(neq.sum()), "neq": neq}
    if delta is None:  # int / bool / fp8: bitwise
        for k in ("changed", "changed_1e8", "changed_1e7", "changed_1e6", "changed_1e5", "changed_1e4", "changed_rel"):
            out[k] = out["changed_bits"]
        out["mask"] = neq
        return out
    # Entries with identical bits are unchanged even when NaN (torch alone would call NaN-NaN changed).
    ad = delta.abs()
    out["mask"] = neq & (~(ad <= atol)).numpy().ravel()
    out["changed"] = int(out["mask"].sum())
    for tol, k in zip((1e-8, 1e-7, 1e-6, 1e-5, 1e-4), ("changed_1e8", "changed_1e7", "changed_1e6", "changed_1e5", "changed_1e4")):
        out[k] = int((neq & (~(ad <= tol)).numpy().ravel()).sum())
    bf = base.double().numpy().ravel()
    tf = tuned.double().numpy().ravel()
    with np.errstate(over="ignore", invalid="ignore"):
        d64 = tf - bf
    ft = np.float64 if torch.float64 in (base.dtype, tuned.dtype) else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        bw, tw = bf.astype(ft), tf.astype(ft)
        rel_ok = np.abs(tw - bw) <= ft(eta) * np.maximum(np.abs(bw), np.abs(tw))
    out["changed_rel"] = int((neq & ~rel_ok).sum())
    fin = np.isfinite(bf) & np.isfinite(tf)
    out["nonfinite"] = int((neq & ~fin).sum())
    d64 = np.where(fin, d64, 0.0)
    out["max_abs_delta"] = float(np.abs(d64).max()) if d64.size else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        out["base_fro"] = float(np.sqrt((bf ** 2).sum()))
        out["delta_fro"] = float(np.sqrt((d64 ** 2).sum()))
    out["mean_abs_delta"] = float(np.abs(d64).sum() / bf.size) if bf.size else None
    if base.ndim >= 2:
        grid = out["mask"].reshape(-1, base.shape[-1])
        out["rows_touched"] = int(grid.any(axis=1).sum())
        out["cols_touched"] = int(grid.any(axis=0).sum())
    if base.ndim == 2:
        out["rank"] = int(torch.linalg.matrix_rank((tuned - base).float()))
    return out


def perturb(t: torch.Tensor, fraction: float, scale: float, seed: int) -> torch.Tensor:
    """A copy of ``t`` with a random ``fraction`` of entries moved by ``scale``·N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    out = t.clone()
    sel = torch.rand(t.shape, generator=g) < fraction
    noise = torch.randn(t.shape, generator=g) * scale
    out[sel] = (t.float()[sel] + noise[sel]).to(t.dtype)
    return out


# -- tolerance boundaries --------------------------------------------------------------------

LADDER = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
#: (significand bits, integer view) of the float dtypes the boundary builder handles
_FLOAT_BITS = {torch.bfloat16: (8, torch.int16), torch.float16: (11, torch.int16), torch.float32: (24, torch.int32),
               torch.float64: (53, torch.int64), torch.float8_e4m3fn: (4, torch.uint8),
               torch.float8_e5m2: (3, torch.uint8)}


def _bits_step(x: torch.Tensor, k: int) -> torch.Tensor:
    """The value ``k`` representable steps above a non-negative float scalar (by its bits)."""
    iv = _FLOAT_BITS[x.dtype][1]
    b = x.reshape(1).view(iv).to(torch.int64) + k
    return b.to(iv).view(x.dtype).reshape(())


def _exact(v: float, dtype: torch.dtype) -> bool:
    return float(torch.tensor(v, dtype=torch.float64).to(dtype).double()) == v


def boundary_pair(tuned_dtype: torch.dtype, tols, base_dtype: torch.dtype | None = None):
    """``(base, tuned)`` 1-D tensors whose differences sit on, and a hair either side of, the
    cut-off of every tolerance in ``tols`` as the paper's torch code draws it.

    For each tolerance ``t``: the tuned side takes ``dtype(t)``, the next representable value
    and the one before; the base side takes 0, half a step of the tuned dtype at ``t``, that
    half plus or minus its own last bit, a whole step, and the smallest float32 step at
    ``t`` — each only where the base dtype holds it exactly — in both orders and both signs.
    So for 16-bit pairs the exact Δ falls just under, on and just over the midpoint where
    rounding Δ to the dtype flips it across ``dtype(t)``; for every dtype some Δ equals
    ``dtype(t)`` exactly. Which of them are changed is for the reference (torch) to say.
    """
    base_dtype = base_dtype or tuned_dtype
    p = _FLOAT_BITS[base_dtype][0]
    a_vals: list[float] = []
    b_vals: set[float] = {0.0}
    for t in tols:
        target = torch.tensor(t, dtype=torch.float64).to(tuned_dtype)
        if float(target) <= 0:  # below the dtype's smallest step: Δ ≤ t only for Δ = 0
            target = _bits_step(torch.zeros((), dtype=tuned_dtype), 1)
        up, down = _bits_step(target, 1), _bits_step(target, -1)
        a_vals += [float(target), float(up), float(down)]
        half = (float(up) - float(target)) / 2
        f32_step = float(_bits_step(target.float(), 1)) - float(target.float())
        for b in (half, half * (1 + 2.0 ** (1 - p)), half * (1 - 2.0 ** -p), 2 * half, f32_step):
            if b > 0 and _exact(b, base_dtype):
                b_vals.add(b)
    base, tuned = [], []
    for a in a_vals:
        for b in sorted(b_vals):
            for s in (1.0, -1.0):
                base += [s * b, -s * b]  # Δ = a ∓ b ...
                tuned += [s * a, s * a]
    if base_dtype == tuned_dtype:  # ... and the same pairs the other way round
        base, tuned = base + tuned, tuned + base
    return (torch.tensor(base, dtype=torch.float64).to(base_dtype),
            torch.tensor(tuned, dtype=torch.float64).to(tuned_dtype))


# -- stores ------------------------------------------------------------------------------------


def clone_run(store, run_id: str, new_id: str, name: str | None = None) -> None:
    """A copy of a complete run under another id — every file's ``run_id`` rewritten, row groups
    kept, entered in the catalog: how a benchmark or a test grows a store to many runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydiff.records import CommitRecord, RunRecord, UnitRecord, from_table
    from raydiff.store import layout
    from raydiff.store.catalog import Catalog

    def renamed(t: pa.Table) -> pa.Table:
        t = t.set_column(t.schema.get_field_index("run_id"), t.schema.field("run_id"),
                         pa.array([new_id] * t.num_rows, pa.string()))
        if name is not None and "name" in t.column_names:
            t = t.set_column(t.schema.get_field_index("name"), t.schema.field("name"), pa.array([name] * t.num_rows))
        return t

    for rel in (layout.plan_file, layout.tensors_file, layout.spectra_file, layout.commit_file, layout.run_file):
        if store.exists(rel(run_id)):
            store.write_table(rel(new_id), renamed(pq.read_table(store.path(rel(run_id)), filesystem=store.fs)))
    src = pq.ParquetFile(store.path(layout.units_file(run_id)), filesystem=store.fs)
    with store.writer(layout.units_file(new_id), UnitRecord) as w:
        for g in range(src.num_row_groups):
            part = renamed(src.read_row_group(g))
            w.write_table(part, row_group_size=max(1, part.num_rows))
    catalog = Catalog(store)
    (run,) = from_table(store.read(layout.run_file(new_id), RunRecord), RunRecord)
    (commit,) = from_table(store.read(layout.commit_file(new_id), CommitRecord), CommitRecord)
    catalog.add_run(run)
    catalog.add_commit(commit)


def started_run(b, t, opts):
    """A run begun as ``submit`` begins it — resolved, planned, its record and plan in the
    store — and not run. Returns ``(store, plan, run record, plan records, run context)``."""
    import datetime as dt

    from raydiff.inputs.refs import resolve
    from raydiff.kernel.diff import Criteria
    from raydiff.plan import make_plan
    from raydiff.records import RunRecord
    from raydiff.run.execute import RunContext
    from raydiff.run.submit import plan_records, raydiff_version, run_id_for
    from raydiff.store import Store

    bc, tc = resolve(str(b)), resolve(str(t))
    plan = make_plan(bc, tc, opts.diff)
    run_id = run_id_for(bc, tc, opts)
    d = opts.diff
    record = RunRecord(run_id=run_id, name=opts.name or "t", base=bc.ref, base_revision=bc.revision,
                       base_fingerprint=bc.fingerprint, tuned=tc.ref, tuned_revision=tc.revision,
                       tuned_fingerprint=tc.fingerprint, created_at=dt.datetime.now(dt.timezone.utc),
                       raydiff_version=raydiff_version(), atol=d.atol, rel_eta=d.rel_eta, ladder=d.ladder,
                       rank_mode=d.rank, top_k=d.top_k, sketch_rank=d.sketch_rank, subspace_k=d.subspace_k,
                       hashed=d.hash,
                       chunk_elems=d.chunk_elems,
                       n_tensors=len(plan.tensors), n_units=len(plan.units), n_spectra=len(plan.spectra),
                       input_bytes=plan.input_bytes)
    store = Store(opts.store)
    planned = plan_records(run_id, plan)
    store.begin_run(record, planned)
    ctx = RunContext(run_id, store.root, Criteria(d.atol, d.rel_eta, d.ladder), d.rank, d.top_k, d.sketch_rank,
                     subspace_k=d.subspace_k)
    return store, plan, record, planned, ctx


def read_file(path: Path) -> tuple[dict, dict[str, tuple[str, tuple, bytes]]]:
    """``(metadata, {name: (dtype, shape, raw bytes)})`` of one safetensors file, parsed here
    (struct and json), not by raydiff."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    meta = head.pop("__metadata__", {})
    data = raw[8 + n:]
    return meta, {k: (v["dtype"], tuple(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]])
                  for k, v in head.items()}


def read_dir(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """:func:`read_file` of every ``.safetensors`` file of a folder, tensors merged."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(read_file(f)[1])
    return out


def itemsizes(folder: Path) -> dict[str, int]:
    """tensor name → bytes per element, from the tensors' stored bytes (:func:`read_dir`)."""
    return {k: len(raw) // max(1, int(np.prod(shape))) for k, (_, shape, raw) in read_dir(folder).items()}


def recording_progress():
    """A :class:`raydiff.run.submit.Progress` (the callbacks a display gets) that keeps what it
    is told: ``.plans`` (each ``Planned``) and ``.done`` (``(kind, key)`` of each ``Done``)."""
    from raydiff.run.submit import Progress

    class Recording(Progress):
        def __init__(self) -> None:
            self.plans: list = []
            self.done: list[tuple[str, int]] = []

        def planned(self, p) -> None:
            self.plans.append(p)

        def advanced(self, done) -> None:
            self.done.append((done.kind, done.key))

    return Recording()


def interrupted_run(b, t, opts, every: int = 2) -> tuple[str, int]:
    """A run cut short as a killed driver leaves it: started, and every ``every``-th unit
    done by the real actors (on the session's Ray cluster), then nothing — no commit.
    Returns ``(run id, units in its plan)``."""
    from raydiff.options import ClusterOptions
    from raydiff.run import actors

    store, plan, record, _, ctx = started_run(b, t, opts)
    actors.run_work(ctx, plan.units[::every], [], ClusterOptions())
    return record.run_id, len(plan.units)
