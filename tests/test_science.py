"""The follow-up papers' metrics, each checked against a numpy re-statement of its definition
on planted matrices: a top-k subspace rotated by a known angle, a low-rank ΔW of known energy
rank, striped masks, changes planted on the smallest |W₀| — first on the kernel, then end to
end through `submit` and the `tensors` view, and the `profile` and `jaccard_matrix` macros
against the same masks recomputed from the checkpoint files."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from builders import write_checkpoint
from raydiff.kernel import science
from raydiff.kernel.diff import profile
from raydiff.kernel.spectrum import spectrum
from raydiff.options import DiffOptions, SubmitOptions
from raydiff.query.views import query
from raydiff.run.submit import submit

K = 8


def _orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def _gapped(rng, m, n, k=K):
    """``U diag(σ) Vᵀ`` with a clear gap after σₖ (top k in 50…100, the rest below 1)."""
    r = min(m, n)
    u, v = _orthonormal(rng, m, r), _orthonormal(rng, n, r)
    s = np.concatenate([np.linspace(100, 50, k), np.linspace(1, 0.1, r - k)])
    return u, s, v


def _exact_cosines(a, b, k):
    """numpy: cosines of the principal angles between the top-k left and right singular
    subspaces of two matrices, from full SVDs."""
    ua, _, vat = np.linalg.svd(a.astype(np.float64))
    ub, _, vbt = np.linalg.svd(b.astype(np.float64))
    cu = np.linalg.svd(ua[:, :k].T @ ub[:, :k], compute_uv=False)
    cv = np.linalg.svd(vat[:k].T.T @ vbt[:k].T, compute_uv=False)
    return np.clip(cu, 0, 1), np.clip(cv, 0, 1)


@pytest.mark.parametrize("degrees", [0.3, 5.0, 30.0])
def test_principal_angles_of_a_known_rotation(degrees):
    rng = np.random.default_rng(1)
    m, n = 120, 90
    u, s, v = _gapped(rng, m, n)
    w0 = (u * s) @ v.T
    # rotate the top-k left subspace by θ in the plane of u₀ and u_{k+3}, right subspace untouched
    th = math.radians(degrees)
    u1 = u.copy()
    u1[:, 0] = math.cos(th) * u[:, 0] + math.sin(th) * u[:, K + 3]
    u1[:, K + 3] = -math.sin(th) * u[:, 0] + math.cos(th) * u[:, K + 3]
    w1 = (u1 * s) @ v.T
    sub = science.subspace(torch.from_numpy(w0.astype(np.float32)), torch.from_numpy(w1.astype(np.float32)), K)
    cu, cv = _exact_cosines(w0.astype(np.float32), w1.astype(np.float32), K)
    assert sub.k == K and len(sub.cos_u) == K and list(sub.cos_u) == sorted(sub.cos_u, reverse=True)
    np.testing.assert_allclose(sub.cos_u, cu, atol=1e-4)
    np.testing.assert_allclose(sub.cos_v, cv, atol=1e-4)
    assert min(sub.cos_u) == pytest.approx(math.cos(th), abs=1e-4)
    assert sub.angle_max_deg == pytest.approx(degrees, rel=1e-3, abs=2e-3)
    # the top-k singular values did not move: shift at the float32 noise floor
    s0 = np.linalg.svd(w0.astype(np.float32).astype(np.float64), compute_uv=False)[:K]
    s1 = np.linalg.svd(w1.astype(np.float32).astype(np.float64), compute_uv=False)[:K]
    assert sub.shift_topk == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), abs=1e-5)


def test_spectral_shift_of_scaled_singular_values():
    rng = np.random.default_rng(2)
    u, s, v = _gapped(rng, 80, 64)
    s1 = s * np.where(np.arange(s.size) < 3, 1.1, 1.0)  # the top three grow by 10 %
    w0, w1 = ((u * s) @ v.T).astype(np.float32), ((u * s1) @ v.T).astype(np.float32)
    sub = science.subspace(torch.from_numpy(w0), torch.from_numpy(w1), K)
    top0, top1 = s[:K], s1[:K]
    assert sub.shift_topk == pytest.approx(np.linalg.norm(top1 - top0) / np.linalg.norm(top0), rel=1e-4)
    full = science.spectral_shift(torch.linalg.svdvals(torch.from_numpy(w0)), torch.linalg.svdvals(torch.from_numpy(w1)))
    assert full == pytest.approx(np.linalg.norm(s1 - s) / np.linalg.norm(s), rel=1e-4)
    assert all(c == pytest.approx(1.0, abs=1e-4) for c in sub.cos_u + sub.cos_v)


@pytest.mark.parametrize("planted", ["none", "nan", "+inf", "-inf", "mixed", "all nan", "huge"])
def test_nonfinite_counts_what_numpy_counts(planted):
    """The fast path (minimum and maximum) sees each kind of non-finite entry alone, and a
    matrix of finite values at float32's limits counts as finite."""
    x = np.random.default_rng(5).standard_normal((37, 29)).astype(np.float32)
    if planted in ("nan", "mixed"):
        x[3, 4] = np.nan
    if planted in ("+inf", "mixed"):
        x[10, 0] = np.inf
    if planted in ("-inf", "mixed"):
        x[36, 28] = -np.inf
        x[0, 0] = -np.inf
    if planted == "all nan":
        x[:] = np.nan
    if planted == "huge":
        x[1, 1], x[2, 2] = np.finfo(np.float32).max, -np.finfo(np.float32).max
    assert science.nonfinite(torch.from_numpy(x)) == np.count_nonzero(~np.isfinite(x))
    assert science.nonfinite(torch.from_numpy(x.astype(np.float64))) == np.count_nonzero(~np.isfinite(x))
    assert science.nonfinite(torch.empty(0, 3)) == 0


def test_subspace_of_non_finite_matrices_is_not_computed():
    a = torch.ones(4, 5)
    b = a.clone()
    b[1, 2] = float("nan")
    assert science.subspace(a, b, 2) is None


@pytest.mark.parametrize("sv", [[10.0, 5.0, 1.0, 0.1], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0], [1.0] + [1e-3] * 20])
def test_energy_rank_of_a_planted_low_rank_update(sv):
    rng = np.random.default_rng(3)
    sv = np.asarray(sv)
    r = sv.size
    delta = (_orthonormal(rng, 70, r) * sv) @ _orthonormal(rng, 50, r).T
    cum = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    want = int(np.argmax(cum >= 0.99)) + 1  # the smallest r reaching 99 % (numpy re-statement)
    d = torch.from_numpy(delta.astype(np.float32))
    assert spectrum(d, "exact").energy_rank_99 == want
    assert spectrum(d, "sketch", sketch_rank=r + 4).energy_rank_99 == want
    if want > 2:  # a sketch of fewer directions than the energy needs cannot tell: NULL, not a guess
        assert spectrum(d, "sketch", sketch_rank=want - 1).energy_rank_99 is None
    assert spectrum(torch.zeros(5, 4)).energy_rank_99 == 0


def _cv(counts):
    counts = np.asarray(counts, np.float64)
    return counts.std() / counts.mean()


@pytest.mark.parametrize("shape,aligned", [((40, 64), True), ((33, 13), False)])
def test_striped_masks_have_the_coefficient_of_variation_numpy_gives(shape, aligned):
    rng = np.random.default_rng(4)
    m, n = shape
    mask = rng.random(shape) < 0.02
    mask[::5] |= rng.random((len(range(0, m, 5)), n)) < 0.9  # every fifth row: a stripe
    mask[:, 3] = True  # and one column
    packed = np.packbits(mask.reshape(-1), bitorder="little")
    for form in (packed, mask.reshape(-1)):  # the fused loops' packed mask, numpy's bool one
        row_sq, cols = profile(form, int(mask.sum()), n)
        assert row_sq == int((mask.sum(1) ** 2).sum())
        assert cols == tuple(mask.sum(0).tolist())
    changed = int(mask.sum())
    assert science.cv_of_counts(changed, row_sq, m) == pytest.approx(_cv(mask.sum(1) / n), rel=1e-12)
    assert science.cv_of_counts(changed, int((mask.sum(0) ** 2).sum()), n) == pytest.approx(_cv(mask.sum(0) / m),
                                                                                               rel=1e-12)


def test_random_baseline_of_the_cv_is_that_of_random_masks():
    # The baseline is the CV a mask of the same density placed at random has: simulate it.
    rng = np.random.default_rng(5)
    m, n, changed = 200, 300, 6000
    sims = []
    for _ in range(200):
        flat = np.zeros(m * n, bool)
        flat[rng.choice(m * n, changed, replace=False)] = True
        sims.append(_cv(flat.reshape(m, n).sum(1)))
    assert science.cv_random(changed, m * n, n) == pytest.approx(np.mean(sims), rel=0.02)
    assert science.cv_random(0, m * n, n) is None


def _low_mag_numpy(abs_w0, mask, alpha):
    """numpy re-statement: M_low(α) = entries with |W₀| ≤ the value at sorted position ⌈α·n⌉."""
    a = abs_w0.reshape(-1)
    q = np.sort(a)[max(1, math.ceil(alpha * a.size)) - 1]
    low = a <= q
    m = mask.reshape(-1)
    return (low & m).sum() / m.sum(), low.sum() / a.size


def test_magnitude_masks_planted_on_the_smallest_weights():
    rng = np.random.default_rng(6)
    w0 = rng.standard_normal((50, 40)).astype(np.float32)
    w0[0, :10] = w0[0, 0]  # ties at one value
    a = np.abs(w0)
    planted = a <= np.quantile(a, 0.1, method="lower")  # changes exactly on the 10 % smallest
    noise = rng.random(a.shape) < 0.3
    for mask in (planted, noise, planted | noise):
        got = science.low_magnitude_overlap(a, mask)
        for (ov, frac), alpha in zip(got, science.LOW_MAG_ALPHAS):
            want = _low_mag_numpy(a, mask, alpha)
            assert ov == pytest.approx(want[0], abs=1e-12) and frac == pytest.approx(want[1], abs=1e-12)
    assert science.low_magnitude_overlap(a, planted)[0][0] == 1.0
    # the 16-bit path (counts per magnitude) gives the same numbers, ties, ±0 and NaN included
    for dtype, torch_dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        w = torch.from_numpy(w0).to(torch_dtype)
        w[1, :5] = 0.0
        w[1, 5:8] = -0.0
        w[2, :3] = float("nan")
        bits = w.view(torch.int16).numpy().view(np.uint16)
        mags = np.abs(w.float().numpy())
        for mask in (planted, noise, np.ones_like(planted), np.zeros_like(planted)):
            assert science.low_magnitude_overlap_bits(bits, dtype, mask) == \
                science.low_magnitude_overlap(mags, mask), (dtype, mask.mean())
            cut = bits.size - 3  # a mask's last byte only part full
            assert science.low_magnitude_overlap_bits(bits.reshape(-1)[:cut], dtype, mask.reshape(-1)[:cut]) == \
                science.low_magnitude_overlap(mags.reshape(-1)[:cut], mask.reshape(-1)[:cut]), (dtype, mask.mean())
    # ties: every entry equal to the α-quantile is in M_low
    t = np.array([1.0, 1.0, 1.0, 2.0, 3.0])
    assert science.low_magnitude_overlap(t, np.ones(5, bool), (0.2,)) == [(0.6, 0.6)]
    assert science.low_magnitude_overlap(t, np.zeros(5, bool), (0.2,)) == [(None, 0.6)]


# ------------------------------------------------------------------------- end to end

Q = "model.layers.0.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two finetunes (F32, so numpy reads the values as stored): q_proj's top-16
    subspace rotated by 2° (0.5°), o_proj changed in column stripes, up_proj changed on its smallest
    weights plus noise."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("science")
    u, s, v = _gapped(rng, 96, 64, k=16)  # a gap after σ₁₆: the default k's subspace is well defined
    base = {Q: (u * s) @ v.T, O: rng.standard_normal((64, 96)), UP: rng.standard_normal((80, 64)),
            NORM: np.ones(64)}
    base = {k: x.astype(np.float32) for k, x in base.items()}
    tuned = []
    for seed, degrees in ((11, 2.0), (12, 0.5)):
        g = np.random.default_rng(seed)
        t = {k: x.copy() for k, x in base.items()}
        th = math.radians(degrees)
        u1 = u.copy()
        u1[:, 1] = math.cos(th) * u[:, 1] + math.sin(th) * u[:, 20]  # out of the top 16
        t[Q] = ((u1 * s) @ v.T).astype(np.float32)
        stripes = np.zeros(base[O].shape, bool)
        stripes[:, g.choice(96, 6, replace=False)] = True
        stripes |= g.random(stripes.shape) < 0.01
        t[O] = np.where(stripes, base[O] + 0.01, base[O]).astype(np.float32)
        a = np.abs(base[UP])
        low = (a <= np.quantile(a, 0.3, method="lower")) & (g.random(a.shape) < 0.5)
        t[UP] = np.where(low | (g.random(a.shape) < 0.05), base[UP] * 1.01 + 1e-3, base[UP]).astype(np.float32)
        tuned.append(t)
    paths = []
    for name, tensors in [("base", base), ("rl1", tuned[0]), ("rl2", tuned[1])]:
        write_checkpoint(root / name, {k: torch.from_numpy(x) for k, x in tensors.items()})
        paths.append(root / name)
    store = str(root / "store")
    runs = [submit(str(paths[0]), str(p), SubmitOptions(store=store, diff=DiffOptions(chunk_elems=2048)))
            for p in paths[1:]]
    return store, paths, [r.run_id for r in runs]


def _arrays(path):
    return load_file(str(path / "model.safetensors"))


def _mask(b, t, atol=1e-5):
    return ~(np.abs(t - b) <= np.float32(atol))  # F32: the paper's criterion as stored


@pytest.mark.usefixtures("ray_cluster")
def test_tensors_carry_the_new_metrics_as_numpy_computes_them(family):
    store, paths, run_ids = family
    base = _arrays(paths[0])
    for path, run_id in zip(paths[1:], run_ids):
        tuned = _arrays(path)
        cols, rows = query(store, "SELECT * FROM tensors WHERE run_id = ?", [run_id])
        got = {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}
        for name in (Q, O, UP):
            b, t, row = base[name], tuned[name], got[name]
            cu, cv = _exact_cosines(b, t, 16)
            assert row["subspace_k"] == 16
            if name == Q:  # the matrix with a spectral gap: the randomised SVD's stated accuracy
                np.testing.assert_allclose(row["principal_cos_u"], cu, atol=1e-4)
                np.testing.assert_allclose(row["principal_cos_v"], cv, atol=1e-4)
            s0 = np.linalg.svd(b.astype(np.float64), compute_uv=False)
            s1 = np.linalg.svd(t.astype(np.float64), compute_uv=False)
            assert row["spectral_shift_full"] == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-4,
                                                               abs=1e-6)  # float32 SVDs
            d = (t.astype(np.float64) - b)
            sd = np.linalg.svd(d, compute_uv=False)
            cum = np.cumsum(sd ** 2) / np.sum(d ** 2)
            assert row["energy_rank_99"] == int(np.argmax(cum >= 0.99 * (1 - 1e-6))) + 1
            m = _mask(b, t)
            assert row["changed"] == int(m.sum())
            assert row["row_cv"] == pytest.approx(_cv(m.sum(1) / m.shape[1]), rel=1e-9)
            assert row["col_cv"] == pytest.approx(_cv(m.sum(0) / m.shape[0]), rel=1e-9)
            p = m.mean()
            g_row, n = m.shape[1], m.size
            assert row["row_cv_random"] == pytest.approx(
                math.sqrt(g_row * p * (1 - p) * (n - g_row) / (n - 1)) / (g_row * p), rel=1e-9)
            for alpha in (0.1, 0.3, 0.5):
                ov, frac = _low_mag_numpy(np.abs(b), m, alpha)
                pct = round(alpha * 100)
                assert row[f"low_mag_overlap_{pct}"] == pytest.approx(ov, abs=1e-12)
                assert row[f"low_mag_frac_{pct}"] == pytest.approx(frac, abs=1e-12)
        q = got[Q]
        assert q["principal_angle_max_deg"] == pytest.approx(2.0 if run_id == run_ids[0] else 0.5, abs=0.02)
        assert got[O]["col_cv"] > 3 * got[O]["col_cv_random"]  # column stripes stand out
        assert got[UP]["low_mag_overlap_30"] > 2 * got[UP]["low_mag_frac_30"]  # changes sit on small weights
        assert got[NORM]["row_cv"] is None and got[NORM]["subspace_k"] is None  # 1-D: none of these


@pytest.mark.usefixtures("ray_cluster")
def test_demo_text_and_report_show_the_new_metrics(family, tmp_path):
    from raydiff.query.report import demo_report, write_report

    store, paths, run_ids = family
    text = demo_report(store, {"rl1": run_ids[0], "rl2": run_ids[1]}, {})
    line = [x for x in text.splitlines() if x.startswith("rl1 ")][1]  # the second table: beyond the paper
    _, rows = query(store, "SELECT avg(principal_angle_max_deg), max(principal_angle_max_deg) FROM tensors "
                           "WHERE run_id = ? AND len(shape) = 2", [run_ids[0]])
    assert line.split()[1:3] == [f"{rows[0][0]:.2f}", f"{rows[0][1]:.2f}"]
    path = write_report(store, ["rl1", "rl2"], tmp_path / "rep")
    assert (tmp_path / "rep" / "science.png").stat().st_size > 10_000
    assert path.read_text().count("data:image/png;base64,") == 5


@pytest.mark.usefixtures("ray_cluster")
def test_profile_macro_gives_every_row_and_column_from_the_masks(family):
    store, paths, run_ids = family
    base, tuned = _arrays(paths[0]), _arrays(paths[1])
    m = _mask(base[O], tuned[O])
    cols, rows = query(store, "SELECT axis, \"index\", changed, n, fraction FROM profile(?, ?) ORDER BY axis, \"index\"",
                       [run_ids[0], O])
    assert cols == ["axis", "index", "changed", "n", "fraction"]
    by_axis = {a: [r for r in rows if r[0] == a] for a in ("col", "row")}
    assert [r[2] for r in by_axis["row"]] == m.sum(1).tolist() and [r[3] for r in by_axis["row"]] == [96] * 64
    assert [r[2] for r in by_axis["col"]] == m.sum(0).tolist() and [r[3] for r in by_axis["col"]] == [64] * 96
    assert [r[1] for r in by_axis["row"]] == list(range(64))
    assert all(r[4] == pytest.approx(r[2] / r[3]) for r in rows)
    # by name, and a tensor the run did not compare is an error naming it
    _, rows2 = query(store, "SELECT count(*) FROM profile('rl1', ?)", [O])
    assert rows2 == [(64 + 96,)]
    with pytest.raises(Exception, match="nope"):
        query(store, "SELECT * FROM profile(?, 'nope')", [run_ids[0]])


@pytest.mark.usefixtures("ray_cluster")
def test_jaccard_matrix_is_the_mean_over_pairs(family):
    store, paths, run_ids = family
    base = _arrays(paths[0])
    tuned = [_arrays(p) for p in paths[1:]]
    # a third run: rl1 again under a looser criterion, so three pairs
    run3 = submit(str(paths[0]), str(paths[1]), SubmitOptions(
        store=store, name="rl1-loose", diff=DiffOptions(chunk_elems=2048, atol=5e-3, rank="off"))).run_id
    ids = [*run_ids, run3]
    masks = [{k: _mask(base[k], t[k]) for k in (Q, O, UP, NORM)} for t in tuned]
    masks.append({k: _mask(base[k], tuned[0][k], 5e-3) for k in (Q, O, UP, NORM)})
    cols, rows = query(store, "SELECT * FROM jaccard_matrix(?) ORDER BY tensor", [ids])
    got = {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}

    def jac(a, b):
        return (a & b).sum() / (a | b).sum()

    def jac_random(a, b):
        p, q = a.mean(), b.mean()
        return p * q / (p + q - p * q)

    pairs = list(itertools.combinations(range(3), 2))
    for name in (Q, O, UP):
        row = got[name]
        assert row["n_pairs"] == 3
        assert row["jaccard_mean"] == pytest.approx(np.mean([jac(masks[i][name], masks[j][name]) for i, j in pairs]))
        assert row["jaccard_random_mean"] == pytest.approx(
            np.mean([jac_random(masks[i][name], masks[j][name]) for i, j in pairs]))
    # per layer × module (tensor '*'): the group's tensors' sets joined, then the mean over pairs
    lm = {(r[cols.index("layer")], r[cols.index("module")]): dict(zip(cols, r)) for r in rows
          if r[cols.index("tensor")] == "*"}
    assert lm[(0, "q")]["jaccard_mean"] == pytest.approx(got[Q]["jaccard_mean"])
    assert lm[(1, "up")]["jaccard_mean"] == pytest.approx(got[UP]["jaccard_mean"])
    total = lm[(None, "*")]
    every = [np.concatenate([masks[i][k].ravel() for k in (Q, O, UP, NORM)]) for i in range(3)]
    assert total["jaccard_mean"] == pytest.approx(np.mean([jac(every[i], every[j]) for i, j in pairs]))
    assert total["n_pairs"] == 3


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_a_sketch_without_subspaces_matches_numpy_whichever_side_it_decodes(tmp_path, dtype):
    """`--rank sketch --subspace-k 0` takes ΔW from the stored bits where it can (BF16, F32)
    and decodes neither side where no metric needs the weights (BF16): the spectrum and the
    magnitude masks are still numpy's, from ΔW taken in the pair's dtype as torch takes it."""
    from raydiff.options import ClusterOptions

    t = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(5)
    shapes = {Q: (96, 64), UP: (80, 200)}
    base = {k: (torch.randn(s, generator=g) * 0.05).to(t) for k, s in shapes.items()}
    tuned = {}
    for k, b in base.items():
        move = torch.rand(b.shape, generator=g) < 0.3
        tuned[k] = torch.where(move, (b.float() + torch.randn(b.shape, generator=g) * 1e-3).to(t), b)
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "tuned", tuned)
    store = str(tmp_path / "store")
    run = submit(str(tmp_path / "base"), str(tmp_path / "tuned"),
                 SubmitOptions(store=store, diff=DiffOptions(rank="sketch", subspace_k=0),
                               cluster=ClusterOptions(backend="local")))
    cols, rows = query(store, "SELECT * FROM spectra WHERE run_id = ?", [run.run_id])
    got = {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}
    assert set(got) == set(shapes)
    for name in shapes:
        d = (tuned[name] - base[name]).double().numpy()  # Δ in the pair's dtype, as the paper takes it
        sv = np.linalg.svd(d, compute_uv=False)
        row = got[name]
        assert (row["method"], row["subspace_k"]) == ("sketch", None)
        np.testing.assert_allclose(row["top_sv"][:16], sv[:16], rtol=1e-5)
        assert row["fro"] == pytest.approx(float(np.sqrt((d ** 2).sum())), rel=1e-6)
        m = ~((tuned[name] - base[name]).abs() <= 1e-5).numpy()
        for alpha in (0.1, 0.3, 0.5):
            ov, frac = _low_mag_numpy(np.abs(base[name].double().numpy()), m, alpha)
            pct = round(alpha * 100)
            assert row[f"low_mag_overlap_{pct}"] == pytest.approx(ov, abs=1e-12), (name, alpha)
            assert row[f"low_mag_frac_{pct}"] == pytest.approx(frac, abs=1e-12), (name, alpha)
