"""A ΔW holding NaN or ±Inf — a diverged run, an fp8 NaN code — does not stop a run: the counts
are as for any tensor, and that matrix's spectrum is recorded as not computed, with the reason,
in every rank mode and on the torch (GPU actor) path. An error nobody foresaw in an actor
becomes one line naming the run, the tensor and the unit.

The number of non-finite entries each note must name is counted here with torch on the
tensors the test wrote, the paper's way (Δ in the stored dtype; fp8 decoded to float32).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from typer.testing import CliRunner

from builders import ref_diff, started_run, write_checkpoint
from raydiff.run import actors
from raydiff.inputs.checkpoint import load_checkpoint
from raydiff.cli.main import app
from raydiff.errors import WorkFailed
from raydiff.run.execute import Executor, RunContext
from raydiff.kernel.diff import Criteria
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
from raydiff.plan import make_plan
from raydiff.store import Store
from raydiff.run.submit import submit
from raydiff.query.views import query

pytestmark = pytest.mark.usefixtures("ray_cluster")

NAN, INF = float("nan"), float("inf")
_COUNTS = ("numel", "changed", "changed_bits", "changed_1e8", "changed_1e7", "changed_1e6", "changed_1e5",
           "changed_1e4", "changed_rel", "nonfinite")


def _pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per dtype (bf16, fp32, fp8 E4M3): one NaN entry, a row of ±Inf (NaN codes for fp8, which
    has no Inf), every entry NaN, and a clean finite change."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for code, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32), ("fp8", torch.float8_e4m3fn)):
        base = (torch.randn(12, 10, generator=g) * 2).to(dtype)
        changed = (base.float() + torch.randn(12, 10, generator=g) * 0.5).to(dtype)
        for case in ("one", "row", "all", "clean"):
            t = changed.clone().float()
            if case == "one":
                t[3, 4] = NAN
            elif case == "row":
                t[7] = torch.tensor([INF, -INF] * 5) if dtype is not torch.float8_e4m3fn else NAN
            elif case == "all":
                t[:] = NAN
            out[f"{code}.{case}"] = (base.clone(), t.to(dtype))
    return out


def _delta(b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ΔW the paper's way: in the stored dtype (torch has no fp8 arithmetic: fp8 in float32)."""
    return (t.float() - b.float() if b.dtype == torch.float8_e4m3fn else t - b).float()


def _nonfinite_delta(b: torch.Tensor, t: torch.Tensor) -> int:
    return int((~torch.isfinite(_delta(b, t))).sum())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    pairs = _pairs()
    b = write_checkpoint(root / "base", {n: p[0] for n, p in pairs.items()}, shards=2)
    t = write_checkpoint(root / "tuned", {n: p[1] for n, p in pairs.items()}, shards=3)
    return root, b, t, pairs


def _check_run(store: str, run_id: str, pairs: dict, rank: str) -> None:
    cols, rows = query(store, "SELECT * FROM tensors WHERE run_id = ?", [run_id])
    got = {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}
    cols, rows = query(store, "SELECT tensor, method, rank, top_sv, fro, note FROM spectra WHERE run_id = ?", [run_id])
    spectra = {r[0]: dict(zip(cols, r)) for r in rows}
    assert set(got) == set(spectra) == set(pairs)
    skipped = 0
    for name, (b, t) in pairs.items():
        row, ref = got[name], ref_diff(b.reshape(-1), t.reshape(-1))
        assert {k: row[k] for k in _COUNTS} == {k: ref[k] for k in _COUNTS}, name
        bad = _nonfinite_delta(b, t)
        if name.endswith(".clean"):
            assert bad == 0 and spectra[name]["note"] is None and row["note"] == "", name
            s = torch.linalg.svdvals(_delta(b, t).double())
            assert row["top_sv"][:3] == pytest.approx(s[:3].tolist(), rel=1e-4), name
            assert row["rank_method"] == rank
            if rank == "exact":
                assert row["rank"] == int(torch.linalg.matrix_rank(_delta(b, t))), name
            continue
        skipped += 1
        what = f"ΔW has {bad} non-finite {'entry' if bad == 1 else 'entries'} (NaN or ±Inf)"
        assert bad >= 1 and spectra[name]["note"] == what, (name, spectra[name]["note"])
        assert (spectra[name]["method"], spectra[name]["rank"], spectra[name]["top_sv"], spectra[name]["fro"]) == (
            rank, None, None, None), name
        assert row["note"] == f"spectrum not computed: {what}", name
        assert (row["rank"], row["rank_method"], row["top_sv"], row["stable_rank"]) == (None, None, None, None), name
    _, rows = query(store, "SELECT status, n_spectra, n_spectra_skipped FROM runs WHERE run_id = ?", [run_id])
    assert rows == [("complete", len(pairs), skipped)] and skipped == 9


@pytest.mark.parametrize("rank", ["exact", "sketch"])
def test_a_non_finite_update_completes_with_its_spectrum_recorded_as_not_computed(pair, tmp_path, rank):
    _, b, t, pairs = pair
    store = str(tmp_path / "store")
    r = CliRunner().invoke(app, ["submit", str(b), str(t), "--store", store, "--rank", rank])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    summary = r.stderr.splitlines()[0]
    assert re.search(r": complete; .*; 9 of 12 spectra not computed \(ΔW not finite: see the note column of "
                     r"tensors\)$", summary), summary
    _check_run(store, r.stdout.strip().splitlines()[-1], pairs, rank)


def test_the_torch_kernel_path_records_the_same(pair, tmp_path):
    """What a GPU actor runs — the torch element kernel and the spectra on the actor's torch
    device — here on ``device="cpu"``, unit by unit through the executor, then committed."""
    _, b, t, pairs = pair
    opts = SubmitOptions(store=str(tmp_path / "store"), diff=DiffOptions(chunk_elems=1024))
    store, plan, record, planned, ctx = started_run(b, t, opts)
    ex = Executor(ctx, device="cpu", torch_kernel=True)
    for u in plan.units:
        ex.unit(u)
    for s in plan.spectra:
        ex.spectrum(s)
    store.commit(record, planned)
    _check_run(store.root, record.run_id, pairs, "exact")


def test_an_unforeseen_error_in_an_actor_is_one_line_naming_the_run_tensor_and_unit(pair, tmp_path):
    """A unit the kernel cannot take (a row length that does not divide it: a planner bug) fails
    in a real actor; the driver gets one line, and the actor's traceback as its detail."""
    _, b, t, _ = pair
    store = Store(str(tmp_path / "store"))
    res = submit(str(b), str(t), SubmitOptions(store=store.root, diff=DiffOptions(rank="off")))
    plan = make_plan(load_checkpoint(b), load_checkpoint(t), DiffOptions(rank="off"))
    unit = next(u for u in plan.units if u.tensor == "bf16.row")
    bad = dataclasses.replace(unit, row_len=unit.row_len + 1)
    ctx = RunContext(res.run_id, store.root, Criteria(), "off", 32, 128)
    with pytest.raises(WorkFailed) as e:
        actors.run_work(ctx, [bad], [], ClusterOptions(workers=1))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"run {res.run_id}: unit {bad.unit_id} (elements 0…{bad.stop - 1}) of tensor 'bf16.row' "
                          "failed on ")
    assert "ValueError: unit of 120 elements does not cover whole rows of 11" in msg
    assert msg.endswith("Submitting again resumes the run")
    assert "Traceback" in e.value.detail and "diff_unit" in e.value.detail
