"""The layouts the field publishes now: block-scaled FP8 (DeepSeek-V3), mixtures of experts
(Qwen3-MoE, DeepSeek, fused 3-D stacks) and fused projections (vLLM, verl).

Planted checkpoints with the real names and small dimensions; every count is checked against
numpy/torch on the same arrays (FP8 dequantized here with torch's own float8 decoding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from builders import perturb, ref_diff, write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import InvalidCheckpoint, PlanProblem
from raydiff.options import DiffOptions, SubmitOptions
from raydiff.query.views import query
from raydiff.run.submit import submit

pytestmark = pytest.mark.usefixtures("ray_cluster")

W = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
_COUNTS = ("numel", "changed", "changed_bits", "changed_rel", "changed_1e8", "changed_1e6", "changed_1e4")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rows(store, run_id, table="tensors"):
    cols, rows = query(store, f"SELECT * FROM {table} WHERE run_id = '{run_id}'")
    return [dict(zip(cols, r)) for r in rows]


def _by_tensor(store, run_id):
    return {r["tensor"]: r for r in _rows(store, run_id)}


def _check(row, ref):
    for k in _COUNTS:
        assert row[k] == ref[k], (row["tensor"], k, row[k], ref[k])
    assert row["rank"] == ref["rank"], row["tensor"]


def _opts(tmp_path, **kw):
    return SubmitOptions(store=str(tmp_path / "store"), diff=DiffOptions(**kw))


# -- block-scaled FP8 ----------------------------------------------------------------------


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's block quantization: per block, scale = amax / 448; codes = w / scale."""
    m, n = w.shape
    r, c = block
    scale = torch.empty(math.ceil(m / r), math.ceil(n / c))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * r:(i + 1) * r, j * c:(j + 1) * c].abs().max().clamp_min(1e-12) / 448
    full = scale.repeat_interleave(r, 0).repeat_interleave(c, 1)[:m, :n]
    return (w / full).to(torch.float8_e4m3fn), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """code × its block's scale, in float32, computed in numpy from torch's FP8 decoding."""
    m, n = codes.shape
    full = np.repeat(np.repeat(scale.numpy(), block[0], 0), block[1], 1)[:m, :n]
    return torch.from_numpy(codes.float().numpy() * full.astype(np.float32))


def _fp8_pair(block=(128, 128), shape=(300, 200)):
    """A base FP8 weight (partial edge blocks on both axes), and a tuned one with 4 % of its
    codes moved and three scales changed (one in the partial corner block)."""
    w = torch.randn(shape, generator=_g(1)) * 0.02
    codes, scale = quantize(w, block)
    t_codes = codes.clone()
    sel = torch.rand(shape, generator=_g(2)) < 0.04
    bits = t_codes.view(torch.uint8)
    bits[sel] = torch.where(bits[sel] % 0x80 < 0x7E, bits[sel] + 1, bits[sel] - 1)  # never the NaN code
    t_scale = scale.clone()
    for i, j in ((0, 0), (1, 1), (scale.shape[0] - 1, scale.shape[1] - 1)):
        t_scale[i, j] *= 1.25
    return codes, scale, t_codes, t_scale


def test_fp8_block_scaled_weights_are_compared_dequantized(tmp_path):
    codes, scale, t_codes, t_scale = _fp8_pair()
    norm = torch.randn(200, generator=_g(3)).bfloat16()
    t_norm = perturb(norm, 0.3, 0.1, 4)
    write_checkpoint(tmp_path / "b", {W: codes, W + "_scale_inv": scale, NORM: norm}, config=FP8_CONFIG)
    write_checkpoint(tmp_path / "t", {W: t_codes, W + "_scale_inv": t_scale, NORM: t_norm}, config=FP8_CONFIG)
    # units of 50 rows: the 128-row block rows start in units 0, 2 and 5, and units 2 and 5 straddle two
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, chunk_elems=50 * 200))
    rows = _by_tensor(str(tmp_path / "store"), res.run_id)
    b, t = dequantize(codes, scale, (128, 128)), dequantize(t_codes, t_scale, (128, 128))
    row = rows[W]
    assert (row["status"], row["match"], row["compare_dtype"]) == ("ok", "fp8_block_scaled", "F32")
    assert "F8_E4M3 codes × 128×128 block scales" in row["note"]
    _check(row, ref_diff(b, t))
    assert row["changed_code"] == int((codes.view(torch.uint8) != t_codes.view(torch.uint8)).sum()) > 0
    assert row["changed_scale_blocks"] == int((scale != t_scale).sum()) == 3
    # entries of a block whose scale changed are changed though their code is not
    assert row["changed"] > row["changed_code"]
    sc = rows[W + "_scale_inv"]
    assert (sc["status"], sc["match"], sc["changed"]) == ("block_scale", "none", None)
    assert W in sc["note"] and "base and tuned" in sc["note"]
    for k in _COUNTS:
        assert rows[NORM][k] == ref_diff(norm, t_norm)[k]
    assert rows[NORM]["changed_code"] is None
    assert "1 fp8_block_scaled" in res.matching and "block_scale 1" in res.matching


@pytest.mark.parametrize("fp8_side", ["base", "tuned"])
def test_fp8_release_against_a_bf16_finetune_compares_dequantized_values(tmp_path, fp8_side):
    codes, scale, _, _ = _fp8_pair()
    deq = dequantize(codes, scale, (128, 128))
    wide = perturb(deq.bfloat16(), 0.1, 0.01, 5)  # the bf16 finetune of the FP8 release
    fp8 = {W: codes, W + "_scale_inv": scale}
    write_checkpoint(tmp_path / fp8_side, fp8, config=FP8_CONFIG)
    other = "tuned" if fp8_side == "base" else "base"
    write_checkpoint(tmp_path / other, {W: wide}, config={})
    res = submit(str(tmp_path / "base"), str(tmp_path / "tuned"), _opts(tmp_path, chunk_elems=4096))
    rows = _by_tensor(str(tmp_path / "store"), res.run_id)
    row = rows[W]
    assert (row["match"], row["compare_dtype"]) == ("fp8_block_scaled+dtype_widened", "F32")
    ref = ref_diff(deq, wide) if fp8_side == "base" else ref_diff(wide, deq)
    _check(row, ref)
    assert row["changed"] > 0 and row["changed_code"] is None and row["changed_scale_blocks"] is None
    sc = rows[W + "_scale_inv"]
    assert sc["status"] == "block_scale" and f"in {fp8_side}:" in sc["note"]
    # the bf16 side that reproduces the dequantized values exactly is unchanged everywhere it is exact
    assert ref_diff(deq, deq.bfloat16().float())["changed"] > 0  # bf16 cannot hold every fp8×scale product


def test_block_size_comes_from_the_config(tmp_path):
    block = (64, 32)
    codes, scale, t_codes, t_scale = _fp8_pair(block)
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    write_checkpoint(tmp_path / "b", {W: codes, W + "_scale_inv": scale}, config=config)
    write_checkpoint(tmp_path / "t", {W: t_codes, W + "_scale_inv": t_scale}, config=config)
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, chunk_elems=7 * 200))
    row = _by_tensor(str(tmp_path / "store"), res.run_id)[W]
    _check(row, ref_diff(dequantize(codes, scale, block), dequantize(t_codes, t_scale, block)))
    assert row["changed_scale_blocks"] == 3 and "64×32 block scales" in row["note"]


@pytest.mark.parametrize("case", ["scale_grid", "config_block"])
def test_mismatched_block_grid_is_a_clear_error(tmp_path, case):
    codes, scale, _, _ = _fp8_pair()
    config = FP8_CONFIG
    if case == "scale_grid":
        scale = scale[:2]  # 300 rows need 3 block rows
    else:
        config = {"quantization_config": {"weight_block_size": [64, 64]}}
    write_checkpoint(tmp_path / "b", {W: codes, W + "_scale_inv": scale}, config=config)
    with pytest.raises(InvalidCheckpoint) as e:
        submit(str(tmp_path / "b"), str(tmp_path / "b"), _opts(tmp_path))
    msg = str(e.value)
    assert W in msg and "weight_block_size" in msg and f"{list(scale.shape)}" in msg
    r = CliRunner().invoke(app, ["submit", str(tmp_path / "b"), str(tmp_path / "b"), "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert W in r.stderr


# -- mixtures of experts -------------------------------------------------------------------

H, I, E = 32, 16, 4


def _moe_layer(prefix: str, g: int, shared: bool = False, router_bias: bool = False) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.mlp.gate.weight": torch.randn(E, H, generator=_g(g))}
    if router_bias:
        out[f"{prefix}.mlp.gate.e_score_correction_bias"] = torch.randn(E, generator=_g(g + 1))
    for e in range(E):
        for j, (p, shape) in enumerate((("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))):
            out[f"{prefix}.mlp.experts.{e}.{p}.weight"] = torch.randn(shape, generator=_g(g + 10 * e + j)).bfloat16()
    if shared:
        for j, (p, shape) in enumerate((("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))):
            out[f"{prefix}.mlp.shared_experts.{p}.weight"] = torch.randn(shape, generator=_g(g + 90 + j)).bfloat16()
    return out


def _attention(prefix: str, g: int, mla: bool = False) -> dict[str, torch.Tensor]:
    names = (("q_a_proj", (8, H)), ("q_a_layernorm", (8,)), ("q_b_proj", (H, 8)), ("kv_a_proj_with_mqa", (12, H)),
             ("kv_a_layernorm", (8,)), ("kv_b_proj", (24, 8)), ("o_proj", (H, H))) if mla else (
        ("q_proj", (H, H)), ("k_proj", (16, H)), ("v_proj", (16, H)), ("o_proj", (H, H)), ("q_norm", (8,)),
        ("k_norm", (8,)))
    return {f"{prefix}.self_attn.{n}.weight": torch.randn(s, generator=_g(g + i)).bfloat16()
            for i, (n, s) in enumerate(names)}


def _tune(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor moved in its own fraction of entries (expert e of a stack in 5·(e+1) %),
    so per-expert figures differ from one another."""
    out = {}
    for i, (name, t) in enumerate(sorted(base.items())):
        if t.ndim == 3:
            out[name] = torch.stack([perturb(t[e], 0.05 * (e + 1), 0.05, 100 + i + e) for e in range(t.shape[0])])
        else:
            out[name] = perturb(t, 0.02 + 0.01 * (i % 7), 0.05, 100 + i)
    return out


def _qwen3_moe() -> tuple[dict, dict]:
    t = {"model.embed_tokens.weight": torch.randn(40, H, generator=_g(0)).bfloat16(),
         "model.norm.weight": torch.ones(H).bfloat16(), "lm_head.weight": torch.randn(40, H, generator=_g(1)).bfloat16()}
    for layer in range(2):
        p = f"model.layers.{layer}"
        t |= _attention(p, 200 * layer + 2) | _moe_layer(p, 200 * layer + 20)
        t[f"{p}.input_layernorm.weight"] = torch.ones(H).bfloat16()
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(H).bfloat16()
    return t, {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": E, "hidden_size": H,
               "moe_intermediate_size": I, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}


def _deepseek() -> tuple[dict, dict]:
    t = {"model.embed_tokens.weight": torch.randn(40, H, generator=_g(0)).bfloat16()}
    t |= _attention("model.layers.0", 2, mla=True) | _attention("model.layers.1", 30, mla=True)
    for j, (p, shape) in enumerate((("gate_proj", (48, H)), ("up_proj", (48, H)), ("down_proj", (H, 48)))):
        t[f"model.layers.0.mlp.{p}.weight"] = torch.randn(shape, generator=_g(60 + j)).bfloat16()  # dense first layer
    t |= _moe_layer("model.layers.1", 70, shared=True, router_bias=True)
    return t, {"architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": E, "first_k_dense_replace": 1}


def _stacked() -> tuple[dict, dict]:
    """transformers' fused expert layout (gpt-oss, Qwen3-MoE in transformers 5): one 3-D tensor
    per projection, experts × rows × cols."""
    t = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        t[f"{p}.router.weight"] = torch.randn(E, H, generator=_g(layer)).bfloat16()
        t[f"{p}.experts.gate_up_proj"] = torch.randn(E, 2 * I, H, generator=_g(10 + layer)).bfloat16()
        t[f"{p}.experts.down_proj"] = torch.randn(E, H, I, generator=_g(20 + layer)).bfloat16()
    return t, {"num_local_experts": E, "hidden_size": H, "intermediate_size": I}


MODULES = {
    "model.layers.1.mlp.gate.weight": ("router", None),
    "model.layers.1.mlp.gate.e_score_correction_bias": ("router", None),
    "model.layers.1.mlp.experts.3.gate_proj.weight": ("expert_gate", 3),
    "model.layers.1.mlp.experts.0.up_proj.weight": ("expert_up", 0),
    "model.layers.1.mlp.experts.2.down_proj.weight": ("expert_down", 2),
    "model.layers.1.mlp.shared_experts.gate_proj.weight": ("shared_gate", None),
    "model.layers.1.mlp.shared_experts.down_proj.weight": ("shared_down", None),
    "model.layers.0.mlp.gate_proj.weight": ("gate", None),
    "model.layers.0.self_attn.q_a_proj.weight": ("q", None),
    "model.layers.0.self_attn.q_a_layernorm.weight": ("norm", None),
    "model.layers.0.self_attn.o_proj.weight": ("o", None),
    "model.layers.0.mlp.router.weight": ("router", None),
    "model.layers.0.mlp.experts.gate_up_proj": ("expert_gate_up", None),
    "model.layers.1.mlp.experts.down_proj": ("expert_down", None),
    "model.layers.0.mlp.shared_expert.up_proj.weight": ("shared_up", None),
    "model.layers.0.mlp.shared_expert_gate.weight": ("shared_router", None),
    "model.layers.0.block_sparse_moe.gate.weight": ("router", None),
    "model.layers.0.block_sparse_moe.experts.5.w1.weight": ("expert_gate", 5),
    "model.layers.0.block_sparse_moe.experts.5.w3.weight": ("expert_up", 5),
    "model.layers.0.self_attn.qkv_proj.weight": ("qkv", None),
    "model.layers.0.mlp.gate_up_proj.weight": ("gate_up", None),
}


def test_tensor_modules_know_routers_experts_and_shared_experts(tmp_path):
    names = {n: torch.zeros(2, 2).bfloat16() for n in MODULES}
    write_checkpoint(tmp_path / "b", names)
    res = submit(str(tmp_path / "b"), str(tmp_path / "b"), _opts(tmp_path, rank="off"))
    _, rows = query(str(tmp_path / "store"), f"SELECT tensor, module, expert, layer FROM tensor_modules "
                                              f"WHERE run_id = '{res.run_id}'")
    got = {t: (m, e) for t, m, e, _ in rows}
    assert got == MODULES
    assert {t: layer for t, _, _, layer in rows} == {n: int(n.split(".")[2]) for n in MODULES}


#: Other families' names as their published checkpoints spell them: tensor → (module, layer)
FAMILIES = {
    # GPT-2 as openai-community/gpt2's model.safetensors writes it (no `transformer.` prefix),
    # and as GPT2LMHeadModel saves a finetune: attention's c_proj is o, the MLP's is down
    "h.0.attn.c_attn.weight": ("qkv", 0), "h.0.attn.c_proj.weight": ("o", 0), "h.0.mlp.c_fc.weight": ("up", 0),
    "h.0.mlp.c_proj.weight": ("down", 0), "h.11.ln_1.weight": ("norm", 11), "ln_f.weight": ("norm", None),
    "wte.weight": ("embed", None), "transformer.h.3.mlp.c_proj.weight": ("down", 3),
    "transformer.ln_f.bias": ("norm", None),
    # GPT-NeoX / Pythia (embed_out is the output head), Falcon, GPT-J, OPT
    "gpt_neox.layers.4.attention.query_key_value.weight": ("qkv", 4), "gpt_neox.layers.4.attention.dense.weight": ("o", 4),
    "gpt_neox.layers.4.mlp.dense_h_to_4h.weight": ("up", 4), "gpt_neox.layers.4.mlp.dense_4h_to_h.weight": ("down", 4),
    "gpt_neox.embed_in.weight": ("embed", None), "embed_out.weight": ("lm_head", None),
    "transformer.h.2.self_attention.dense.weight": ("o", 2), "transformer.h.2.ln_mlp.weight": ("norm", 2),
    "transformer.h.5.mlp.fc_in.weight": ("up", 5), "transformer.h.5.mlp.fc_out.weight": ("down", 5),
    "model.decoder.layers.6.fc1.weight": ("up", 6), "model.decoder.layers.6.self_attn.out_proj.weight": ("o", 6),
    # BERT's LayerNorm, RWKV's blocks at the top, Meta's original Llama names, T5's block index
    "bert.encoder.layer.3.attention.output.LayerNorm.weight": ("norm", 3), "blocks.7.att.key.weight": ("k", 7),
    "layers.9.attention.wq.weight": ("q", 9), "output.weight": ("lm_head", None),
    "encoder.block.2.layer.1.DenseReluDense.wo.weight": ("down", 2),
    "decoder.block.0.layer.2.DenseReluDense.wi_0.weight": ("gate", 0),
    "decoder.block.0.layer.2.DenseReluDense.wi_1.weight": ("up", 0),
}


def test_tensor_modules_know_the_names_of_other_families(tmp_path):
    """Layer index and module kind of GPT-2 (bare and prefixed), GPT-NeoX, Falcon, GPT-J,
    OPT, BERT, RWKV, Meta-format Llama and T5 names: a stack at the top of the name counts."""
    names = {n: torch.zeros(2, 2).bfloat16() for n in FAMILIES}
    write_checkpoint(tmp_path / "b", names)
    res = submit(str(tmp_path / "b"), str(tmp_path / "b"), _opts(tmp_path, rank="off"))
    _, rows = query(str(tmp_path / "store"), f"SELECT tensor, module, layer FROM tensor_modules "
                                              f"WHERE run_id = '{res.run_id}'")
    assert {t: (m, layer) for t, m, layer in rows} == FAMILIES


def _expected_experts(base, tuned):
    """(layer, expert, module) → (numel, changed, rank ratio), from torch on the same tensors."""
    out = {}
    kind = {"gate_proj": "expert_gate", "up_proj": "expert_up", "down_proj": "expert_down",
            "gate_up_proj": "expert_gate_up"}
    for name, b in base.items():
        if ".experts." not in name:
            continue
        layer = int(name.split(".")[2])
        if b.ndim == 3:
            module = kind[name.rsplit(".", 1)[-1]]
            for e in range(b.shape[0]):
                ref = ref_diff(b[e].contiguous(), tuned[name][e].contiguous())
                out[(layer, e, module)] = (ref["numel"], ref["changed"], ref["rank"] / min(b.shape[1:]))
        else:
            e, proj = int(name.split(".")[5]), name.split(".")[6]
            ref = ref_diff(b, tuned[name])
            out[(layer, e, kind[proj])] = (ref["numel"], ref["changed"], ref["rank"] / min(b.shape))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek", "stacked"])
def test_experts_view_gives_sparsity_and_rank_per_layer_and_expert(tmp_path, family):
    base, config = {"qwen3_moe": _qwen3_moe, "deepseek": _deepseek, "stacked": _stacked}[family]()
    tuned = _tune(base)
    write_checkpoint(tmp_path / "b", base, shards=3, config=config)
    write_checkpoint(tmp_path / "t", tuned, shards=2, config=config)
    # units of 35 or 70 rows: a stack's experts (32 rows each) end mid-unit unless units restart per expert
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, chunk_elems=35 * 32))
    store = str(tmp_path / "store")
    want = _expected_experts(base, tuned)
    _, rows = query(store, f"SELECT layer, expert, module, n_matrices, numel, changed, sparsity, mean_rank_ratio "
                           f"FROM experts WHERE run_id = '{res.run_id}'")
    per_module = {(r[0], r[1], r[2]): r[3:] for r in rows if r[2] != "*"}
    assert set(per_module) == set(want)
    for key, (numel, changed, ratio) in want.items():
        n, got_numel, got_changed, sparsity, got_ratio = per_module[key]
        assert (n, got_numel, got_changed) == (1, numel, changed), key
        assert sparsity == pytest.approx(1 - changed / numel, abs=1e-12)
        assert got_ratio == pytest.approx(ratio, abs=1e-12), key
    for (layer, expert, module), r in ((k, v) for k, v in ((r[:3], r[3:]) for r in rows) if k[2] == "*"):
        parts = [v for (l2, e2, _), v in want.items() if (l2, e2) == (layer, expert)]
        assert r[0] == len(parts) and r[1] == sum(p[0] for p in parts) and r[2] == sum(p[1] for p in parts)
    assert len({(k[0], k[1]) for k in want}) == len([r for r in rows if r[2] == "*"])
    # every other tensor is still counted as itself
    tensors = _by_tensor(store, res.run_id)
    assert set(tensors) == set(base)
    for name, b in base.items():
        ref = ref_diff(b, tuned[name])
        for k in _COUNTS:
            assert tensors[name][k] == ref[k], (name, k)
        assert tensors[name]["status"] == "ok" and tensors[name]["match"] == "exact"
    if family == "stacked":
        _, spectra = query(store, f"SELECT tensor, expert, rank FROM spectra WHERE run_id = '{res.run_id}' "
                                  "AND expert IS NOT NULL ORDER BY tensor, expert")
        stacks = [n for n, t in base.items() if t.ndim == 3]
        assert [(t, e) for t, e, _ in spectra] == [(n, e) for n in sorted(stacks) for e in range(E)]
        for t, e, rank in spectra:
            assert rank == int(torch.linalg.matrix_rank((tuned[t][e] - base[t][e]).float())), (t, e)
        assert all("a stack of 4 experts" in tensors[n]["note"] and tensors[n]["rank"] is None for n in stacks)
        _, units = query(store, f"SELECT u.\"start\", u.\"stop\", p.numel // p.experts FROM units u JOIN plan p "
                                f"USING (run_id, tensor_index) WHERE run_id = '{res.run_id}' AND p.experts > 0")
        assert units and all(a // per == (b - 1) // per for a, b, per in units)  # no unit straddles two experts


def _per_expert_and_stacked(fused_parts: bool = False, mixtral: bool = False) -> tuple[dict, dict]:
    """One MoE layer as transformers 4 saved it (``experts.{e}.gate_proj.weight`` …, each
    expert's ``gate_up_proj.weight``, or Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``)
    and as transformers 5 does (``mlp.experts.gate_up_proj``, experts × 2I × H with each
    expert's gate rows first, and ``mlp.experts.down_proj``)."""
    layer = _moe_layer("model.layers.0", 40)
    p = "model.layers.0.mlp.experts"
    gate_up = torch.stack([torch.cat([layer[f"{p}.{e}.gate_proj.weight"], layer[f"{p}.{e}.up_proj.weight"]])
                           for e in range(E)])
    stacked = {"model.layers.0.mlp.gate.weight": layer["model.layers.0.mlp.gate.weight"],
               f"{p}.gate_up_proj": gate_up,
               f"{p}.down_proj": torch.stack([layer[f"{p}.{e}.down_proj.weight"] for e in range(E)])}
    if fused_parts:
        for e in range(E):
            layer[f"{p}.{e}.gate_up_proj.weight"] = gate_up[e].clone()
            del layer[f"{p}.{e}.gate_proj.weight"], layer[f"{p}.{e}.up_proj.weight"]
    if mixtral:
        w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
        layer = {(n.replace(".mlp.experts.", ".block_sparse_moe.experts.").replace(n.split(".")[-2], w[n.split(".")[-2]])
                  if ".experts." in n else n): t for n, t in layer.items()}
    return layer, stacked


@pytest.mark.parametrize("stack_side,layout", [("tuned", "qwen"), ("base", "qwen"), ("tuned", "gate_up"),
                                               ("base", "mixtral")])
def test_a_stack_of_experts_pairs_expert_by_expert_with_per_expert_tensors(tmp_path, stack_side, layout):
    """Transformers 5's stacks against transformers 4's per-expert tensors: every expert's
    gate, up and down rows of the stack pair with that expert's tensors, counted and ranked
    as the reference does on the same slices; the experts view has every expert."""
    fused_parts, mixtral = layout == "gate_up", layout == "mixtral"
    per_expert, stacked = _per_expert_and_stacked(fused_parts, mixtral)
    stacked = _tune(stacked)  # the finetune moved each expert of a stack by its own fraction
    b, t = (stacked, per_expert) if stack_side == "base" else (per_expert, stacked)
    config = {"num_experts": E, "hidden_size": H, "moe_intermediate_size": I}
    write_checkpoint(tmp_path / "b", b, config=config)
    write_checkpoint(tmp_path / "t", t, config=config)
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, chunk_elems=1024))
    store = str(tmp_path / "store")
    rows = _by_tensor(store, res.run_id)
    p = "model.layers.0.mlp.experts"
    for name in (f"{p}.gate_up_proj", f"{p}.down_proj"):
        assert (rows[name]["status"], rows[name]["match"]) == ("fused", "none")
        assert rows[name]["note"].startswith(f"stack of {E} experts in {stack_side}; compared expert by expert")
    parts = (("gate_up_proj", 0, 2 * I),) if fused_parts else (("gate_proj", 0, I), ("up_proj", I, 2 * I))
    down = "down_proj"
    q = p
    if mixtral:
        parts, down, q = (("w1", 0, I), ("w3", I, 2 * I)), "w2", "model.layers.0.block_sparse_moe.experts"
    slices = {f"{q}.{e}.{part}.weight": (f"{p}.gate_up_proj", e, a, z) for e in range(E) for part, a, z in parts}
    slices |= {f"{q}.{e}.{down}.weight": (f"{p}.down_proj", e, 0, H) for e in range(E)}
    assert set(slices) == set(per_expert) - {"model.layers.0.mlp.gate.weight"}
    for name, (stack, e, a, z) in slices.items():
        piece = stacked[stack][e, a:z]
        ref = ref_diff(piece, per_expert[name]) if stack_side == "base" else ref_diff(per_expert[name], piece)
        row = rows[name]
        assert (row["status"], row["match"]) == ("ok", "fused_slice"), name
        assert row["note"] == f"expert {e}, rows {a}…{z - 1} of {stack_side}'s stack of experts {stack!r}", name
        for k in _COUNTS:
            assert row[k] == ref[k], (name, k)
        assert row["rank"] == ref["rank"], name
    _, experts = query(store, f"SELECT DISTINCT expert FROM experts WHERE run_id = '{res.run_id}' AND expert IS NOT NULL")
    assert sorted(e for (e,) in experts) == list(range(E))
    assert res.matching.startswith(f"{len(slices) + 1} tensors compared: {len(slices)} fused_slice, 1 exact")


@pytest.mark.parametrize("case", ["rows+", "rows-", "cols+", "cols-", "2-D", "large"])
def test_a_stack_pairs_only_with_per_expert_tensors_that_add_up_to_it(tmp_path, case):
    """A stack with two rows more, or fewer, per expert than the other side's gate and up,
    per-expert tensors one column wider or narrower, or a 2-D tensor under a stack's name:
    nothing is split, each side keeps its own tensors, listed. Sizes past 256 (``large``,
    320 rows an expert) pair."""
    e_, i_, h_ = (2, 160, 8) if case == "large" else (E, I, H)
    g = _g(3)
    wide = {"cols+": 1, "cols-": -1}.get(case, 0)
    per = {f"m.mlp.experts.{e}.{p}.weight": torch.randn(i_, h_ + wide, generator=g).bfloat16()
           for e in range(e_) for p in ("gate_proj", "up_proj")}
    rows = 2 * i_ + {"rows+": 2, "rows-": -2}.get(case, 0)
    stack = {"m.mlp.experts.gate_up_proj": torch.randn(e_, rows, h_, generator=g).bfloat16()}
    if case == "2-D":
        stack = {"m.mlp.experts.gate_up_proj": torch.randn(e_ * rows, h_, generator=g).bfloat16()}
    stack["m.conv.weight"] = torch.randn(4, 3, 3, generator=g)  # 3-D, no stack's name, only in tuned
    write_checkpoint(tmp_path / "b", per)
    write_checkpoint(tmp_path / "t", stack)
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, rank="off"))
    got = {n: (r["status"], r["match"]) for n, r in _by_tensor(str(tmp_path / "store"), res.run_id).items()}
    assert got.pop("m.conv.weight") == ("only_in_tuned", "none")
    if case == "large":
        assert got["m.mlp.experts.gate_up_proj"] == ("fused", "none")
        assert all(got[n] == ("ok", "fused_slice") for n in per) and len(got) == len(per) + 1
    else:
        assert got == {"m.mlp.experts.gate_up_proj": ("only_in_tuned", "none")} | {n: ("only_in_base", "none")
                                                                                     for n in per}


# -- fused projections ---------------------------------------------------------------------

P = "model.layers.0"
GQA = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48}
SPLIT = {"self_attn.q_proj": 32, "self_attn.k_proj": 16, "self_attn.v_proj": 16}
MLP = {"mlp.gate_proj": 48, "mlp.up_proj": 48}


def _split_and_fused(bias: bool):
    g = _g(7)
    split = {}
    for part, rows in (SPLIT | MLP).items():
        split[f"{P}.{part}.weight"] = torch.randn(rows, 32, generator=g).bfloat16()
        if bias and part in SPLIT:
            split[f"{P}.{part}.bias"] = torch.randn(rows, generator=g).bfloat16()
    fused = {f"{P}.self_attn.qkv_proj.weight": torch.cat([split[f"{P}.{p}.weight"] for p in SPLIT]),
             f"{P}.mlp.gate_up_proj.weight": torch.cat([split[f"{P}.{p}.weight"] for p in MLP])}
    if bias:
        fused[f"{P}.self_attn.qkv_proj.bias"] = torch.cat([split[f"{P}.{p}.bias"] for p in SPLIT])
    return split, fused


@pytest.mark.parametrize("fused_side,config", [("base", GQA), ("tuned", GQA), ("tuned", {})],
                         ids=["fused-base", "fused-tuned", "no-config"])
def test_fused_projections_pair_with_their_split_twins(tmp_path, fused_side, config):
    split, fused = _split_and_fused(bias=True)
    fused = {n: perturb(t, 0.1, 0.05, 30 + i) for i, (n, t) in enumerate(sorted(fused.items()))}  # the RL stack's copy
    b, t = (fused, split) if fused_side == "base" else (split, fused)
    write_checkpoint(tmp_path / "b", b, config=config)
    write_checkpoint(tmp_path / "t", t, config=config)
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, chunk_elems=1024))
    rows = _by_tensor(str(tmp_path / "store"), res.run_id)
    assert set(rows) == set(split) | set(fused)
    for name in fused:
        assert (rows[name]["status"], rows[name]["match"]) == ("fused", "none")
        assert f"fused in {fused_side}" in rows[name]["note"]
    offsets = {}
    for group, whole in ((SPLIT, "self_attn.qkv_proj"), (MLP, "mlp.gate_up_proj")):
        start = 0
        for part, n in group.items():
            offsets[part] = (whole, start, start + n)
            start += n
    for name in split:
        part, kind = name[len(P) + 1:].rsplit(".", 1)
        whole, first, end = offsets[part]
        whole = f"{P}.{whole}.{kind}"
        piece = fused[whole][first:end]
        ref = ref_diff(split[name], piece) if fused_side == "tuned" else ref_diff(piece, split[name])
        row = rows[name]
        assert (row["status"], row["match"]) == ("ok", "fused_slice"), name
        assert f"rows {first}…{end - 1} of {fused_side}'s fused {whole!r}" in row["note"]
        for k in _COUNTS:
            assert row[k] == ref[k], (name, k)
        if kind == "weight":
            assert row["rank"] == ref["rank"], name
    assert "8 fused_slice" in res.matching


def test_fused_projection_whose_sizes_disagree_stays_unpaired(tmp_path):
    split, fused = _split_and_fused(bias=False)
    wrong = dict(GQA, num_key_value_heads=4)  # 4 kv heads: q, k, v of 32 rows each ≠ 64
    write_checkpoint(tmp_path / "b", split, config=wrong)
    write_checkpoint(tmp_path / "t", fused, config=wrong)
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, rank="off"))
    rows = _by_tensor(str(tmp_path / "store"), res.run_id)
    assert rows[f"{P}.self_attn.qkv_proj.weight"]["status"] == "only_in_tuned"
    assert {rows[f"{P}.{p}.weight"]["status"] for p in SPLIT} == {"only_in_base"}
    assert rows[f"{P}.mlp.gate_up_proj.weight"]["status"] == "fused"  # the MLP's sizes still add up


@pytest.mark.parametrize("case", ["fp8", "fused"])
def test_strict_refuses_every_layout_decision(tmp_path, case):
    if case == "fp8":
        codes, scale, t_codes, t_scale = _fp8_pair()
        b, t, config = {W: codes, W + "_scale_inv": scale}, {W: t_codes, W + "_scale_inv": t_scale}, FP8_CONFIG
        want = ("block_scale", "fp8_block_scaled")
    else:
        b, t = _split_and_fused(bias=False)
        config, want = GQA, ("fused", "fused_slice")
    write_checkpoint(tmp_path / "b", b, config=config)
    write_checkpoint(tmp_path / "t", t, config=config)
    with pytest.raises(PlanProblem) as e:
        submit(str(tmp_path / "b"), str(tmp_path / "t"), SubmitOptions(store=str(tmp_path / "s"), strict=True))
    assert all(w in str(e.value) for w in want), str(e.value)
    assert not (tmp_path / "s").exists()
