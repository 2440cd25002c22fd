"""The demo family: real training, real checkpoints, analysed through the normal Ray path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from raydiff.demo import MEMBERS, FamilyConfig, build_family, chain_members, run_demo
from raydiff.options import ClusterOptions
from raydiff.query.views import query

LLAMA_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family"), FamilyConfig.small())


def _load(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        with safe_open(str(path / shard), "pt") as f:
            out[name] = f.get_tensor(name)
    return index, out


def test_family_layout(family):
    assert set(MEMBERS) <= set(family.members)
    assert any(m.startswith("rl-seed1-step") for m in family.members)
    _, base = _load(family.base)
    for path in [family.base, *family.members.values()]:
        index, tensors = _load(path)
        assert sorted(tensors) == sorted(LLAMA_NAMES)
        assert len(set(index["weight_map"].values())) >= 2
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
        assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (
            cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"], cfg["hidden_size"])
        assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (cfg["intermediate_size"], cfg["hidden_size"])
        if path != family.base:
            assert any(not torch.equal(tensors[k], base[k]) for k in tensors), path


def test_family_is_cached_and_deterministic(family, tmp_path):
    again = build_family(family.root, FamilyConfig.small())
    assert again.members == family.members
    other = build_family(tmp_path / "other", FamilyConfig.small())
    for name in ("base", "rl-seed2"):
        _, a = _load(family.root / name)
        _, b = _load(other.root / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _expected_row(base: dict, tuned: dict) -> tuple[str, str, str, np.ndarray]:
    """A demo report row computed from the checkpoint files alone, the paper's way: Δ in bf16,
    changed = |Δ| > 1e-5, bitwise = stored bits differ, rank ratio = mean over 2-D matrices of
    torch.linalg.matrix_rank(ΔW.float()) / min(m, n). Also the concatenated changed mask."""
    numel = changed = bits = 0
    ratios, masks = [], []
    for k in sorted(base):
        b, t = base[k], tuned[k]
        d = t - b
        m = (d.abs() > 1e-5).reshape(-1).numpy()
        masks.append(m)
        numel += b.numel()
        changed += int(m.sum())
        bits += int((b.view(torch.int16) != t.view(torch.int16)).sum())
        if b.ndim == 2:
            ratios.append(int(torch.linalg.matrix_rank(d.float())) / min(b.shape))
    return (f"{1 - changed / numel:.1%}", f"{1 - bits / numel:.1%}", f"{sum(ratios) / len(ratios):.1%}",
            np.concatenate(masks))


@pytest.mark.usefixtures("ray_cluster")
def test_run_demo_reports_and_leaves_a_queryable_store(family, tmp_path):
    store = str(tmp_path / "store")
    report = run_demo(store, str(family.root), ClusterOptions(), config=FamilyConfig.small())
    cols, rows = query(store, "SELECT name, status FROM runs WHERE run_id NOT IN "
                              "(SELECT run_vs_base FROM chains UNION SELECT run_vs_prev FROM chains) ORDER BY name")
    assert sorted(r[0] for r in rows) == sorted(family.members)
    assert all(r[1] == "complete" for r in query(store, "SELECT name, status FROM runs")[1])
    # every number of the table, read back from the text and recomputed from the files
    _, base = _load(family.base)
    table = {}
    for line in report.splitlines():
        parts = line.split()
        if parts and parts[0] in family.members:
            table.setdefault(parts[0], parts[1:])  # the first table; later ones (science) follow
    assert set(table) == set(family.members)
    masks = {}
    for name, path in family.members.items():
        _, tuned = _load(path)
        sparsity, bitwise, rank, masks[name] = _expected_row(base, tuned)
        acc, atol, *numbers = table[name]
        assert (atol, numbers) == ("1e-05", [sparsity, bitwise, rank]), name
        assert acc == f"{family.accuracy[name]:.1%}", name
    a, b = masks["rl-seed1"], masks["rl-seed2"]
    both, p, q = int((a & b).sum()), a.mean(), b.mean()
    expected = (f"o1 {both / a.sum():.1%}  o2 {both / b.sum():.1%}  (random baseline {q:.1%} / {p:.1%});  "
                f"Jaccard {both / (a | b).sum():.1%} (random {p * q / (p + q - p * q):.1%})")
    assert expected in report, report
    # the RL run's checkpoints as a chain: every change counted (values compared), per step
    steps = chain_members(family.members)
    assert len(steps) == FamilyConfig.small().snapshots + 1
    flat = {k: v.double().reshape(-1) for k, v in base.items()}
    versions = [flat] + [{k: v.double().reshape(-1) for k, v in _load(family.members[n])[1].items()} for n in steps]
    numel = sum(v.numel() for v in flat.values())
    ever = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in flat.items()}
    lines = [line.split() for line in report.splitlines()]
    for t, name in enumerate(steps, 1):
        now_ = sum(int((versions[t][k] != flat[k]).sum()) for k in flat)
        since = sum(int((versions[t][k] != versions[t - 1][k]).sum()) for k in flat)
        for k in flat:
            ever[k] |= versions[t][k] != versions[t - 1][k]
        ever_n = sum(int(e.sum()) for e in ever.values())
        cancelled = sum(int((ever[k] & (versions[t][k] == flat[k])).sum()) for k in flat)
        row = [str(t), name, f"{1 - since / numel:.1%}", f"{1 - now_ / numel:.1%}", f"{ever_n / numel:.1%}",
               f"{cancelled / numel:.1%}"]
        assert row in lines, (row, report)
    assert (f"at the last step: never updated {1 - ever_n / numel:.1%}, cancelled {cancelled / numel:.1%} (changed, "
            f"then back to the base value), subnetwork {now_ / numel:.1%}") in report, report
