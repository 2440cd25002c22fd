"""The planner alone (no Ray): every tensor of either side gets a row, every decision its
status, and the units tile each compared tensor exactly, on whole rows, at offsets that
depend only on the shape and the chunk size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import write_checkpoint
from raydiff.errors import PlanProblem
from raydiff.inputs.checkpoint import load_checkpoint
from raydiff.options import DiffOptions
from raydiff.plan import compare_dtype, make_plan, match_tensors, unit_elems_for


def _ck(path, tensors, config=None):
    return load_checkpoint(write_checkpoint(path, tensors, config=config))


def test_every_decision_has_its_status_match_and_note(tmp_path):
    z = torch.zeros
    base = {"same": z(4, 3).bfloat16(), "widen": z(5).bfloat16(), "narrow": z(5), "model.embed_tokens.weight": z(6, 2),
            "rows": z(7, 3), "cut": z(9, 3), "shape": z(2, 3), "ints": z(4, dtype=torch.int32), "gone": z(2),
            "old.name": z(3), "a.name": z(3), "sq1": z(5, 3), "sq2": z(3, 3), "wide": z(4, 2), "grow": z(3, 2),
            "vocab": z(300, 2)}
    tuned = {"same": z(4, 3).bfloat16(), "widen": z(5), "narrow": z(5).bfloat16(), "model.embed_tokens.weight": z(6, 2),
             "lm_head.weight": z(6, 2), "rows": z(9, 3), "cut": z(7, 3), "shape": z(3, 2), "ints": z(4), "new": z(1),
             "new.name": z(3), "z.name": z(3), "sq1": z(3, 3), "sq2": z(5, 3), "wide": z(5, 3), "grow": z(8, 2),
             "vocab": z(320, 2)}
    b = _ck(tmp_path / "b", base, config={"tie_word_embeddings": True})
    t = _ck(tmp_path / "t", tuned)
    pairs = match_tensors(b, t, DiffOptions(rename=(("old.", "new."), ("a.", "z."))))
    rows = {(p.name, p.status): p for p in pairs}
    got = {k: (p.match, p.compare_dtype) for k, p in rows.items()}
    assert got == {
        ("same", "ok"): ("exact", "BF16"),
        ("widen", "ok"): ("dtype_widened", "F32"),
        ("narrow", "ok"): ("dtype_widened", "F32"),  # the wider side may be either
        ("cut", "ok"): ("resized_rows", "F32"),
        ("cut", "rows_only_in_base"): ("resized_rows", None),
        ("model.embed_tokens.weight", "ok"): ("exact", "F32"),
        ("lm_head.weight", "ok"): ("tied_in_base", "F32"),
        ("rows", "ok"): ("resized_rows", "F32"),
        ("rows", "rows_only_in_tuned"): ("resized_rows", None),
        ("shape", "shape_mismatch"): ("none", None),
        ("wide", "shape_mismatch"): ("none", None),  # rows and columns both differ
        # rows equal to the other side's columns; 3 → 8 rows; rows past the small-int cache
        ("sq1", "ok"): ("resized_rows", "F32"), ("sq1", "rows_only_in_base"): ("resized_rows", None),
        ("sq2", "ok"): ("resized_rows", "F32"), ("sq2", "rows_only_in_tuned"): ("resized_rows", None),
        ("grow", "ok"): ("resized_rows", "F32"), ("grow", "rows_only_in_tuned"): ("resized_rows", None),
        ("vocab", "ok"): ("resized_rows", "F32"), ("vocab", "rows_only_in_tuned"): ("resized_rows", None),
        ("ints", "dtype_mismatch"): ("none", None),
        ("gone", "only_in_base"): ("none", None),
        ("new", "only_in_tuned"): ("none", None),
        ("new.name", "ok"): ("renamed", "F32"),
        ("z.name", "ok"): ("renamed", "F32"),  # renamed to a name sorting after the old one
    }
    assert [p.name for p in pairs] == sorted(p.name for p in pairs)
    assert [p.status for p in pairs if p.name == "rows"] == ["ok", "rows_only_in_tuned"]
    assert rows[("rows", "ok")].base.shape == rows[("rows", "ok")].tuned.shape == (7, 3)
    extra = rows[("rows", "rows_only_in_tuned")]
    assert extra.base is None and extra.tuned.shape == (2, 3)
    assert extra.tuned.offset == t.tensors["rows"].offset + 7 * 3 * 4
    assert "rows 7…8 (2 rows) exist only in tuned" in extra.note
    extra = rows[("cut", "rows_only_in_base")]  # the longer side is the base: its rows, and no tuned
    assert extra.tuned is None and extra.base.shape == (2, 3)
    assert extra.base.offset == b.tensors["cut"].offset + 7 * 3 * 4
    assert extra.note == "rows 7…8 (2 rows) exist only in base: shape [9, 3] in base, [7, 3] in tuned"
    assert rows[("cut", "ok")].base.shape == rows[("cut", "ok")].tuned.shape == (7, 3)
    assert rows[("grow", "rows_only_in_tuned")].note.startswith("rows 3…7 (5 rows) exist only in tuned")
    assert rows[("vocab", "rows_only_in_tuned")].note.startswith("rows 300…319 (20 rows) exist only in tuned")
    extra = rows[("vocab", "rows_only_in_tuned")]
    assert extra.tuned.shape == (20, 2) and extra.base is None
    assert (rows[("gone", "only_in_base")].note, rows[("new", "only_in_tuned")].note) == ("absent from tuned",
                                                                                        "absent from base")
    assert rows[("narrow", "ok")].note == "F32 vs BF16, compared in F32"
    assert rows[("ints", "dtype_mismatch")].note == "dtype I32 in base, F32 in tuned cannot be compared"
    assert "[2, 3] in base, [3, 2] in tuned" in rows[("shape", "shape_mismatch")].note
    assert "'old.name' in base" in rows[("new.name", "ok")].note
    assert "ties it to model.embed_tokens.weight" in rows[("lm_head.weight", "ok")].note
    assert rows[("lm_head.weight", "ok")].base.name == "model.embed_tokens.weight"


def test_a_tie_on_the_tuned_side_and_a_fused_base(tmp_path):
    """The mirror images of the cases above: the tuned side ties its head, the base fuses
    its projections (names read from the files, as every name is)."""
    z = torch.zeros
    p = "model.layers.0.self_attn"
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32,
              "tie_word_embeddings": True}
    b = _ck(tmp_path / "b", {"model.embed_tokens.weight": z(6, 2), "lm_head.weight": z(6, 2),
                             f"{p}.qkv_proj.weight": z(64, 8)})
    t = _ck(tmp_path / "t", {"model.embed_tokens.weight": z(6, 2), f"{p}.q_proj.weight": z(32, 8),
                             f"{p}.k_proj.weight": z(16, 8), f"{p}.v_proj.weight": z(16, 8)}, config)
    by = {(x.name, x.status): x for x in match_tensors(b, t, DiffOptions())}
    head = by[("lm_head.weight", "ok")]
    assert head.match == "tied_in_tuned" and head.tuned.name == "model.embed_tokens.weight"
    assert "tuned has no lm_head.weight; its config ties it to model.embed_tokens.weight" in head.note
    fused = by[(f"{p}.qkv_proj.weight", "fused")]
    assert fused.base is b.tensors[f"{p}.qkv_proj.weight"] and fused.tuned is None
    assert fused.note.startswith("fused in base; compared part by part with tuned's q_proj (rows 0…31)")


def test_a_tie_needs_the_config_and_the_other_side_to_have_the_head(tmp_path):
    z = torch.zeros
    t = _ck(tmp_path / "t", {"model.embed_tokens.weight": z(6, 2), "lm_head.weight": z(6, 2)})
    for i, config in enumerate((None, {"tie_word_embeddings": False}, {"vocab_size": 6})):
        b = _ck(tmp_path / f"b{i}", {"model.embed_tokens.weight": z(6, 2)}, config=config)
        statuses = {p.name: p.status for p in match_tensors(b, t, DiffOptions())}
        assert statuses["lm_head.weight"] == "only_in_tuned", config  # no tie declared: not paired


def test_rename_rules_first_match_wins_and_collisions_are_refused(tmp_path):
    z = torch.zeros
    b = _ck(tmp_path / "b", {"a.b.x": z(2), "a.y": z(2)})
    t = _ck(tmp_path / "t", {"m.x": z(2), "n.y": z(2)})
    rows = {p.name: p for p in match_tensors(b, t, DiffOptions(rename=(("a.b.", "m."), ("a.", "n."))))}
    assert {n: p.status for n, p in rows.items()} == {"m.x": "ok", "n.y": "ok"}
    with pytest.raises(PlanProblem, match="^rename maps both 'a.b.x' and 'a.y' of base to 'c.x'"):
        match_tensors(b, t, DiffOptions(rename=(("a.b.x", "c.x"), ("a.y", "c.x"))))


def test_compare_dtype_is_the_narrowest_exact_float():
    assert compare_dtype("BF16", "BF16") == "BF16"
    assert compare_dtype("BF16", "F16") == compare_dtype("F8_E4M3", "BF16") == compare_dtype("F32", "F16") == "F32"
    assert compare_dtype("F64", "BF16") == compare_dtype("F32", "F64") == "F64"
    assert compare_dtype("I32", "F32") is None and compare_dtype("I8", "U8") is None
    assert compare_dtype("I32", "I32") == "I32"


@settings(max_examples=120, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=3), chunk=st.integers(1024, 5000))
def test_units_tile_each_tensor_on_whole_rows(shape, chunk):
    """Units cover [0, numel) exactly once, in order; for ≥ 2-D tensors each is whole rows of
    the last dimension and as many rows as fit the chunk (at least one)."""
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= d
    unit, row = unit_elems_for(shape, chunk)
    if len(shape) >= 2 and shape[-1] > 0:
        assert row == shape[-1] and unit == max(1, chunk // row) * row
    else:
        assert (unit, row) == (chunk, 0)
    starts = list(range(0, numel, unit))
    spans = [(s, min(numel, s + unit)) for s in starts]
    assert sum(e - s for s, e in spans) == numel
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    if row:
        assert all(s % row == 0 and e % row == 0 for s, e in spans)


def test_the_plan_numbers_units_and_matrices_in_name_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"b.w": torch.randn(300, 7, generator=g), "a.v": torch.randn(5000, generator=g),
            "c.i": torch.zeros(3, 3, dtype=torch.int32), "d.m": torch.randn(4, 5, 6, generator=g)}
    b = _ck(tmp_path / "b", base)
    plan = make_plan(b, b, DiffOptions(chunk_elems=1024))
    assert [t.name for t in plan.tensors] == ["a.v", "b.w", "c.i", "d.m"]
    assert [u.unit_id for u in plan.units] == list(range(len(plan.units)))
    for t in plan.tensors:
        mine = [u for u in plan.units if u.tensor_index == t.index]
        assert [u.unit_id for u in mine] == list(range(t.first_unit, t.first_unit + t.n_units))
        assert mine[0].start == 0 and mine[-1].stop == t.numel
    # a spectrum for each 2-D float matrix only, and none with --rank off
    assert [s.tensor for s in plan.spectra] == ["b.w"]
    assert make_plan(b, b, DiffOptions(rank="off")).spectra == ()
    assert plan.input_bytes == sum(u.nbytes for u in plan.units) == 2 * sum(t.numel() * t.element_size()
                                                                           for t in base.values())


def test_a_block_scaled_fused_projection_is_not_split(tmp_path):
    # Its scale blocks span rows of several parts, so it keeps its rows, and so do the parts.
    z = torch.zeros
    p = "model.layers.0.self_attn"
    config = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "hidden_size": 256}
    b = _ck(tmp_path / "b", {f"{p}.qkv_proj.weight": z(512, 256).to(torch.float8_e4m3fn),
                             f"{p}.qkv_proj.weight_scale_inv": z(4, 2)}, config)
    t = _ck(tmp_path / "t", {f"{p}.q_proj.weight": z(256, 256), f"{p}.k_proj.weight": z(128, 256),
                             f"{p}.v_proj.weight": z(128, 256)}, config)
    got = sorted((x.name.rsplit(".", 2)[-2], x.status) for x in match_tensors(b, t, DiffOptions()))
    assert got == [("k_proj", "only_in_tuned"), ("q_proj", "only_in_tuned"), ("qkv_proj", "block_scale"),
                   ("qkv_proj", "only_in_base"), ("v_proj", "only_in_tuned")]


def test_layout_decisions_slice_fused_rows_pair_scales_and_keep_units_inside_experts(tmp_path):
    z = torch.zeros
    p = "model.layers.0"
    split = {f"{p}.self_attn.q_proj.weight": z(32, 8), f"{p}.self_attn.k_proj.weight": z(16, 8),
             f"{p}.self_attn.v_proj.weight": z(16, 8), f"{p}.mlp.experts.down_proj": z(3, 8, 5),
             f"{p}.mlp.w.weight": z(300, 200).to(torch.float8_e4m3fn), f"{p}.mlp.w.weight_scale_inv": z(3, 2),
             f"{p}.mlp.x.weight": z(300, 200).to(torch.float8_e4m3fn), f"{p}.mlp.x.weight_scale_inv": z(3, 2),
             f"{p}.mlp.y.weight": z(256, 128).to(torch.float8_e4m3fn), f"{p}.mlp.y.weight_scale_inv": z(2, 1)}
    fused = {f"{p}.self_attn.qkv_proj.weight": z(64, 8), f"{p}.mlp.experts.down_proj": z(3, 8, 5),
             f"{p}.mlp.w.weight": z(300, 200).bfloat16(), f"{p}.mlp.x.weight": z(300, 200, dtype=torch.int32),
             f"{p}.mlp.y.weight": z(384, 128).bfloat16(),
             f"{p}.a_only.weight": z(2, 2)}  # sorts before the fused one, and is no fused projection
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32}
    b, t = _ck(tmp_path / "b", split, config), _ck(tmp_path / "t", fused, config)
    plan = make_plan(b, t, DiffOptions(chunk_elems=1024))
    by = {(x.name, x.status): x for x in plan.tensors}
    qkv = t.tensors[f"{p}.self_attn.qkv_proj.weight"]
    for name, first, rows in (("q_proj", 0, 32), ("k_proj", 32, 16), ("v_proj", 48, 16)):
        x = by[(f"{p}.self_attn.{name}.weight", "ok")]
        assert x.match == "fused_slice" and x.tuned.shape == (rows, 8) and x.tuned.offset == qkv.offset + first * 8 * 4
        assert f"rows {first}…{first + rows - 1} of tuned's fused" in x.note
    fused_row = by[(f"{p}.self_attn.qkv_proj.weight", "fused")]
    assert fused_row.tuned is qkv and fused_row.base is None
    assert fused_row.note == ("fused in tuned; compared part by part with base's q_proj (rows 0…31), "
                              "k_proj (rows 32…47), v_proj (rows 48…63)")
    w = by[(f"{p}.mlp.w.weight", "ok")]
    assert (w.match, w.compare_dtype, w.tuned_scale) == ("fp8_block_scaled+dtype_widened", "F32", None)
    assert w.note == "base: F8_E4M3 codes × 128×128 block scales, dequantized; compared in F32"
    assert w.base_scale.scale.name == f"{p}.mlp.w.weight_scale_inv" and (w.base_scale.rows, w.base_scale.cols) == (128, 128)
    assert {u.base_scale for u in plan.units if u.tensor == w.name} == {w.base_scale}
    assert by[(f"{p}.mlp.y.weight", "shape_mismatch")].match == "none"  # block scales do not follow a resize
    assert [x.status for x in plan.tensors if x.name == f"{p}.mlp.w.weight_scale_inv"] == ["block_scale"]
    x = by[(f"{p}.mlp.x.weight", "dtype_mismatch")]  # block-scaled codes against integers
    assert (x.match, x.compare_dtype) == ("none", None)
    assert x.note == "dtype F8_E4M3 in base, I32 in tuned cannot be compared"
    scale_row = by[(f"{p}.mlp.w.weight_scale_inv", "block_scale")]
    assert scale_row.base is not None and scale_row.tuned is None
    assert scale_row.note.startswith(f"block scales of {p}.mlp.w.weight in base: compared as part of that weight")
    stack = by[(f"{p}.mlp.experts.down_proj", "ok")]
    units = [(u.start, u.stop) for u in plan.units if u.tensor_index == stack.index]
    assert stack.experts == 3 and units == [(0, 40), (40, 80), (80, 120)]  # one per expert, though 1024 would hold all
    spectra = [s for s in plan.spectra if s.tensor_index == stack.index]
    assert [(s.expert, s.base.shape, s.base.offset) for s in spectra] == [
        (e, (8, 5), b.tensors[stack.name].offset + e * 40 * 4) for e in range(3)]


def test_prefix_rule_finds_one_prefix_stripped_added_or_replaced_and_nothing_else():
    """The rewrite of tuned's prefix that gives base's names, whichever side has the longer
    one; ``None`` where the names that do not pair are few, or ambiguous."""
    from raydiff.plan.match import prefix_rule

    body = {f"h.{i}.attn.c_attn.weight" for i in range(3)} | {"wte.weight", "ln_f.weight"}
    assert prefix_rule(body, {"transformer." + n for n in body}) == ("transformer.", "")
    assert prefix_rule({"transformer." + n for n in body}, body) == ("", "transformer.")
    vlm = {"model.language_model." + n for n in body} | {"lm_head.weight"}
    assert prefix_rule({"model." + n for n in body} | {"lm_head.weight"}, vlm) == ("model.language_model.", "model.")
    # two renamed among more that pair as they are; a one-part rest ("weight") is no evidence
    assert prefix_rule(body | {"a.x.w", "a.y.w"}, body | {"b.x.w", "b.y.w"}) is None
    assert prefix_rule({"a.weight", "b.weight", "c.weight"}, {"x.weight", "y.weight", "z.weight"}) is None
    # one rewrite pairing under half of the unpaired names; half of them, or more, is enough
    def sides(renamed: int, extra: int, paired: int = 0) -> tuple[set[str], set[str]]:
        both = {f"both{i}.x.w" for i in range(paired)}
        return ({f"p.{i}.w" for i in range(renamed)} | {f"q{i}" for i in range(extra)} | both,
                {f"r.{i}.w" for i in range(renamed)} | {f"s{i}" for i in range(extra)} | both)

    assert prefix_rule(*sides(2, 4)) is None and prefix_rule(*sides(3, 4)) is None
    assert prefix_rule(*sides(3, 3)) == ("r.", "p.") and prefix_rule(*sides(4, 3)) == ("r.", "p.")
    # it must pair more than pair as they are, and two names at least
    assert prefix_rule(*sides(2, 0, paired=2)) is None and prefix_rule(*sides(3, 0, paired=2)) == ("r.", "p.")
    assert prefix_rule(*sides(1, 1)) is None
    # a rest that two base names share is no vote: which one would it be?
    assert prefix_rule({"x.m.w", "y.m.w", "x.n.w", "y.n.w"}, {"t.m.w", "t.n.w"}) is None
