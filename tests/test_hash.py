"""`--hash`: each tensor's SHA-256 on both sides, in the same read as the diff — checked
against hashlib over the bytes the test reads from the safetensors files itself (header
parsed here, not by raydiff), for multi-unit, mixed-dtype, one-sided and mismatched tensors,
after a resume, and with the README's comparison query."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import duckdb
import pytest
import torch

from builders import interrupted_run, itemsizes, recording_progress, write_checkpoint
from raydiff.options import DiffOptions, SubmitOptions
from raydiff.query.views import query
from raydiff.run.submit import submit

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _file_hashes(path):
    """tensor name → SHA-256 of its bytes in a .safetensors file, from the raw file."""
    raw = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    return {k: hashlib.sha256(data[v["data_offsets"][0]:v["data_offsets"][1]]).hexdigest()
            for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    root = tmp_path_factory.mktemp("hash")
    base = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 48, generator=g).bfloat16(),  # many units
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g),
        "model.norm.weight": torch.ones(48, dtype=torch.bfloat16),
        "model.step": torch.tensor([7, 8], dtype=torch.int64),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(16, 32, generator=g),
        "only_base.weight": torch.randn(5, generator=g),
    }
    tuned = {k: v.clone() for k, v in base.items() if k != "only_base.weight"}
    tuned["model.layers.0.mlp.up_proj.weight"][::3] += 1
    tuned["model.step"][1] = 9
    tuned["model.layers.0.self_attn.k_proj.weight"] = torch.randn(16, 16, generator=g)  # shape mismatch
    tuned["only_tuned.bias"] = torch.randn(3, generator=g).half()
    write_checkpoint(root / "base", base)
    write_checkpoint(root / "tuned", tuned)
    return root


def _stored(store, run_id):
    _, rows = query(store, "SELECT tensor, status, base_sha256, tuned_sha256, changed, changed_bits FROM tensors "
                           "WHERE run_id = ? ORDER BY tensor", [run_id])
    return rows


def test_hashes_are_the_sha256_of_each_tensors_bytes(pair):
    store = str(pair / "store")
    opts = SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1024, hash=True, rank="off"))
    res = submit(str(pair / "base"), str(pair / "tuned"), opts)
    hb, ht = _file_hashes(pair / "base"), _file_hashes(pair / "tuned")
    rows = _stored(store, res.run_id)
    assert {r[0] for r in rows} == set(hb) | set(ht)
    for tensor, status, b, t, *_ in rows:
        assert (b, t) == (hb.get(tensor), ht.get(tensor)), (tensor, status)
    assert any(r[2] == r[3] for r in rows) and any(r[2] != r[3] and r[2] and r[3] for r in rows)
    # the same counts as a run without --hash, and another run id
    plain = submit(str(pair / "base"), str(pair / "tuned"),
                   SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1024, rank="off")))
    assert plain.run_id != res.run_id
    assert [r[:2] + r[4:] for r in _stored(store, plain.run_id)] == [r[:2] + r[4:] for r in rows]
    assert all(r[2] is None and r[3] is None for r in _stored(store, plain.run_id))
    assert not (pair / "store" / "runs" / res.run_id / "hashes").exists()  # folded at commit


def test_an_interrupted_hash_run_resumes_to_the_same_hashes(pair, tmp_path):
    store = str(tmp_path / "store")
    opts = SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1024, hash=True, rank="off"))
    run_id, n = interrupted_run(pair / "base", pair / "tuned", opts)
    progress = recording_progress()
    res = submit(str(pair / "base"), str(pair / "tuned"), opts, progress)
    assert res.run_id == run_id and res.resumed
    # no tensor was hashed before the cut: every unit runs again, with its tensor's hash,
    # and the progress display is told so (bytes from the files' own headers)
    isb, ist = itemsizes(pair / "base"), itemsizes(pair / "tuned")
    _, units = query(store, "SELECT tensor, start, stop FROM units WHERE run_id = ?", [run_id])
    (told,) = progress.plans
    assert (told.units_total, told.units_todo) == (n, n) and len(units) == n
    assert told.bytes_todo == told.bytes_total == sum((stop - start) * (isb[t] + ist[t]) for t, start, stop in units)
    assert sum(kind == "unit" for kind, _ in progress.done) == n
    hb, ht = _file_hashes(pair / "base"), _file_hashes(pair / "tuned")
    assert [(r[2], r[3]) for r in _stored(store, run_id)] == [(hb.get(r[0]), ht.get(r[0])) for r in
                                                              _stored(store, run_id)]


def test_the_readme_query_compares_a_store_with_published_hashes(pair, tmp_path):
    store = pair / "store"
    submit(str(pair / "base"), str(pair / "tuned"),  # the first test's run: found complete, or made
           SubmitOptions(store=str(store), diff=DiffOptions(chunk_elems=1024, hash=True, rank="off")))
    ht = _file_hashes(pair / "tuned")
    published = dict(ht)
    published["model.norm.weight"] = "0" * 64  # the engine holds something else here
    (tmp_path / "engine.json").write_text(json.dumps([{"name": k, "sha256": v} for k, v in published.items()]))
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sql = next(b for b in readme.split("```sql\n")[1:] if "engine-hashes.json" in b).split("```")[0]
    sql = sql.replace("raydiff-store", str(store)).replace("engine-hashes.json", str(tmp_path / "engine.json"))
    rows = duckdb.connect().execute(sql).fetchall()  # the README's query, as a user runs it
    assert rows == [("model.norm.weight",)]
