"""Real checkpoints as they are: tied embeddings, resized vocabularies, renames, mixed precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from builders import ref_diff, write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import PlanProblem
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
from raydiff.run.submit import submit
from raydiff.query.views import query

pytestmark = pytest.mark.usefixtures("ray_cluster")
EMB, HEAD, Q = "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _changed(t: torch.Tensor, frac: float, seed: int) -> torch.Tensor:
    g = _g(seed)
    out = t.clone()
    m = torch.rand(t.shape, generator=g) < frac
    out[m] = (out[m].float() * 1.5 + 0.01).to(t.dtype)
    return out


def _rows(store, run_id):
    cols, rows = query(store, f"SELECT * FROM tensors WHERE run_id = '{run_id}' ORDER BY tensor_index")
    return [dict(zip(cols, r)) for r in rows]


def _check_counts(row, base, tuned):
    ref = ref_diff(base, tuned)
    for k in ("numel", "changed", "changed_bits", "changed_rel", "changed_1e6", "changed_1e4"):
        assert row[k] == ref[k], (row["tensor"], k)


def _opts(tmp_path, **kw):
    return SubmitOptions(store=str(tmp_path / "store"), diff=DiffOptions(chunk_elems=1024, **kw))


@pytest.mark.parametrize("side", ["base", "tuned"])
def test_tied_lm_head_is_compared_against_the_embedding(tmp_path, side):
    emb = torch.randn(50, 16, generator=_g()).bfloat16()
    q = torch.randn(16, 16, generator=_g(1)).bfloat16()
    tied = {EMB: emb, Q: q}
    untied = {EMB: _changed(emb, 0.2, 2), Q: _changed(q, 0.3, 3), HEAD: _changed(emb, 0.4, 4)}
    b, t = (tied, untied) if side == "base" else (untied, tied)
    write_checkpoint(tmp_path / "b", b, config={"tie_word_embeddings": side == "base"})
    write_checkpoint(tmp_path / "t", t, config={"tie_word_embeddings": side == "tuned"})
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path))
    rows = {r["tensor"]: r for r in _rows(str(tmp_path / "store"), res.run_id)}
    head = rows[HEAD]
    assert (head["status"], head["match"]) == ("ok", f"tied_in_{side}")
    assert f"{side} has no lm_head.weight; its config ties it to {EMB}" in head["note"]
    _check_counts(head, b.get(HEAD, b[EMB]), t.get(HEAD, t[EMB]))
    _check_counts(rows[EMB], b[EMB], t[EMB])
    assert rows[EMB]["match"] == "exact"
    assert f"1 tied_in_{side}" in res.matching


def test_missing_lm_head_without_tie_stays_unmatched(tmp_path):
    emb = torch.randn(50, 16, generator=_g()).bfloat16()
    write_checkpoint(tmp_path / "b", {EMB: emb}, config={"tie_word_embeddings": False})
    write_checkpoint(tmp_path / "t", {EMB: emb, HEAD: emb.clone()}, config={})
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path))
    rows = {r["tensor"]: r for r in _rows(str(tmp_path / "store"), res.run_id)}
    assert (rows[HEAD]["status"], rows[HEAD]["match"]) == ("only_in_tuned", "none")
    assert "not compared: only_in_tuned 1 (lm_head.weight)" in res.matching


def test_resized_vocabulary_compares_common_rows_and_reports_added_ones(tmp_path):
    emb = torch.randn(100, 16, generator=_g()).bfloat16()
    new_rows = torch.randn(8, 16, generator=_g(5)).bfloat16()
    tuned_emb = torch.cat([_changed(emb, 0.25, 6), new_rows])
    write_checkpoint(tmp_path / "b", {EMB: emb, HEAD: emb.clone()})
    write_checkpoint(tmp_path / "t", {EMB: tuned_emb, HEAD: torch.cat([emb, new_rows])[:104]})
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path))
    rows = _rows(str(tmp_path / "store"), res.run_id)
    emb_rows = [r for r in rows if r["tensor"] == EMB]
    assert [(r["status"], r["match"]) for r in emb_rows] == [("ok", "resized_rows"), ("rows_only_in_tuned", "resized_rows")]
    _check_counts(emb_rows[0], emb, tuned_emb[:100])
    assert emb_rows[0]["shape"] == [100, 16] and emb_rows[0]["rank"] is not None
    extra = emb_rows[1]
    assert extra["numel"] == 8 * 16 and extra["shape"] == [8, 16] and extra["changed"] is None
    assert "rows 100…107 (8 rows) exist only in tuned: shape [100, 16] in base, [108, 16] in tuned" in extra["note"]
    head_rows = [r for r in rows if r["tensor"] == HEAD]
    assert head_rows[0]["changed"] == 0 and head_rows[1]["numel"] == 4 * 16
    cols, runs = query(str(tmp_path / "store"), f"SELECT numel FROM runs WHERE run_id = '{res.run_id}'")
    assert runs[0][0] == 2 * 100 * 16  # only compared elements count towards the run's sparsity


def test_renamed_prefixes_pair_with_rename_rules_or_on_their_own(tmp_path):
    """Names that differ by one prefix pair: with a --rename rule, or without one, when the
    rewrite pairs them all (the note says so); the counts are the reference's either way."""
    base = {EMB: torch.randn(20, 8, generator=_g()).bfloat16(), Q: torch.randn(8, 8, generator=_g(1)).bfloat16(),
            HEAD: torch.randn(20, 8, generator=_g(2)).bfloat16()}
    tuned = {k.replace("model.", "model.language_model.", 1): _changed(v, 0.3, 7) for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    auto = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path))
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path, rename=(("model.language_model.", "model."),)))
    assert res.run_id != auto.run_id
    for run, found in ((auto, True), (res, False)):
        rows = {r["tensor"]: r for r in _rows(str(tmp_path / "store"), run.run_id)}
        assert set(rows) == set(base)
        for name, t in base.items():
            _check_counts(rows[name], t, tuned[name.replace("model.", "model.language_model.", 1)])
            if name == HEAD:  # the same in both: paired as it is
                assert (rows[name]["match"], rows[name]["note"]) == ("exact", "")
                continue
            note = f"renamed from {name.replace('model.', 'model.language_model.', 1)!r} in tuned"
            if found:
                note += ("; tuned's names begin 'model.language_model.' where base's begin 'model.', found without "
                         "--rename (give --rename to choose the rules)")
            assert (rows[name]["match"], rows[name]["note"]) == ("renamed", note)
        assert run.matching == "3 tensors compared: 2 renamed, 1 exact"


def test_a_gpt2_base_meets_the_finetune_transformers_saves(tmp_path):
    """openai-community/gpt2 names its tensors ``h.0.…``, ``wte.weight`` and has no head (its
    config ties it); a finetune saved by GPT2LMHeadModel names them ``transformer.h.0.…`` and
    may save ``lm_head.weight``. Every tensor pairs, the head against base's ``wte``, the
    base's attention-mask buffers stay only in base, and the layers view has layer 0."""
    g = _g(5)
    base = {"wte.weight": torch.randn(50, 16, generator=g), "wpe.weight": torch.randn(8, 16, generator=g),
            "h.0.attn.c_attn.weight": torch.randn(16, 48, generator=g), "h.0.attn.c_proj.weight": torch.randn(16, 16, generator=g),
            "h.0.mlp.c_fc.weight": torch.randn(16, 64, generator=g), "h.0.mlp.c_proj.weight": torch.randn(64, 16, generator=g),
            "h.0.ln_1.weight": torch.randn(16, generator=g), "ln_f.weight": torch.randn(16, generator=g)}
    mask = {"h.0.attn.bias": torch.ones(1, 1, 8, 8)}
    tuned = {"transformer." + k: _changed(v, 0.25, i) for i, (k, v) in enumerate(base.items())}
    tuned["lm_head.weight"] = tuned["transformer.wte.weight"].clone()
    write_checkpoint(tmp_path / "b", {**base, **mask}, config={"tie_word_embeddings": True})
    write_checkpoint(tmp_path / "t", tuned, config={"tie_word_embeddings": True})
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path))
    assert res.matching == ("9 tensors compared: 8 renamed, 1 tied_in_base; not compared: only_in_base 1 "
                            "(h.0.attn.bias)")
    rows = {r["tensor"]: r for r in _rows(str(tmp_path / "store"), res.run_id)}
    for name, t in base.items():
        _check_counts(rows[name], t, tuned["transformer." + name])
    _check_counts(rows[HEAD], base["wte.weight"], tuned[HEAD])
    _, layers = query(str(tmp_path / "store"), f"SELECT module, changed FROM layers WHERE run_id = '{res.run_id}' "
                                               "AND layer = 0 AND module != '*' ORDER BY module")
    want = {m: ref_diff(base[n], tuned["transformer." + n])["changed"] for m, n in
            (("qkv", "h.0.attn.c_attn.weight"), ("o", "h.0.attn.c_proj.weight"), ("up", "h.0.mlp.c_fc.weight"),
             ("down", "h.0.mlp.c_proj.weight"), ("norm", "h.0.ln_1.weight"))}
    assert dict(layers) == want


def test_no_prefix_is_guessed_from_a_few_names(tmp_path):
    """A value head only the finetune has (``v_head.summary.…``), or two renamed tensors among
    many that pair as they are, are no evidence of a prefix: nothing is renamed."""
    g = _g(6)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 8, generator=g).bfloat16() for i in range(4)}
    tuned = {k: _changed(v, 0.3, 1) for k, v in base.items()}
    tuned |= {"v_head.summary.weight": torch.randn(1, 8, generator=g), "v_head.summary.bias": torch.randn(1, generator=g)}
    base |= {"old.a.weight": torch.randn(2, 2, generator=g), "old.b.weight": torch.randn(2, 2, generator=g)}
    tuned |= {"new.a.weight": torch.randn(2, 2, generator=g), "new.b.weight": torch.randn(2, 2, generator=g)}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path))
    assert res.matching == ("4 tensors compared: 4 exact; not compared: only_in_tuned 4 (new.a.weight, new.b.weight, "
                            "v_head.summary.bias, v_head.summary.weight); only_in_base 2 (old.a.weight, old.b.weight)")


def test_rename_collisions_are_refused(tmp_path):
    write_checkpoint(tmp_path / "b", {"a.x": torch.zeros(4), "b.x": torch.zeros(4)})
    with pytest.raises(PlanProblem, match="^rename maps both 'a.x' and 'b.x' of base to 'c.x'") as e:
        submit(str(tmp_path / "b"), str(tmp_path / "b"), _opts(tmp_path, rename=(("a.", "c."), ("b.", "c."))))
    assert e.value.for_option("--rename").startswith("--rename maps both")  # as the CLI says it
    r = CliRunner().invoke(app, ["submit", str(tmp_path / "b"), str(tmp_path / "b"), "--store", str(tmp_path / "s"),
                                 "--rename", "a.=c.", "--rename", "b.=c."])
    assert r.exit_code == 1 and r.stderr.startswith("Error: --rename maps both 'a.x' and 'b.x' of base to 'c.x'")
    r = CliRunner().invoke(app, ["submit", "a", "b", "--rename", "nothing"])
    assert r.exit_code == 1 and r.stderr.strip() == (
        "Error: --rename rules are OLD=NEW with a non-empty OLD prefix, got 'nothing'")


def test_fp32_finetune_of_bf16_base_separates_storage_noise(tmp_path):
    g = _g(11)
    base = torch.randn(64, 32, generator=g).bfloat16()
    tuned = base.float()
    noise = torch.rand(base.shape, generator=g) < 0.3  # below bf16 precision: vanishes on a bf16 re-save
    tuned[noise] += tuned[noise].abs() * 2.0 ** -12
    real = torch.rand(base.shape, generator=g) < 0.1  # real updates
    tuned[real] = tuned[real] * 1.1 + 0.01
    write_checkpoint(tmp_path / "b", {Q: base})
    write_checkpoint(tmp_path / "t", {Q: tuned})
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), _opts(tmp_path))
    (row,) = _rows(str(tmp_path / "store"), res.run_id)
    assert (row["match"], row["compare_dtype"]) == ("dtype_widened", "F32")
    assert row["note"] == "BF16 vs F32, compared in F32"
    _check_counts(row, base, tuned)
    differs = tuned.numpy() != base.float().numpy()
    erased = tuned.bfloat16().view(torch.int16).numpy() == base.view(torch.int16).numpy()
    assert row["changed_subprecision"] == int((differs & erased).sum()) > 0
    cols, rows = query(str(tmp_path / "store"), "SELECT changed_subprecision FROM tensors WHERE match = 'exact'")
    assert rows == []


def test_strict_refuses_any_decision(tmp_path):
    emb = torch.randn(10, 4, generator=_g()).bfloat16()
    write_checkpoint(tmp_path / "b", {EMB: emb})
    write_checkpoint(tmp_path / "t", {EMB: emb.float()})
    with pytest.raises(PlanProblem, match=r"^strict: 1 tensors are not matched exactly: model.embed_tokens.weight "
                                          r"\(dtype_widened: BF16 vs F32, compared in F32\)\. "
                                          r"Without strict they are analysed with these decisions recorded$"):
        submit(str(tmp_path / "b"), str(tmp_path / "t"), SubmitOptions(store=str(tmp_path / "s"), strict=True))
    r = CliRunner().invoke(app, ["submit", str(tmp_path / "b"), str(tmp_path / "t"), "--strict", "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: --strict: 1 tensors are not matched exactly")
    assert not (tmp_path / "s").exists()  # refused before anything was written: not even the store's folder
    write_checkpoint(tmp_path / "t2", {EMB: emb.clone()})
    ok = submit(str(tmp_path / "b"), str(tmp_path / "t2"), SubmitOptions(store=str(tmp_path / "s"), strict=True))
    assert ok.matching == "1 tensors compared: 1 exact"


@pytest.mark.parametrize("decision", ["renamed", "tied_in_base", "resized_rows", "only_in_tuned", "shape_mismatch",
                                      "dtype_mismatch"])
def test_strict_refuses_every_kind_of_decision(tmp_path, decision):
    """Each decision the matcher can take (a match other than exact, or a status other than
    ok) is refused by --strict, named with the tensor, and nothing is written."""
    w = torch.randn(10, 4, generator=_g(9)).bfloat16()
    diff, config = DiffOptions(), None
    base, tuned, name = {EMB: w}, {EMB: w.clone()}, EMB
    if decision == "renamed":
        base, tuned = {"old." + EMB: w}, {EMB: w.clone()}
        diff = DiffOptions(rename=(("old.", ""),))
    elif decision == "tied_in_base":
        tuned[HEAD], name, config = w.clone(), HEAD, {"tie_word_embeddings": True}
    elif decision == "resized_rows":
        tuned[EMB] = torch.cat([w, w[:2]])
    elif decision == "only_in_tuned":
        tuned[Q], name = w.clone(), Q
    elif decision == "shape_mismatch":
        tuned[EMB] = w.reshape(4, 10).clone()
    else:
        tuned[EMB] = w.view(torch.int16).clone()  # a float against integers: not compared
    write_checkpoint(tmp_path / "b", base, config=config)
    write_checkpoint(tmp_path / "t", tuned, config=config)
    with pytest.raises(PlanProblem, match=rf"^strict: \d+ tensors are not matched exactly: {name} \({decision}: "):
        submit(str(tmp_path / "b"), str(tmp_path / "t"),
               SubmitOptions(store=str(tmp_path / "s"), strict=True, diff=diff))
    assert not (tmp_path / "s").exists()
    # without --strict the same pair is analysed, with the decision recorded
    res = submit(str(tmp_path / "b"), str(tmp_path / "t"), SubmitOptions(store=str(tmp_path / "s"), diff=diff,
                                                                          cluster=ClusterOptions(backend="local")))
    _, rows = query(str(tmp_path / "s"), "SELECT status, match FROM plan WHERE run_id = ? AND tensor = ?",
                    [res.run_id, name])
    assert decision in rows[0]


@pytest.mark.parametrize("odd", [2, 3, 4, 6])
def test_strict_names_three_decisions_and_counts_the_rest(tmp_path, odd):
    g = _g(5)
    base = {f"t{i}": torch.randn(4, generator=g).bfloat16() for i in range(6)}
    tuned = {k: (v.float() if i < odd else v.clone()) for i, (k, v) in enumerate(base.items())}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    with pytest.raises(PlanProblem) as e:
        submit(str(tmp_path / "b"), str(tmp_path / "t"), SubmitOptions(store=str(tmp_path / "s"), strict=True))
    shown = str(e.value).split(": ", 2)[2].split(". Without strict")[0].split("; ")
    assert str(e.value).startswith(f"strict: {odd} tensors are not matched exactly")
    named = min(odd, 3)  # three named at most, then how many more
    assert [x.split(" ")[0] for x in shown[:named]] == [f"t{i}" for i in range(named)]
    assert shown[named:] == ([f"… {odd - 3} more"] if odd > 3 else [])


def test_single_file_against_oddly_named_shards_with_metadata(tmp_path):
    g = _g(3)
    base = {EMB: torch.randn(30, 8, generator=g).bfloat16(), Q: torch.randn(8, 8, generator=g).bfloat16(),
            "model.norm.weight": torch.ones(8).bfloat16()}
    tuned = {k: _changed(v, 0.2, i) for i, (k, v) in enumerate(base.items())}
    write_checkpoint(tmp_path / "b", base)
    (tmp_path / "t").mkdir()
    save_file({EMB: tuned[EMB]}, str(tmp_path / "t" / "weights-a.safetensors"), metadata={"format": "pt", "x": "1"})
    save_file({k: tuned[k] for k in (Q, "model.norm.weight")}, str(tmp_path / "t" / "weights-b.safetensors"))
    (tmp_path / "t" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    res = submit(str(tmp_path / "b" / "model.safetensors"), str(tmp_path / "t"), _opts(tmp_path))
    rows = {r["tensor"]: r for r in _rows(str(tmp_path / "store"), res.run_id)}
    for k in base:
        _check_counts(rows[k], base[k], tuned[k])
    assert res.matching == "3 tensors compared: 3 exact"
    assert np.isclose(rows[EMB]["sparsity"], 1 - ref_diff(base[EMB], tuned[EMB])["changed"] / base[EMB].numel())
