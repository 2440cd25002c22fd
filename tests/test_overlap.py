"""Planted change sets: overlap, Jaccard, baselines, consensus and layers against numpy."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from builders import write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import QueryError
from raydiff.options import DiffOptions, SubmitOptions
from raydiff.query.report import write_report
from raydiff.run.submit import submit
from raydiff.query.views import query

pytestmark = pytest.mark.usefixtures("ray_cluster")

SHAPES = {"model.layers.0.mlp.up_proj.weight": (70, 33), "model.layers.1.self_attn.q_proj.weight": (40, 40),
          "model.norm.weight": (2500,), "model.embed_tokens.weight": (9, 16)}
CHUNK = 1024  # every tensor but the smallest spans several units; 2-D units end on row boundaries


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    g = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in SHAPES.items()}
    write_checkpoint(root / "base", base, shards=2)
    masks: dict[str, dict[str, np.ndarray]] = {}
    shared = {k: rng.random(s) < 0.25 for k, s in SHAPES.items()}  # correlated runs: a common core
    # c is sparse enough (≈ 4.5 %) for its masks to be stored as gaps, a and b as packed bits
    for run, density, share in (("a", 0.1, 0.5), ("b", 0.3, 0.5), ("c", 0.02, 0.1)):
        tuned, masks[run] = {}, {}
        for k, s in SHAPES.items():
            m = (rng.random(s) < density) | (shared[k] & (rng.random(s) < share))
            masks[run][k] = m.ravel()
            t = base[k].clone()
            t[torch.from_numpy(m)] = (t[torch.from_numpy(m)].float() + 1.0).bfloat16()  # Δ ≈ 1 > atol
            tuned[k] = t
        write_checkpoint(root / run, tuned, shards=3)
    store = str(root / "store")
    for run in ("a", "b", "c"):
        submit(str(root / "base"), str(root / run), SubmitOptions(store=store, name=run,
                                                                   diff=DiffOptions(chunk_elems=CHUNK, rank="off")))
    return root, store, masks


def _expected(ma, mb):
    n = ma.size
    ca, cb, both = int(ma.sum()), int(mb.sum()), int((ma & mb).sum())
    p, q = ca / n, cb / n
    return dict(numel=n, changed_a=ca, changed_b=cb, changed_both=both, o1=both / ca, o2=both / cb,
                jaccard=both / (ca + cb - both), o1_random=cb / n, o2_random=ca / n, jaccard_random=p * q / (p + q - p * q))


def test_overlap_per_tensor_and_total_match_numpy(planted):
    _, store, masks = planted
    _, codecs = query(store, "SELECT DISTINCT r.name, m.mask_codec FROM masks m JOIN runs r USING (run_id)")
    assert ("c", "gaps+zstd") in codecs and ("a", "packbits") in codecs  # both layouts decoded below
    cols, rows = query(store, "SELECT * FROM overlap('a', 'b')")
    got = {r[0]: dict(zip(cols[1:], r[1:])) for r in rows}
    assert set(got) == set(SHAPES)
    for k in SHAPES:
        exp = _expected(masks["a"][k], masks["b"][k])
        for c, v in exp.items():
            assert got[k][c] == pytest.approx(v, rel=1e-12), (k, c)
    cols, rows = query(store, "SELECT * FROM overlap_total('a', 'b')")
    total = dict(zip(cols, rows[0]))
    exp = _expected(np.concatenate([masks["a"][k] for k in SHAPES]), np.concatenate([masks["b"][k] for k in SHAPES]))
    for c, v in exp.items():
        assert total[c] == pytest.approx(v, rel=1e-12), c
    assert total["changed_both"] <= min(total["changed_a"], total["changed_b"])
    # units really do split tensors, inside rows of 2-D tensors never
    cols, rows = query(store, "SELECT tensor, count(*), min(\"start\" % 33) FROM units u JOIN runs r USING (run_id) "
                              "WHERE r.name = 'a' AND tensor = 'model.layers.0.mlp.up_proj.weight' GROUP BY tensor")
    assert rows[0][1] == 3 and rows[0][2] == 0


def test_overlap_is_symmetric_and_self_overlap_is_one(planted):
    _, store, _ = planted
    _, ab = query(store, "SELECT o1, o2, jaccard FROM overlap_total('a', 'b')")
    _, ba = query(store, "SELECT o1, o2, jaccard FROM overlap_total('b', 'a')")
    assert ab[0][0] == ba[0][1] and ab[0][1] == ba[0][0] and ab[0][2] == ba[0][2]
    _, aa = query(store, "SELECT o1, o2, jaccard FROM overlap_total('a', 'a')")
    assert aa == [(1.0, 1.0, 1.0)]


def test_consensus_histogram_matches_numpy(planted):
    _, store, masks = planted
    cols, rows = query(store, "SELECT tensor, numel, n_runs, histogram, in_all FROM consensus(['a', 'b', 'c'])")
    assert {r[0] for r in rows} == set(SHAPES)
    for tensor, numel, n_runs, hist, in_all in rows:
        k = masks["a"][tensor].astype(int) + masks["b"][tensor] + masks["c"][tensor]
        assert (numel, n_runs) == (k.size, 3)
        assert hist == np.bincount(k, minlength=4).tolist()
        assert in_all == int((k == 3).sum())


def test_runs_on_different_tensor_sets_meet_on_the_tensors_they_share(planted):
    """A tuned checkpoint without one tensor gives a run with one row group fewer: whichever
    run comes first, every tensor both runs hold is counted (units pair by tensor and
    range, not by the position of their row group)."""
    root, store, masks = planted
    from safetensors.torch import load_file

    tuned = {}
    for f in sorted((root / "a").glob("*.safetensors")):
        tuned.update(load_file(f))
    gone = "model.layers.0.mlp.up_proj.weight"
    del tuned[gone]
    write_checkpoint(root / "a-less", tuned, shards=2)
    submit(str(root / "base"), str(root / "a-less"),
           SubmitOptions(store=store, name="a-less", diff=DiffOptions(chunk_elems=CHUNK, rank="off")))
    shared = set(SHAPES) - {gone}
    for runs in (["a", "a-less"], ["a-less", "a"], ["a-less", "b", "a"]):
        _, rows = query(store, f"SELECT tensor, histogram FROM consensus({runs!r})")
        assert {r[0] for r in rows} == shared, runs
        for tensor, hist in rows:
            k = sum(masks["a" if r == "a-less" else r][tensor].astype(int) for r in runs)
            assert hist == np.bincount(k, minlength=len(runs) + 1).tolist(), (runs, tensor)
        _, rows = query(store, f"SELECT tensor, changed_both FROM overlap('{runs[0]}', '{runs[-1]}')")
        assert dict(rows) == {t: int(masks["a"][t].sum()) for t in shared}, runs


@pytest.mark.parametrize("runs", [2, 3, 5])
def test_a_units_histogram_has_a_count_for_every_k_even_when_none_is_reached(runs):
    """``count_histogram`` of R stored masks has R + 1 counts: the last is 0 when no element
    changed in every run (an empty mask among them, or disjoint ones), never left out, since
    a unit's histogram is added to its tensor's and ``in_all`` reads the last count. Each
    pair's ``and_count`` is numpy's too (the planted runs have no empty mask)."""
    from raydiff.kernel.masks import CODEC_EMPTY, decode_packed, encode_mask
    from raydiff.query.overlap import and_count, count_histogram

    rng = np.random.default_rng(runs)
    n = 1000
    cases = {
        "disjoint": [np.arange(n) % runs == r for r in range(runs)],
        "one empty": [rng.random(n) < 0.5 for _ in range(runs - 1)] + [np.zeros(n, bool)],
        "dense": [rng.random(n) < 0.9 for _ in range(runs)],
        "all set": [np.ones(n, bool)] * runs,
    }
    for case, masks in cases.items():
        stored = [encode_mask(m) for m in masks]
        want = np.bincount(np.sum(masks, axis=0), minlength=runs + 1).tolist()
        got = count_histogram([decode_packed(c, p, n) if c != CODEC_EMPTY else None for c, p in stored], n)
        assert got == want and len(got) == runs + 1, case
        # and each pair's intersection (an empty mask's is 0, however the other is stored)
        for i in range(runs):
            for j in range(i, runs):
                assert and_count(*stored[i], *stored[j], n) == int((masks[i] & masks[j]).sum()), (case, i, j)


def test_layers_view_weightings(planted):
    _, store, masks = planted
    cols, rows = query(store, "SELECT layer, module, numel, changed, sparsity_weighted, sparsity_mean FROM layers "
                              "WHERE run_id = run_ref('b') ORDER BY layer NULLS FIRST, module")
    got = {(r[0], r[1]): r[2:] for r in rows}
    m = masks["b"]
    up, q = m["model.layers.0.mlp.up_proj.weight"], m["model.layers.1.self_attn.q_proj.weight"]
    assert got[(0, "up")] == (up.size, int(up.sum()), pytest.approx(1 - up.mean()), pytest.approx(1 - up.mean()))
    assert got[(1, "q")][:2] == (q.size, int(q.sum()))
    emb, norm = m["model.embed_tokens.weight"], m["model.norm.weight"]
    outside = got[(None, "*")]
    assert outside[0] == emb.size + norm.size
    assert outside[2] == pytest.approx(1 - (emb.sum() + norm.sum()) / (emb.size + norm.size))  # element-weighted
    assert outside[3] == pytest.approx(((1 - emb.mean()) + (1 - norm.mean())) / 2)  # unweighted mean
    assert got[(None, "embed")][0] == emb.size and got[(None, "norm")][0] == norm.size


def test_overlap_refuses_different_bases_and_layouts(planted, tmp_path):
    root, store, _ = planted
    g = torch.Generator().manual_seed(1)
    other = write_checkpoint(tmp_path / "other", {k: torch.randn(s, generator=g).bfloat16() for k, s in SHAPES.items()})
    submit(str(other), str(root / "a"), SubmitOptions(store=store, name="a-vs-other", diff=DiffOptions(chunk_elems=CHUNK, rank="off")))
    with pytest.raises(QueryError, match="have different bases"):
        query(store, "SELECT * FROM overlap_total('a', 'a-vs-other')")
    submit(str(root / "base"), str(root / "c"), SubmitOptions(store=store, name="c-big", diff=DiffOptions(chunk_elems=4096, rank="off")))
    with pytest.raises(QueryError, match="were cut into units of 1024 and 4096 elements; resubmit one with --chunk-elems 1024"):
        query(store, "SELECT * FROM overlap_total('a', 'c-big')")
    with pytest.raises(QueryError, match="no complete run has id or name 'nope'"):
        query(store, "SELECT * FROM overlap('a', 'nope')")


def test_cli_overlap_layers_consensus(planted):
    _, store, masks = planted
    runner = CliRunner()
    r = runner.invoke(app, ["overlap", "a", "b", "c", "--store", store, "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(x["run_a"], x["run_b"]) for x in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    _, total = query(store, "SELECT changed_both, o1 FROM overlap_total('b', 'c')")
    assert (rows[2]["changed_both"], rows[2]["o1"]) == (total[0][0], total[0][1])  # JSON is lossless
    r = runner.invoke(app, ["overlap", "a", "b", "--per-tensor", "--store", store, "--format", "csv"])
    assert next(csv.reader(io.StringIO(r.stdout)))[:8] == ["tensor", "numel", "changed_a", "changed_b", "changed_both",
                                                           "o1", "o2", "jaccard"]
    assert len(r.stdout.splitlines()) == 1 + len(SHAPES)
    r = runner.invoke(app, ["overlap", "a", "--store", store])
    assert r.exit_code == 1 and r.stderr.strip() == "Error: overlap needs two or more runs"
    r = runner.invoke(app, ["layers", "a", "--store", store, "--format", "json"])
    assert {(x["layer"], x["module"]) for x in json.loads(r.stdout)} >= {(0, "up"), (1, "q"), (None, "embed"), (0, "*")}
    r = runner.invoke(app, ["consensus", "a", "b", "--store", store, "--format", "json"])
    hist = {x["tensor"]: x["histogram"] for x in json.loads(r.stdout)}
    k = masks["a"]["model.norm.weight"].astype(int) + masks["b"]["model.norm.weight"]
    assert hist["model.norm.weight"] == np.bincount(k, minlength=3).tolist()


def test_report_renders_in_headless_chromium(planted, tmp_path):
    _, store, masks = planted
    path = write_report(store, ["a", "b", "c"], tmp_path / "rep")
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.html", "heatmap.png", "tolerance.png",
                                                             "rank.png", "overlap.png"}
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 4
    # the summary table's numbers, read back from the page, against the planted masks
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(<td>.*?)</tr>", page)]
    assert [r[0] for r in rows] == ["a", "b", "c"]
    for name, run_id, status, atol, weighted, mean, rank in rows:
        m = masks[name]
        assert (status, float(atol), rank) == ("complete", 1e-5, "")  # --rank off: no rank ratio
        assert run_id == query(store, "SELECT run_ref(?)", [name])[1][0][0]
        total = sum(v.size for v in m.values())
        assert float(weighted) == pytest.approx(1 - sum(int(v.sum()) for v in m.values()) / total, rel=5e-4), name
        assert float(mean) == pytest.approx(np.mean([1 - v.mean() for v in m.values()]), rel=5e-4), name
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                    f"--screenshot={shot}", path.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1200)
    white = (img > 245).all(axis=2).mean()
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    assert white < 0.9 and colours > 200, (white, colours)  # plots drawn, not a blank or error page


@pytest.mark.parametrize("run, codec, damage", [("c", "gaps+zstd", "frame"), ("b", "packbits", "cleared"),
                                               ("b", "packbits", "set"), ("b", "packbits", "codec")])
def test_a_corrupt_stored_mask_is_one_error_naming_the_run_tensor_unit_and_file(planted, tmp_path, run, codec, damage):
    """Bytes flipped inside a zstd frame of a stored mask (run c's are gaps+zstd); a byte of
    a raw packed mask (run b's) cleared, so fewer entries are set than the unit counted, or
    set, so more are; or the mask's codec rewritten as ``empty``: each stops every query
    that reads masks with one ``Error:`` line naming the run, the tensor, the unit's elements
    and the damaged file, not pyarrow's "ZSTD decompression failed", and not a wrong overlap
    counted in silence."""
    import pyarrow.parquet as pq

    from raydiff.store import Store, layout

    root, store, masks = planted
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    _, ids = query(str(copy), f"SELECT run_id FROM runs WHERE name = '{run}'")
    run_id = ids[0][0]
    units = Store(str(copy)).path(layout.units_file(run_id))
    table = pq.read_table(units, columns=["tensor", "start", "stop", "changed", "mask_codec", "mask"])
    i = next(i for i, (c, name) in enumerate(zip(*(table.column(x).to_pylist() for x in ("mask_codec", "tensor"))))
             if c == codec and len(SHAPES[name]) == 2 and len(table.column("mask")[i].as_py()) > 40)  # 2-D: profile
    tensor, start, stop, changed = (table.column(c)[i].as_py() for c in ("tensor", "start", "stop", "changed"))
    payload = table.column("mask")[i].as_py()
    if damage == "codec":  # the file rewritten row group by row group, one codec changed
        f = pq.ParquetFile(units)
        groups = [f.read_row_group(g) for g in range(f.metadata.num_row_groups)]
        with pq.ParquetWriter(units, f.schema_arrow) as w:
            seen = 0
            for g in groups:
                if seen <= i < seen + g.num_rows:
                    codecs = g.column("mask_codec").to_pylist()
                    codecs[i - seen] = "empty"
                    field = g.schema.field("mask_codec")
                    g = g.set_column(g.schema.get_field_index("mask_codec"), field, pa.array(codecs, field.type))
                w.write_table(g)
                seen += g.num_rows
        problem = f"it holds 0 changed entries where the run counted {changed}"
    else:
        data = bytearray(open(units, "rb").read())
        at = data.find(payload)
        assert at > 0 and data.find(payload, at + 1) < 0  # the mask column is stored as it is, once
        if damage == "frame":
            for k in range(12, 28):  # inside the frame: past the stream length and the frame header
                data[at + k] ^= 0xA5
            problem = "ZSTD decompression failed"
        else:
            k = next(k for k, x in enumerate(payload) if (x != 0 if damage == "cleared" else x != 0xFF))
            was = int(np.unpackbits(np.frombuffer(payload[k:k + 1], np.uint8)).sum())
            data[at + k] = 0 if damage == "cleared" else 0xFF
            problem = f"it holds {changed - was if damage == 'cleared' else changed + 8 - was} changed entries where the run counted {changed}"
        open(units, "wb").write(bytes(data))
    want = f"Error: the stored mask of tensor '{tensor}' (elements {start}…{stop - 1}) of run {run_id} is corrupt ({problem}"
    fix = f"the store's file {units} is damaged; restore it from a copy, or submit the pair again into a new store"
    runner = CliRunner()
    for args in (["overlap", "a", run], ["consensus", "a", run], ["overlap", "a", "b", "c"],
                 ["sql", f"SELECT * FROM profile('{run}', '{tensor}')"],
                 ["export-mask", run, "--out", str(tmp_path / "m.safetensors")]):
        r = runner.invoke(app, [*args, "--store", str(copy)])
        assert r.exit_code == 1, (args, r.output)
        line = r.stderr.strip()
        assert line.startswith(want) and line.endswith(fix) and "\n" not in line, (args, line)
    assert not (tmp_path / "m.safetensors").exists()
    other = next(x for x in "abc" if x not in ("a", run))
    r = runner.invoke(app, ["overlap", "a", other, "--store", str(copy), "--format", "json"])  # whole runs still answer
    assert r.exit_code == 0, r.output
    ma, mo = (np.concatenate([masks[x][k] for k in SHAPES]) for x in ("a", other))
    assert json.loads(r.stdout)[0]["changed_both"] == int((ma & mo).sum())
