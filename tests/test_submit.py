"""End to end: real safetensors files → real Ray actors → real Parquet → real DuckDB.

Every count is checked against torch/numpy on the same arrays (tests/builders.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from builders import SUM_REL, interrupted_run, itemsizes, perturb, recording_progress, ref_diff, write_checkpoint
from raydiff.cli.main import app
from raydiff.kernel.masks import decode_mask
from raydiff.inputs.refs import Identity
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
from raydiff.run.submit import run_id_for, submit
from raydiff.query.views import query

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _pair(tmp_path, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "model.embed_tokens.weight": torch.randn(97, 48, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 48, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(130, 48, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.ones(48).bfloat16(),
        "model.layers.0.conv.weight": torch.randn(5, 7, 9, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(48, generator=g),  # fp32 on both sides
        "lm_head.weight": torch.randn(97, 48, generator=g).bfloat16(),  # fp32 in tuned
        "model.layers.0.mlp.down_proj.weight": torch.randn(48, 130, generator=g).bfloat16(),  # shape differs
        "only.in.base": torch.randn(6, generator=g),
    }
    tuned = {
        "model.embed_tokens.weight": perturb(base["model.embed_tokens.weight"], 0.05, 1e-2, 1),
        "model.layers.0.self_attn.q_proj.weight": perturb(base["model.layers.0.self_attn.q_proj.weight"], 0.3, 3e-3, 2),
        "model.layers.0.mlp.up_proj.weight": perturb(base["model.layers.0.mlp.up_proj.weight"], 0.5, 1e-5, 3),
        "model.layers.0.input_layernorm.weight": base["model.layers.0.input_layernorm.weight"].clone(),
        "model.layers.0.conv.weight": perturb(base["model.layers.0.conv.weight"], 0.2, 1e-1, 4),
        "model.norm.weight": perturb(base["model.norm.weight"], 0.5, 1e-6, 5),
        "lm_head.weight": perturb(base["lm_head.weight"].float(), 0.1, 1e-4, 6),
        "model.layers.0.mlp.down_proj.weight": torch.randn(48, 131, generator=g).bfloat16(),
        "only.in.tuned": torch.randn(2, 3, generator=g).bfloat16(),
    }
    b = write_checkpoint(tmp_path / "base", base, shards=3)
    t = write_checkpoint(tmp_path / "tuned", tuned, shards=[["lm_head.weight", "model.norm.weight"],
                                                            sorted(set(tuned) - {"lm_head.weight", "model.norm.weight"})])
    return b, t, base, tuned


def _opts(tmp_path, **diff):
    return SubmitOptions(store=str(tmp_path / "store"), diff=DiffOptions(**diff))


def _tensors(store, run_id):
    cols, rows = query(store, f"SELECT * FROM tensors WHERE run_id = '{run_id}' ORDER BY tensor")
    return {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}


def _masks(store, run_id):
    cols, rows = query(store, f"SELECT tensor, start, stop, mask_codec, mask FROM masks "
                              f"WHERE run_id = '{run_id}' ORDER BY tensor, start")
    out: dict[str, list[np.ndarray]] = {}
    for tensor, start, stop, codec, payload in rows:
        out.setdefault(tensor, []).append(decode_mask(codec, payload, stop - start))
    return {k: np.concatenate(v) for k, v in out.items()}


def test_counts_match_numpy_and_torch(tmp_path):
    b, t, base, tuned = _pair(tmp_path)
    res = submit(str(b), str(t), _opts(tmp_path, chunk_elems=1024))
    got = _tensors(str(tmp_path / "store"), res.run_id)
    masks = _masks(str(tmp_path / "store"), res.run_id)
    assert set(got) == set(base) | set(tuned)
    assert got["only.in.base"]["status"] == "only_in_base"
    assert got["only.in.tuned"]["status"] == "only_in_tuned"
    assert got["model.layers.0.mlp.down_proj.weight"]["status"] == "shape_mismatch"
    assert "[48, 130] in base, [48, 131] in tuned" in got["model.layers.0.mlp.down_proj.weight"]["note"]
    assert got["lm_head.weight"]["compare_dtype"] == "F32"
    total_numel = total_changed = 0
    for name in sorted(set(base) & set(tuned)):
        if base[name].shape != tuned[name].shape:
            continue
        ref = ref_diff(base[name], tuned[name])
        row = got[name]
        assert row["status"] == "ok", name
        for k in ("numel", "changed", "changed_bits", "changed_1e8", "changed_1e7", "changed_1e6",
                  "changed_1e5", "changed_1e4", "changed_rel"):
            assert row[k] == ref[k], (name, k, row[k], ref[k])
        assert row["sparsity"] == pytest.approx(1 - ref["changed"] / ref["numel"])
        for k in ("max_abs_delta", "delta_fro", "base_fro", "mean_abs_delta"):
            assert row[k] == pytest.approx(ref[k], rel=SUM_REL, abs=1e-12), (name, k)
        np.testing.assert_array_equal(masks[name], ref["mask"], err_msg=name)
        if base[name].ndim >= 2:
            assert (row["rows_touched"], row["cols_touched"]) == (ref["rows_touched"], ref["cols_touched"]), name
        if base[name].ndim == 2:
            assert row["rank"] == ref["rank"], name
            assert row["max_rank"] == min(base[name].shape)
            assert row["rank_method"] == "exact"
        else:
            assert row["rank"] is None
        total_numel += ref["numel"]
        total_changed += ref["changed"]
    # some tensors span several units at this chunk size
    cols, rows = query(str(tmp_path / "store"), f"SELECT count(*) FROM units WHERE run_id = '{res.run_id}' "
                                                "AND tensor = 'model.layers.0.mlp.up_proj.weight'")
    assert rows[0][0] > 1
    cols, rows = query(str(tmp_path / "store"), f"SELECT status, numel, changed, sparsity, base, tuned FROM runs "
                                                f"WHERE run_id = '{res.run_id}'")
    assert rows == [("complete", total_numel, total_changed, pytest.approx(1 - total_changed / total_numel),
                     str(b), str(t))]


def test_identical_checkpoints_have_no_changes(tmp_path):
    b, _, base, _ = _pair(tmp_path)
    res = submit(str(b), str(b), _opts(tmp_path, rank="off"))
    assert res.commit.changed == 0 and res.commit.changed_bits == 0
    got = _tensors(str(tmp_path / "store"), res.run_id)
    assert all(r["sparsity"] == 1.0 for r in got.values() if r["numel"])
    assert all(r["rank"] is None for r in got.values())


def _comparable(rows):
    drop = {"run_id"}
    return {k: {c: v for c, v in r.items() if c not in drop} for k, r in rows.items()}


@pytest.mark.parametrize(("chunk", "workers"), [(1024, 1), (1500, 2), (4096, 2), (1 << 20, 1)])
def test_results_do_not_depend_on_chunking_or_workers(tmp_path, chunk, workers):
    b, t, _, _ = _pair(tmp_path)
    ref_run = submit(str(b), str(t), _opts(tmp_path, chunk_elems=1 << 24))
    opts = dataclasses.replace(_opts(tmp_path, chunk_elems=chunk), cluster=ClusterOptions(workers=workers))
    run = submit(str(b), str(t), opts)
    assert run.run_id != ref_run.run_id
    store = str(tmp_path / "store")
    assert _comparable(_tensors(store, run.run_id)) == _comparable(_tensors(store, ref_run.run_id))
    m1, m2 = _masks(store, run.run_id), _masks(store, ref_run.run_id)
    assert m1.keys() == m2.keys()
    for k in m1:
        np.testing.assert_array_equal(m1[k], m2[k])


def test_resubmit_resumes_and_never_duplicates(tmp_path):
    b, t, _, _ = _pair(tmp_path)
    opts = _opts(tmp_path, chunk_elems=1024)
    reference = submit(str(b), str(t), _opts(tmp_path / "ref", chunk_elems=1024))
    expected = _tensors(str(tmp_path / "ref" / "store"), reference.run_id)
    run_id, n_units = interrupted_run(b, t, opts)
    assert run_id == reference.run_id
    store = str(tmp_path / "store")
    cols, rows = query(store, "SELECT status FROM runs WHERE run_id = ?", [run_id])
    assert rows == [("incomplete",)]
    assert _tensors(store, run_id) == {}  # incomplete runs expose no results
    # what the interrupted run wrote, read from its unit files (plain Parquet)
    kept = {r["unit_id"]: r["finished_at"] for f in (tmp_path / "store" / "runs" / run_id / "units").iterdir()
            for r in pq.read_table(f, columns=["unit_id", "finished_at"]).to_pylist()}
    assert len(kept) == len(range(0, n_units, 2)) > 1
    assert query(store, "SELECT units_done, n_units FROM progress WHERE run_id = ?", [run_id])[1] == [
        (len(kept), n_units)]
    progress = recording_progress()
    resumed = submit(str(b), str(t), opts, progress)
    assert resumed.resumed and not resumed.already_complete and resumed.run_id == run_id
    assert _tensors(store, run_id) == expected
    # the progress display is told what is left: the missing units, their bytes (from the
    # files' own headers) and every spectrum (the interrupted run decomposed none)
    isb, ist = itemsizes(b), itemsizes(t)
    nbytes = {u: (stop - start) * (isb[n] + ist[n]) for u, n, start, stop in query(
        store, "SELECT unit_id, tensor, start, stop FROM units WHERE run_id = ?", [run_id])[1]}
    spectra = query(store, "SELECT count(*) FROM spectra WHERE run_id = ?", [run_id])[1][0][0]
    (told,) = progress.plans
    assert (told.units_total, told.units_todo) == (n_units, n_units - len(kept))
    assert (told.bytes_total, told.bytes_todo) == (sum(nbytes.values()),
                                                   sum(v for u, v in nbytes.items() if u not in kept))
    assert (told.spectra_total, told.spectra_todo) == (spectra, spectra) and spectra > 0
    assert sorted(k for kind, k in progress.done if kind == "unit") == sorted(set(nbytes) - set(kept))
    assert sum(kind == "spectrum" for kind, _ in progress.done) == spectra
    # the units that were in the store were not computed again: same write time, and only
    # the missing ones are new
    after = dict(query(store, "SELECT unit_id, finished_at FROM units WHERE run_id = ?", [run_id])[1])
    assert {u: after[u] for u in kept} == kept
    assert all(after[u] > max(kept.values()) for u in set(after) - set(kept)) and len(after) == n_units
    cols, rows = query(store, "SELECT count(*), count(DISTINCT run_id) FROM runs")
    assert rows == [(1, 1)]
    again = submit(str(b), str(t), opts)
    assert again.already_complete and not again.resumed and again.run_id == run_id
    assert _tensors(store, run_id) == expected


def test_run_ids_of_a_pair_and_its_options_are_pinned():
    """A store's runs resume with a later raydiff only if the same pair and options give the
    same id. These are the ids this version gives: change them only with ``RESULTS_VERSION``,
    whose bump is meant to start every run over."""
    b = Identity("org/base", "0123456789abcdef0123456789abcdef01234567", "size:1000")
    t = Identity("/data/tuned", None, "sha256:" + "ab" * 32)
    default = "7b3c59c62594beeeda74"
    assert run_id_for(b, t, SubmitOptions(diff=DiffOptions())) == default
    # what only changes how a run executes or where it is stored is not in the id
    assert run_id_for(b, t, SubmitOptions(store="/elsewhere", name="x", strict=True, diff=DiffOptions(),
                                          cluster=ClusterOptions(backend="local", workers=1))) == default
    # each result-changing option is; the ladder, subspace_k and hash only when not at their
    # defaults (left out then, so runs from before they existed keep their ids: the default's
    # literal above)
    assert [run_id_for(b, t, SubmitOptions(diff=d)) for d in (
        DiffOptions(atol=1e-6), DiffOptions(hash=True), DiffOptions(rename=(("a.", "b."),)),
        DiffOptions(subspace_k=8), DiffOptions(ladder=(1e-6,)))] == [
        "c067980b753a8b66f4b8", "8f6eae227b2d266f5d0c", "9a9959258f591d155e68", "247aaa6d4f845cdaa797",
        "9d0137838a9b98b09dc1"]
    assert run_id_for(t, b, SubmitOptions()) != default  # the sides are not interchangeable


def test_cli_submit_sql_runs(tmp_path):
    b, t, _, _ = _pair(tmp_path)
    store = str(tmp_path / "store")
    runner = CliRunner()
    r = runner.invoke(app, ["submit", str(b), str(t), "--store", store, "--name", "pair", "--rank", "sketch"])
    assert r.exit_code == 0, r.output
    run_id = r.stdout.strip().splitlines()[-1]
    r = runner.invoke(app, ["sql", "SELECT name, status, changed FROM runs", "--store", store, "--format", "json"])
    rows = json.loads(r.stdout)
    assert rows[0]["name"] == "pair" and rows[0]["status"] == "complete"
    r = runner.invoke(app, ["sql", "SELECT tensor, rank_method, rank FROM tensors WHERE rank_method IS NOT NULL "
                                   "ORDER BY tensor", "--store", store, "--format", "csv"])
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "tensor,rank_method,rank"
    assert all(line.endswith(",sketch,") for line in lines[1:]) and len(lines) > 2
    r = runner.invoke(app, ["runs", "--store", store])
    assert run_id in r.stdout and "complete" in r.stdout


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["submit", str(tmp_path / "nope"), str(tmp_path / "nope2"), "--store", str(tmp_path / "s")])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: '{tmp_path / 'nope'}': no such file or directory, and not a Hub id of the form org/name[@revision]"]
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["submit", "a", "b", "--atol", "-1"])
    assert r.exit_code == 1 and r.stderr.strip() == "Error: --atol must be a finite number >= 0, got -1.0"
    r = runner.invoke(app, ["sql", "SELECT nope FROM runs", "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: Binder Error") and "nope" in r.stderr


def test_sql_is_read_only(tmp_path):
    b, t, _, _ = _pair(tmp_path)
    store = tmp_path / "store"
    submit(str(b), str(t), _opts(tmp_path, rank="off"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    runner = CliRunner()
    for stmt in (f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'",
                 f"SELECT * FROM read_parquet('{store}/runs/*/run.parquet')",
                 "SET enable_external_access = true"):
        r = runner.invoke(app, ["sql", stmt, "--store", str(store)])
        assert r.exit_code == 1 and r.stderr.startswith("Error: "), (stmt, r.output)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_user_atol_and_rel_eta_are_used_end_to_end_and_make_another_run(tmp_path):
    """`--atol` and `--rel-eta` change the counts (checked against torch at those values), the
    masks and the run's identity: resubmitting with one of them changed is a new run, never the
    old one returned as complete."""
    b, t, base, tuned = _pair(tmp_path)
    store = str(tmp_path / "store")
    runner = CliRunner()

    def cli(*extra):
        r = runner.invoke(app, ["submit", str(b), str(t), "--store", store, "--rank", "off",
                                *extra])
        assert r.exit_code == 0, r.output
        return r.stdout.strip().splitlines()[-1], r.stderr

    default_id, _ = cli()
    atol_id, err = cli("--atol", "1e-3")
    assert atol_id != default_id and "already complete" not in err
    both_id, err = cli("--atol", "1e-3", "--rel-eta", "0.05")
    assert both_id not in (default_id, atol_id) and "already complete" not in err
    assert cli("--rel-eta", "0.05", "--atol", "0.001")[0] == both_id  # same options, same run
    _, rows = query(store, "SELECT run_id, atol, rel_eta FROM runs ORDER BY atol, rel_eta")
    assert sorted(rows) == sorted([(default_id, 1e-5, 1e-3), (atol_id, 1e-3, 1e-3), (both_id, 1e-3, 0.05)])
    got = _tensors(store, both_id)
    masks = _masks(store, both_id)
    checked = 0
    for name in sorted(set(base) & set(tuned)):
        if base[name].shape != tuned[name].shape:
            continue
        ref = ref_diff(base[name], tuned[name], atol=1e-3, eta=0.05)
        default = ref_diff(base[name], tuned[name])
        for k in ("changed", "changed_bits", "changed_rel", "changed_1e5"):
            assert got[name][k] == ref[k], (name, k)
        np.testing.assert_array_equal(masks[name], ref["mask"], err_msg=name)
        checked += (ref["changed"], ref["changed_rel"]) != (default["changed"], default["changed_rel"])
    assert checked >= 3  # the options really change the counts of most tensors


def test_a_ladder_step_is_one_definition_away(tmp_path):
    """The ladder is one tuple (raydiff.options.ATOL_LADDER): a run counted under a longer one
    stores the extra step, and views built for that ladder grow its columns — changed_1e3,
    sparsity_1e3, layers' sparsity_1e3_weighted and a sparsity_by_tolerance row — whose
    counts are torch's; views built for the default ladder leave it out."""
    from raydiff.options import ATOL_LADDER
    from raydiff.query.views import connect

    b, t, base, tuned = _pair(tmp_path)
    longer = ATOL_LADDER + (1e-3,)
    store = str(tmp_path / "store")
    run = submit(str(b), str(t), SubmitOptions(store=store, diff=DiffOptions(ladder=longer, rank="off")))
    default = submit(str(b), str(t), SubmitOptions(store=store, diff=DiffOptions(rank="off")))
    assert run.run_id != default.run_id and run.run.ladder == longer
    con = connect(store, ladder=longer)
    rows = con.execute("SELECT tensor, changed_1e4, changed_1e3, sparsity_1e3, numel FROM tensors "
                       "WHERE run_id = ? AND status = 'ok'", [run.run_id]).fetchall()
    assert rows
    total = 0
    for tensor, c4, c3, s3, numel in rows:
        ref = ref_diff(base[tensor], tuned[tensor], atol=1e-3)
        assert (c4, c3) == (ref_diff(base[tensor], tuned[tensor])["changed_1e4"], ref["changed"]), tensor
        assert s3 == pytest.approx(1 - c3 / numel) if numel else s3 is None
        total += c3
    assert con.execute("SELECT changed FROM sparsity_by_tolerance WHERE run_id = ? AND criterion = 'atol=0.001'",
                       [run.run_id]).fetchall() == [(total,)]
    assert "sparsity_1e3_weighted" in [c for (c, *_r) in con.execute("DESCRIBE layers").fetchall()]
    # the default run has no such step: NULL, not a wrong number
    assert {r[0] for r in con.execute("SELECT changed_1e3 FROM tensors WHERE run_id = ?",
                                      [default.run_id]).fetchall()} == {None}
    cols = [c for (c, *_r) in connect(store).execute("DESCRIBE tensors").fetchall()]
    assert "changed_1e4" in cols and "changed_1e3" not in cols
