"""Artifacts out of raydiff: change masks as safetensors, sparse patches, and their rebuild.

Real Ray (the session cluster), real checkpoints written here, a real store from real
``submit`` runs. Every expected mask, index, value and digest is computed here with numpy
and hashlib straight from the safetensors files — never through raydiff's readers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from builders import read_dir, read_file, write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import BaseMismatch
from raydiff.kernel.masks import decode_mask
from raydiff.kernel.patch import bitwise_changes, index_dtype, scatter
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
from raydiff.query.export import export_mask
from raydiff.run.patch import PARTIAL, PATCH_INDEX, apply_patch, make_patch
from raydiff.run.submit import submit

pytestmark = pytest.mark.usefixtures("ray_cluster")
#: One pool of actors kept from call to call of this module (an actor's start is most of a
#: call's time on these small checkpoints); the CLI's calls release the pool they use.
KEEP = ClusterOptions(keep_actors=True)


@pytest.fixture(scope="module", autouse=True)
def _release_kept_actors():
    yield
    from raydiff.run import actors

    actors.release_actors()

# -- an independent reader of the files the tests write --------------------------------------

_NP = {"F64": "<f8", "F32": "<f4", "F16": "<u2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
       "I8": "i1", "U8": "u1", "BOOL": "u1"}
_BITS = {"F64": "<u8", "F32": "<u4", "F16": "<u2", "BF16": "<u2", "I64": "<u8", "I32": "<u4", "U8": "u1",
         "BOOL": "u1", "I8": "u1", "I16": "<u2"}


def bits(entry) -> np.ndarray:
    dtype, _, raw = entry
    return np.frombuffer(raw, _BITS[dtype])


def values(entry) -> np.ndarray:
    dtype, shape, raw = entry
    return np.frombuffer(raw, _NP[dtype]).reshape(shape)


# -- masks ------------------------------------------------------------------------------------

SHAPES = {"model.layers.0.mlp.up_proj.weight": (64, 48), "model.layers.0.self_attn.q_proj.weight": (40, 40),
          "model.norm.weight": (300,)}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three finetunes (F32 weights and an I32 buffer), each with large changes,
    changes under atol (bits differ, |Δ| ≤ 1e-5) and a NaN; run ``a`` with default options,
    ``b`` and ``c`` cut into small units (masks read across unit boundaries)."""
    root = tmp_path_factory.mktemp("family")
    rng = np.random.default_rng(3)
    base = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    base["model.counter"] = torch.from_numpy(rng.integers(0, 9, 50).astype(np.int32))
    write_checkpoint(root / "base", base, shards=2)
    for run, density in (("a", 0.1), ("b", 0.3), ("c", 0.05)):
        tuned = {}
        for k, t in base.items():
            t = t.clone()
            flat = t.view(-1)
            if t.dtype == torch.int32:
                sel = torch.from_numpy(rng.random(flat.numel()) < density)
                flat[sel] += 1
            else:
                big = torch.from_numpy(rng.random(flat.numel()) < density)
                tiny = torch.from_numpy(rng.random(flat.numel()) < 0.2) & ~big
                flat[big] += 0.5
                flat[tiny] += 2e-6  # bits differ, |Δ| ≤ atol: unchanged under the run's criterion
                flat[int(rng.integers(flat.numel()))] = float("nan")
            tuned[k] = t
        tuned["extra.only_in_tuned"] = torch.ones(7)
        write_checkpoint(root / run, tuned, shards=3)
    store = str(root / "store")
    submit(str(root / "base"), str(root / "a"), SubmitOptions(store=store, name="a", cluster=KEEP))
    for run in ("b", "c"):
        submit(str(root / "base"), str(root / run), SubmitOptions(
            store=store, name=run, diff=DiffOptions(chunk_elems=1024, rank="off"), cluster=KEEP))
    return root, store


def expected_mask(root: Path, run: str, atol: float = 1e-5) -> dict[str, np.ndarray]:
    """The run's `changed` mask per tensor, in numpy from the files: bits differ and not
    |Δ| ≤ atol, Δ in float32 (docs/counting.md); integers: bits differ."""
    b, t = read_dir(root / "base"), read_dir(root / run)
    out = {}
    for name in b:
        neq = bits(b[name]) != bits(t[name])
        if b[name][0] == "F32":
            with np.errstate(invalid="ignore"):
                d = values(t[name]).ravel() - values(b[name]).ravel()
                neq &= ~(np.abs(d) <= np.float32(atol))
        out[name] = neq.reshape(b[name][1])
    return out


def stored_masks(store: str, run_id: str) -> dict[str, np.ndarray]:
    """A run's masks straight from its units.parquet, decoded unit by unit."""
    import pyarrow.parquet as pq

    t = sorted(pq.read_table(Path(store) / "runs" / run_id / "units.parquet",
                             columns=["tensor", "start", "stop", "mask_codec", "mask"]).to_pylist(),
               key=lambda r: (r["tensor"], r["start"]))
    out: dict[str, np.ndarray] = {}
    for r in t:
        n = r["stop"] - r["start"]
        m = out.setdefault(r["tensor"], np.zeros(0, bool))
        out[r["tensor"]] = np.concatenate([m, decode_mask(r["mask_codec"], r["mask"] or b"", n)])
    return out


def test_export_mask_is_the_runs_mask_in_numpy_and_in_the_store(family, tmp_path):
    root, store = family
    out = tmp_path / "mask.safetensors"
    r = export_mask(store, ["a"], str(out))
    masks = load_file(str(out))
    exp = expected_mask(root, "a")
    assert set(masks) == set(exp)  # compared tensors only: not the one only in tuned
    (run_id,) = r.runs
    stored = stored_masks(store, run_id)
    for name, m in masks.items():
        assert m.dtype == torch.bool and tuple(m.shape) == exp[name].shape, name
        assert np.array_equal(m.numpy(), exp[name]), name
        assert np.array_equal(m.numpy().ravel(), stored[name]), name
        assert 0 < m.sum() < m.numel()  # the tiny changes really were left out, the large kept
    assert r.set == sum(int(m.sum()) for m in exp.values())
    assert r.numel == sum(m.size for m in exp.values())
    # the README's loop: gradients of unchanged entries are zeroed
    w = torch.nn.Parameter(torch.zeros(SHAPES["model.norm.weight"]))
    w.grad = torch.full_like(w, 3.0)
    w.grad.mul_(masks["model.norm.weight"])
    assert np.array_equal(w.grad.numpy(), np.where(exp["model.norm.weight"], 3.0, 0.0))
    meta, _ = read_file(out)
    assert json.loads(meta["raydiff"])["runs"] == [run_id]


def test_export_mask_min_runs_against_numpy(family, tmp_path):
    root, store = family
    counts = {}
    for run in ("a", "b", "c"):
        for k, m in expected_mask(root, run).items():
            counts[k] = counts.get(k, 0) + m.astype(int)
    for k_min in (1, 2, 3):
        out = tmp_path / f"k{k_min}.safetensors"
        res = CliRunner().invoke(app, ["export-mask", "a", "b", "c", "--min-runs", str(k_min), "--out", str(out),
                                       "--store", store])
        assert res.exit_code == 0, res.output
        masks = load_file(str(out))
        assert set(masks) == set(counts)
        for name, m in masks.items():
            assert np.array_equal(m.numpy(), counts[name] >= k_min), (k_min, name)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def _error(args: list[str]) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def test_export_mask_refuses_bad_input_with_one_line(family, tmp_path):
    root, store = family
    other = submit(str(root / "a"), str(root / "b"),
                   SubmitOptions(store=store, name="b-over-a", diff=DiffOptions(rank="off"), cluster=KEEP)).run
    out = tmp_path / "m.safetensors"
    line = _error(["export-mask", "a", "b-over-a", "--out", str(out), "--store", store])
    assert "different bases" in line and str(root / "base") in line and str(root / "a") in line
    with pytest.raises(BaseMismatch):
        export_mask(store, ["b", other.run_id], str(out))
    assert "--min-runs must be between 1 and the number of runs (2), got 3" in _error(
        ["export-mask", "a", "b", "--min-runs", "3", "--out", str(out), "--store", store])
    assert "--min-runs" in _error(["export-mask", "a", "--min-runs", "0", "--out", str(out), "--store", store])
    assert "no complete run has id or name 'nope'" in _error(
        ["export-mask", "nope", "--out", str(out), "--store", store])
    assert not out.exists()
    out.write_bytes(b"keep")
    assert "exists; pass --force" in _error(["export-mask", "a", "--out", str(out), "--store", store])
    assert out.read_bytes() == b"keep"
    assert "is a directory" in _error(["export-mask", "a", "--out", str(tmp_path), "--store", store])
    r = CliRunner().invoke(app, ["export-mask", "a", "--out", str(out), "--force", "--store", store])
    assert r.exit_code == 0, r.output
    assert set(load_file(str(out))) == set(expected_mask(root, "a"))
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporaries left behind


# -- the patch kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_kernel_changes_and_scatter_against_numpy(dtype):
    rng = np.random.default_rng(1)
    for density in (0.0, 0.01, 0.5, 1.0):
        b = rng.integers(0, 200, 5000).astype(dtype)
        t = b.copy()
        sel = rng.random(b.size) < density
        t[sel] += 1
        idx, vals = bitwise_changes(b, t, offset=1000, index="I32")
        assert idx.dtype == np.dtype("<i4")
        assert np.array_equal(idx, np.flatnonzero(b != t) + 1000)
        assert np.array_equal(vals, t[b != t])
        assert np.array_equal(scatter(b, idx - 1000, vals), t)
    idx, _ = bitwise_changes(b, t, offset=1 << 40, index="I64")  # past 2³¹: int64 indices
    assert idx.dtype == np.dtype("<i8") and np.array_equal(idx, np.flatnonzero(b != t) + (1 << 40))
    with pytest.raises(ValueError):
        scatter(b, np.array([b.size]), t[:1])
    assert (index_dtype((1 << 31) - 1), index_dtype(1 << 31)) == ("I32", "I64")


# -- patch and apply --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and a finetune covering each case: bf16, f32 (a NaN with a payload, -0.0) and
    int64 tensors changed sparsely, one unchanged, one only in base, one only in tuned, one
    whose shape and one whose dtype changed; tuned in 3 shards, base in 2."""
    root = tmp_path_factory.mktemp("pair")
    g = torch.Generator().manual_seed(5)
    base = {
        "model.embed_tokens.weight": torch.randn(500, 64, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(777, generator=g),
        "model.rotary.inv_freq": torch.randn(32, generator=g),
        "model.steps": torch.arange(1000, dtype=torch.int64),
        "model.gone.weight": torch.randn(10, 10, generator=g),
        "model.resized.weight": torch.randn(8, 4, generator=g),
        "model.recast.weight": torch.randn(16, generator=g),
    }
    tuned = {k: v.clone() for k, v in base.items() if k != "model.gone.weight"}
    for k in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        sel = torch.rand(tuned[k].shape, generator=g) < 0.2
        tuned[k][sel] = (tuned[k][sel].float() + 0.25).bfloat16()
    ln = tuned["model.layers.0.input_layernorm.weight"]
    ln[::13] = -0.0
    ln.view(torch.int32)[5] = 0x7FC00123  # a NaN with a payload: only a bitwise patch keeps it
    tuned["model.steps"][[3, 999]] = -1
    tuned["model.resized.weight"] = torch.randn(9, 4, generator=g)
    tuned["model.recast.weight"] = base["model.recast.weight"].bfloat16()
    tuned["model.new.bias"] = torch.randn(33, generator=g)
    write_checkpoint(root / "base", base, shards=2)
    write_checkpoint(root / "tuned", tuned, shards=3, config={"tie_word_embeddings": False})
    return root


#: Input bytes per patch shard here (``--shard-mb 0.04``): several shards of these small tensors.
SHARD = int(0.04 * (1 << 20))


def test_patch_holds_exactly_the_changed_bits_and_apply_rebuilds_tuned(pair, tmp_path):
    root = pair
    p = make_patch(str(root / "base"), str(root / "tuned"), str(tmp_path / "patch"), shard_bytes=SHARD, cluster=KEEP)
    assert p.shards >= 3 and not p.resumed
    base, tuned = read_dir(root / "base"), read_dir(root / "tuned")
    index = json.loads((tmp_path / "patch" / PATCH_INDEX).read_text())
    stored = read_dir(tmp_path / "patch")
    entries = {e["name"]: e for e in index["tensors"]}
    assert set(entries) == set(tuned)
    assert [d["name"] for d in index["dropped"]] == ["model.gone.weight"]
    for name, t in tuned.items():
        e = entries[name]
        assert e["tuned_sha256"] == hashlib.sha256(t[2]).hexdigest(), name
        b = base.get(name)
        if b is None or b[:2] != t[:2]:
            assert e["kind"] == "whole" and stored[f"whole/{name}"] == t, name
            continue
        assert e["kind"] == "sparse" and e["base_sha256"] == hashlib.sha256(b[2]).hexdigest(), name
        want = np.flatnonzero(bits(b) != bits(t))
        assert e["changed"] == want.size, name
        if want.size == 0:
            assert f"indices/{name}" not in stored and e["patch_shard"] == "", name
            continue
        assert stored[f"indices/{name}"][0] == "I32"
        assert np.array_equal(values(stored[f"indices/{name}"]), want), name
        assert np.array_equal(bits(stored[f"values/{name}"]), bits(t)[want]), name
        assert stored[f"values/{name}"][0] == t[0]
    assert entries["model.rotary.inv_freq"]["changed"] == 0
    for s in index["patch_shards"]:
        f = tmp_path / "patch" / s["name"]
        assert s["bytes"] == f.stat().st_size and s["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert p.patch_bytes == sum(s["bytes"] for s in index["patch_shards"]) + (tmp_path / "patch" / PATCH_INDEX).stat().st_size
    assert p.tuned_bytes == sum(len(t[2]) for t in tuned.values())

    a = apply_patch(str(root / "base"), str(tmp_path / "patch"), str(tmp_path / "new"), cluster=KEEP)
    names = sorted(f.name for f in (root / "tuned").glob("*.safetensors"))
    assert sorted(f.name for f in (tmp_path / "new").glob("*.safetensors")) == names
    for n in names:  # every tensor bit-identical, in the shard tuned had it in, with its metadata
        assert read_file(tmp_path / "new" / n)[1] == read_file(root / "tuned" / n)[1], n
        assert read_file(tmp_path / "new" / n)[0] == read_file(root / "tuned" / n)[0], n
    new_index = json.loads((tmp_path / "new" / "model.safetensors.index.json").read_text())
    old_index = json.loads((root / "tuned" / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == old_index["weight_map"]
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == {"tie_word_embeddings": False}
    assert not (tmp_path / "new" / PARTIAL).exists() and (tmp_path / "new" / "raydiff-apply.json").exists()
    loaded = load_file(str(tmp_path / "new" / names[0]))  # and safetensors reads it
    assert loaded.keys() == load_file(str(root / "tuned" / names[0])).keys()
    assert a.nbytes == p.tuned_bytes and a.tensors == len(tuned)


class _Stop(Exception):
    pass


def test_patch_and_apply_resume_after_an_interruption(pair, tmp_path):
    root = pair
    out = tmp_path / "patch"
    seen = []

    def stop_after_first(d):
        seen.append(d.key)
        raise _Stop

    with pytest.raises(_Stop):
        make_patch(str(root / "base"), str(root / "tuned"), str(out), shard_bytes=SHARD, cluster=KEEP,
                   on_done=stop_after_first)
    finished = sorted(p.name for p in out.glob("patch-*.safetensors"))
    assert finished and (out / PARTIAL).exists() and not (out / PATCH_INDEX).exists()
    assert not [p for p in os.listdir(out) if ".tmp-" in p]  # nothing half-written
    kept = {n: (out / n).stat().st_ino for n in finished}
    (out / "patch-00001-of-00009.safetensors.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"torn")
    again = []
    p = make_patch(str(root / "base"), str(root / "tuned"), str(out), shard_bytes=SHARD, cluster=KEEP,
                   on_done=again.append)
    assert p.resumed and set(d.key for d in again).isdisjoint(finished)
    assert {n: (out / n).stat().st_ino for n in finished} == kept  # the finished shards were not rewritten
    assert not [p for p in os.listdir(out) if ".tmp-" in p] and not (out / PARTIAL).exists()

    new = tmp_path / "new"
    done_shards = []

    def stop_after_a_shard(d):
        done_shards.extend(f.name for f in new.glob("*.safetensors"))
        if done_shards:
            raise _Stop

    with pytest.raises(_Stop):
        apply_patch(str(root / "base"), str(out), str(new), cluster=KEEP, on_done=stop_after_a_shard)
    finished = sorted(f.name for f in new.glob("*.safetensors"))
    assert finished and (new / PARTIAL).exists() and not [p for p in os.listdir(new) if ".tmp-" in p]
    kept = {n: (new / n).stat().st_ino for n in finished}
    a = apply_patch(str(root / "base"), str(out), str(new), cluster=KEEP)
    assert a.resumed and {n: (new / n).stat().st_ino for n in finished} == kept
    for f in (root / "tuned").glob("*.safetensors"):
        assert read_file(new / f.name) == read_file(f), f.name
    r = CliRunner().invoke(app, ["patch", str(root / "base"), str(root / "tuned"), "--out", str(tmp_path / "fresh"),
                                 "--shard-mb", "0.04"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / PATCH_INDEX).read_text())["patch_shards"] == \
        json.loads((tmp_path / "fresh" / PATCH_INDEX).read_text())["patch_shards"]  # the same bytes


def test_bad_patches_bases_and_outputs_get_one_error_line(pair, tmp_path):
    root = pair
    base, tuned, patch = str(root / "base"), str(root / "tuned"), tmp_path / "patch"
    make_patch(base, tuned, str(patch), shard_bytes=SHARD, cluster=KEEP)
    assert "exists; pass --force" in _error(["patch", base, tuned, "--out", str(patch)])
    new = tmp_path / "new"

    def refused(patch_dir, words, base_dir=base):
        line = _error(["apply", base_dir, str(patch_dir), "--out", str(new)])
        assert all(w in line for w in words), line
        assert not new.exists()  # refused before anything was written, or nothing left

    # another base: the same names, dtypes and shapes, other bytes (found while rebuilding)
    other = read_dir(root / "base")
    other_t = {k: torch.from_numpy(values(v).copy()) if v[0] != "BF16" else
               torch.from_numpy(values(v).copy()).view(torch.bfloat16) for k, v in other.items()}
    other_t["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    write_checkpoint(tmp_path / "other", other_t, shards=2)
    refused(patch, ["model.layers.0.mlp.up_proj.weight", "SHA-256", "not the base the patch was made from"],
            str(tmp_path / "other"))
    # a base of another shape: refused from the headers
    other_t["model.steps"] = torch.arange(999, dtype=torch.int64)
    shutil.rmtree(tmp_path / "other")
    write_checkpoint(tmp_path / "other", other_t, shards=2)
    refused(patch, ["model.steps", "[999]", "[1000]"], str(tmp_path / "other"))

    shards = sorted(patch.glob("patch-*.safetensors"))
    bad = tmp_path / "bad"
    shutil.copytree(patch, bad)
    (bad / shards[1].name).unlink()
    refused(bad, ["missing", shards[1].name])
    shutil.copy(shards[1], bad / shards[1].name)
    raw = (bad / shards[1].name).read_bytes()
    (bad / shards[1].name).write_bytes(raw[:-3])
    refused(bad, ["truncated", shards[1].name])
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    (bad / shards[1].name).write_bytes(bytes(flipped))
    refused(bad, ["SHA-256", "changed or corrupted", shards[1].name])
    shutil.copy(shards[1], bad / shards[1].name)
    index = json.loads((bad / PATCH_INDEX).read_text())
    index["tensors"][0]["tuned_sha256"] = "0" * 64
    (bad / PATCH_INDEX).write_text(json.dumps(index))
    refused(bad, ["checksum"])
    (bad / PATCH_INDEX).write_text(json.dumps(index)[:100])
    refused(bad, ["not a raydiff patch index"])
    (bad / PATCH_INDEX).unlink()
    (bad / PARTIAL).write_text("{}")
    refused(bad, ["unfinished"])

    new.mkdir()
    (new / "mine.txt").write_text("keep")
    assert "exists; pass --force" in _error(["apply", base, str(patch), "--out", str(new)])
    assert "did not write" in _error(["apply", base, str(patch), "--out", str(new), "--force"])
    assert (new / "mine.txt").read_text() == "keep"
    shutil.rmtree(new)
    apply_patch(base, str(patch), str(new), cluster=KEEP)
    assert "exists; pass --force" in _error(["apply", base, str(patch), "--out", str(new)])
    r = CliRunner().invoke(app, ["apply", base, str(patch), "--out", str(new), "--force"])
    assert r.exit_code == 0, r.output
    for f in (root / "tuned").glob("*.safetensors"):
        assert read_file(new / f.name) == read_file(f), f.name
