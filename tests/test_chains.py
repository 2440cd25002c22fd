"""Chains of checkpoints: planted training runs, every column of the chain views against numpy.

The chain's checkpoints are written by the test with entries of known roles — moved and
moved back to the base value (cancelled), drifting by one unit in the last place per step
(|Δ| ≈ 1e-10 … 1e-7, far below any tolerance), changed at random, swapped +0 → −0, never
touched — and every count is recomputed with numpy from the arrays the test wrote (values
compared as float64, exact for bf16 and f32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from builders import write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import ChainConflict, InvalidOption, QueryError
from raydiff.options import DiffOptions, SubmitOptions
from raydiff.query.views import query
from raydiff.run.chain import extend_chain, submit_chain

pytestmark = pytest.mark.usefixtures("ray_cluster")

SPECS = {"model.layers.0.mlp.up_proj.weight": ((70, 33), torch.bfloat16),
         "model.layers.1.self_attn.q_proj.weight": ((40, 40), torch.float32),
         "model.norm.weight": ((2500,), torch.bfloat16),
         "model.embed_tokens.weight": ((9, 16), torch.float32)}
MODULES = {"model.layers.0.mlp.up_proj.weight": (0, "up"), "model.layers.1.self_attn.q_proj.weight": (1, "q"),
           "model.norm.weight": (None, "norm"), "model.embed_tokens.weight": (None, "embed")}
CHUNK = 1024  # every tensor but the smallest spans several units
UNTOUCHED, DRIFT, CANCEL, RANDOM, ZERO = range(5)
STEPS = 4  # checkpoints written; the chain is submitted with the first 3, then grown to 4
_INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _options(store):
    return SubmitOptions(store=store, diff=DiffOptions(chunk_elems=CHUNK, rank="off"))


def _build(root):
    """Base C0 and checkpoints C1 … C4; returns ``{tensor: [C0 … C4 as float64 arrays]}``
    and the entries' roles."""
    g = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(5)
    roles, chain = {}, {}
    for k, (shape, dtype) in SPECS.items():
        role = rng.choice(5, size=shape, p=[0.35, 0.15, 0.15, 0.3, 0.05])
        w = torch.randn(shape, generator=g)
        w[torch.from_numpy(role == DRIFT)] *= 1e-5  # small values: one ulp is ≲ 1e-7 even in bf16
        w[torch.from_numpy(role == ZERO)] = 0.0
        versions = [w.to(dtype)]
        for t in range(1, STEPS + 1):
            c = versions[-1].clone()
            drift = torch.from_numpy(role == DRIFT)
            bits = c.view(_INT[dtype])
            bits[drift] += 1  # one unit in the last place: a change no tolerance sees
            cancel = torch.from_numpy(role == CANCEL)
            if t == 1:
                c[cancel] = (c[cancel].float() + 1.0).to(dtype)
            elif t == 2:
                c[cancel] = versions[0][cancel]  # back to the base value, bit for bit
            rand = role == RANDOM
            moved = torch.from_numpy(rand & (rng.random(shape) < 0.3))
            back = torch.from_numpy(rand & (rng.random(shape) < 0.2))
            c[moved] = (c[moved].float() + torch.randn(shape, generator=g)[moved] * 0.5).to(dtype)
            c[back & ~moved] = versions[0][back & ~moved]
            if t == 1:
                c[torch.from_numpy(role == ZERO)] = -0.0  # bits differ, values equal
            versions.append(c)
        roles[k] = role.ravel()
        chain[k] = versions
    for t, name in enumerate(["base"] + [f"c{i}" for i in range(1, STEPS + 1)]):
        write_checkpoint(root / name, {k: v[t] for k, v in chain.items()}, shards=2 if t == 0 else 1)
    values = {k: [v.double().numpy().ravel() for v in vs] for k, vs in chain.items()}
    return values, roles


def _expected(values, steps, tensors=None):
    """Per step t = 1 … steps, numpy's counts over ``tensors`` (default all)."""
    rows = []
    names = tensors or sorted(values)
    ever = {k: np.zeros_like(values[k][0], bool) for k in names}
    for t in range(1, steps + 1):
        row = dict(step=t, numel=0, changed_vs_base=0, changed_since_prev=0, changed_ever=0, cancelled=0)
        for k in names:
            c0, prev, now = values[k][0], values[k][t - 1], values[k][t]
            vs_base, step = c0 != now, prev != now  # value comparison: +0 == -0
            ever[k] |= step
            row["numel"] += c0.size
            row["changed_vs_base"] += int(vs_base.sum())
            row["changed_since_prev"] += int(step.sum())
            row["changed_ever"] += int(ever[k].sum())
            row["cancelled"] += int((ever[k] & ~vs_base).sum())
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    values, roles = _build(root)
    store = str(root / "store")
    first = submit_chain(str(root / "base"), [str(root / f"c{i}") for i in (1, 2, 3)], "run1", _options(store))
    return root, store, values, roles, first


STEP_COLS = ("step", "numel", "changed_vs_base", "changed_since_prev", "changed_ever", "cancelled")


def test_chain_steps_match_numpy(planted):
    root, store, values, roles, first = planted
    assert [(r.step, r.kind) for r in first.runs] == [(1, "vs_base"), (2, "vs_base"), (2, "vs_prev"), (3, "vs_base"),
                                                      (3, "vs_prev")]
    assert first.recorded == 3 and all(not r.result.already_complete for r in first.runs)
    assert all(r.result.run.atol == 0 for r in first.runs)
    cols, rows = query(store, "SELECT * FROM chain_steps('run1')")
    got = [dict(zip(cols, r)) for r in rows]
    assert [{c: g[c] for c in STEP_COLS} for g in got] == _expected(values, 3)
    assert [g["tuned"] for g in got] == [str(root / f"c{i}") for i in (1, 2, 3)]
    ids = {(r.step, r.kind): r.result.run_id for r in first.runs}
    assert [(g["run_vs_base"], g["run_vs_prev"]) for g in got] == [
        (ids[(1, "vs_base")], ids[(1, "vs_base")]), (ids[(2, "vs_base")], ids[(2, "vs_prev")]),
        (ids[(3, "vs_base")], ids[(3, "vs_prev")])]
    # the planted roles show up as they should: the drift is counted in every step although
    # each of its changes is far below any tolerance; the moved-and-back entries are cancelled
    n_drift = sum(int((r == DRIFT).sum()) for r in roles.values())
    drift_delta = max(float(np.abs(values[k][t] - values[k][t - 1])[roles[k] == DRIFT].max())
                      for k in values for t in (1, 2, 3))
    assert n_drift > 500 and drift_delta < 1e-6
    assert all(g["changed_since_prev"] >= n_drift for g in got)
    n_cancel = sum(int((r == CANCEL).sum()) for r in roles.values())
    assert got[0]["cancelled"] < got[1]["cancelled"] and got[1]["cancelled"] >= n_cancel
    # the tolerance ladder of a step's run sees none of the drift: at 1e-5 the step is sparser
    _, (ladder,) = query(store, "SELECT sum(changed), sum(changed_1e5) FROM tensors WHERE run_id = ?",
                         [ids[(2, "vs_prev")]])
    assert ladder[0] - ladder[1] >= n_drift
    # a +0 → -0 swap changes bits, not values: counted in changed_bits only
    n_zero = sum(int((r == ZERO).sum()) for r in roles.values())
    _, (bits,) = query(store, "SELECT changed_bits - changed FROM runs WHERE run_id = ?", [ids[(1, "vs_base")]])
    assert bits[0] == n_zero > 0


def test_chain_summary_matches_numpy(planted):
    _, store, values, _, _ = planted
    cols, rows = query(store, "SELECT * FROM chain_summary('run1')")
    assert cols == ["layer", "module", "numel", "never_updated", "cancelled", "subnetwork"]
    got = {(r[0], r[1]): r[2:] for r in rows}
    groups = {None: sorted(values), **{MODULES[k]: [k] for k in values}}
    assert rows[0][:2] == (None, None) and set(got) == {(None, None), *MODULES.values()}
    for key, tensors in groups.items():
        e = _expected(values, 3, tensors)[-1]
        n = e["numel"]
        want = (n, 1 - e["changed_ever"] / n, e["cancelled"] / n, e["changed_vs_base"] / n)
        assert got[key if key is not None else (None, None)] == pytest.approx(want, rel=1e-12), key
        assert sum(got[key if key is not None else (None, None)][1:]) == pytest.approx(1.0)
    _, chains = query(store, "SELECT chain, step, n_steps FROM chains")
    assert chains == [("run1", 1, 3), ("run1", 2, 3), ("run1", 3, 3)]


def test_resubmitting_reuses_every_run_and_growing_the_chain_runs_only_the_new_step(planted):
    root, store, values, _, first = planted
    ckpts = [str(root / f"c{i}") for i in range(1, STEPS + 1)]
    _, before = query(store, "SELECT count(*) FROM runs")
    again = submit_chain(str(root / "base"), ckpts[:3], "run1", _options(store))
    assert [r.result.run_id for r in again.runs] == [r.result.run_id for r in first.runs]
    assert all(r.result.already_complete for r in again.runs) and again.recorded == 0
    assert again.steps == first.steps
    assert query(store, "SELECT count(*) FROM runs")[1] == before
    # a prefix of the chain changes nothing either
    assert submit_chain(str(root / "base"), ckpts[:1], "run1", _options(store)).recorded == 0
    grown = submit_chain(str(root / "base"), ckpts, "run1", _options(store))
    assert [r.result.already_complete for r in grown.runs] == [True] * 5 + [False, False]
    assert (grown.recorded, len(grown.steps)) == (1, 4)
    cols, rows = query(store, "SELECT * FROM chain_steps('run1')")
    assert [{c: r[cols.index(c)] for c in STEP_COLS} for r in rows] == _expected(values, 4)
    # extending by the last checkpoint again adds nothing
    assert extend_chain(str(root / "base"), ckpts[-1], "run1", _options(store)).runs == ()


def test_extend_chain_builds_the_same_chain_one_checkpoint_at_a_time(planted):
    root, store, values, _, _ = planted
    for i in (1, 2):
        r = extend_chain(str(root / "base"), str(root / f"c{i}"), "one-by-one", _options(store))
        assert r.recorded == 1 and all(x.result.already_complete for x in r.runs)  # run1's runs
    cols, rows = query(store, "SELECT * FROM chain_steps('one-by-one')")
    assert [{c: r[cols.index(c)] for c in STEP_COLS} for r in rows] == _expected(values, 2)


def test_a_chain_given_with_other_checkpoints_or_base_is_refused(planted):
    root, store, _, _, _ = planted
    with pytest.raises(ChainConflict, match=r"chain 'run1' has .*c1 at step 1, not .*c2"):
        submit_chain(str(root / "base"), [str(root / "c2")], "run1", _options(store))
    with pytest.raises(ChainConflict, match=r"chain 'run1' is over the base .*base, not .*c1"):
        submit_chain(str(root / "c1"), [str(root / "c2")], "run1", _options(store))
    with pytest.raises(InvalidOption, match="chain must be a name"):
        submit_chain(str(root / "base"), [str(root / "c1")], "bad\nname", _options(store))
    with pytest.raises(QueryError, match="no chain named 'nope'; the chains view lists them"):
        query(store, "SELECT * FROM chain_steps('nope')")


def test_cli_submit_chain(planted):
    root, store, values, _, _ = planted
    runner = CliRunner()
    base, c1, c2 = str(root / "base"), str(root / "c1"), str(root / "c2")
    r = runner.invoke(app, ["submit", base, c1, c2, "--store", store])
    assert r.exit_code == 1 and r.output.startswith("Error: 2 TUNED checkpoints given") and "Traceback" not in r.output
    r = runner.invoke(app, ["submit", base, c1, "--chain", "x", "--atol", "1e-5", "--store", store])
    assert r.exit_code == 1 and "Error: --chain counts every change (atol 0)" in r.output
    r = runner.invoke(app, ["submit", base, c1, "--chain", "x", "--name", "n", "--store", store])
    assert r.exit_code == 1 and "drop --name" in r.output
    r = runner.invoke(app, ["submit", base, c2, "--chain", "run1", "--store", store])
    assert r.exit_code == 1 and r.output.startswith("Error: chain 'run1' has ") and "Traceback" not in r.output
    r = runner.invoke(app, ["sql", "SELECT * FROM chain_summary('nope')", "--store", store])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert "no chain named 'nope'; the chains view lists them" in r.output
    # one TUNED with --chain: a chain of one step (its run is run1's first, reused)
    r = runner.invoke(app, ["submit", base, c1, "--chain", "solo", "--store", store, "--chunk-elems", str(CHUNK),
                            "--rank", "off"])
    assert r.exit_code == 0, r.output
    assert "step 1 vs base): already complete" in r.output
    assert "chain solo: 1 steps; 0 runs computed, 1 reused, 1 steps newly recorded" in r.output
    cols, rows = query(store, "SELECT * FROM chain_steps('solo')")
    assert [{c: x[cols.index(c)] for c in STEP_COLS} for x in rows] == _expected(values, 1)


def test_a_report_of_runs_that_show_a_chain_draws_it(planted, tmp_path):
    from raydiff.query.report import write_report

    _, store, _, _, first = planted
    write_report(store, [first.runs[-1].result.run_id], tmp_path / "rep")
    pngs = {p.name for p in (tmp_path / "rep").iterdir() if p.suffix == ".png"}
    assert "chain.png" in pngs and "overlap.png" not in pngs
    assert "Chain run1:" in (tmp_path / "rep" / "report.html").read_text()
