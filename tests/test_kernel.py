"""The pure kernel against torch/numpy on the same arrays, on adversarial bit patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import LADDER, SUM_REL, boundary_pair, ref_diff
from raydiff.kernel.diff import Criteria, decode, delta_of_bits, round_to
from raydiff.kernel.diff import diff_unit as _diff_unit
from raydiff.kernel.masks import CODEC_PACKBITS, decode_mask
from raydiff.kernel.spectrum import spectrum

_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().view(_UINT[t.element_size()]).ravel()


#: atol values for the property tests: on the ladder (the fused loop's mask shares that
#: step's compare, the default 1e-5 among them) and off it (the mask has a compare of its own).
_ATOLS = st.sampled_from([1e-5, 1e-7, 0.0, 3e-6, 2e-4])


@pytest.fixture(autouse=True, scope="module", params=["compact", "portable"])
def fused_loop(request):
    """Every test here runs on both fused loops (on the same arrays, against the same
    references): the AVX-512 one (:mod:`raydiff.kernel._compact`) where this CPU can run it, and
    the portable one (:mod:`raydiff.kernel._fused`) that every other CPU takes."""
    from raydiff.kernel import _compact

    if request.param == "compact" and not _compact.available():
        pytest.skip(f"this CPU lacks one of {', '.join(_compact.FEATURES)}: only the portable loop runs here")
    return request.param


@pytest.fixture(autouse=True)
def _loop(fused_loop):
    global LOOP
    LOOP = fused_loop


LOOP = "portable"


def diff_unit(*args, **kwargs):
    """The kernel on this module's loop (the fixtures above run every test on both)."""
    return _diff_unit(*args, loop=LOOP, **kwargs)


def _check(base: torch.Tensor, tuned: torch.Tensor, bd: str, td: str, cd: str, row_len: int = 0,
           atol: float = 1e-5):
    r = diff_unit(_bits(base), _bits(tuned), bd, td, cd, Criteria(atol=atol), row_len)
    ref = ref_diff(base, tuned, atol=atol)
    for k in ("changed", "changed_bits", "changed_rel"):
        assert getattr(r, k) == ref[k], k
    assert r.changed_ladder == tuple(ref[k] for k in ("changed_1e8", "changed_1e7", "changed_1e6",
                                                       "changed_1e5", "changed_1e4"))
    np.testing.assert_array_equal(decode_mask(r.mask_codec, r.mask, r.numel), ref["mask"])
    if r.changed_bits and "max_abs_delta" in ref:
        assert r.max_abs_delta == pytest.approx(ref["max_abs_delta"], rel=1e-6)
        assert np.sqrt(r.sum_sq_delta) == pytest.approx(ref["delta_fro"], rel=SUM_REL)
        assert r.nonfinite == ref["nonfinite"]
    return r


@pytest.mark.parametrize("ladder", [(1e-6, 1e-4), (1e-8, 1e-7, 2e-6, 1e-5, 1e-4, 1e-3)])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_a_ladder_of_any_length_is_counted(ladder, dtype):
    """A user's ladder (``--ladder``) need not have the default's five steps, which the fused
    loops are built for: the kernel counts it all the same, step by step against torch."""
    g = torch.Generator().manual_seed(3)
    t = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    base = torch.randn(4096, generator=g).to(t)
    tuned = (base.float() + torch.randn(4096, generator=g) * 10.0 ** torch.randint(-9, -2, (4096,), generator=g)).to(t)
    r = diff_unit(_bits(base), _bits(tuned), dtype, dtype, dtype, Criteria(atol=1e-5, ladder=ladder))
    ref = ref_diff(base, tuned)
    ad = (tuned - base).abs()
    assert r.changed == ref["changed"]
    assert r.changed_ladder == tuple(int((ref["neq"] & ~(ad <= tol).numpy()).sum()) for tol in ladder)
    assert len(set(r.changed_ladder)) > 1  # the steps differ: a step counted at another's tolerance shows
    assert r.rows_touched is r.cols_bitmap is r.row_changed_sq is None  # a unit of no matrix: no row profile


def _tensor_from_bits(raw: bytes, dtype: str) -> torch.Tensor:
    t = _TORCH[dtype]
    size = torch.empty(0, dtype=t).element_size()
    raw = raw[: len(raw) // size * size]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(t).clone() if raw else torch.empty(0, dtype=t)


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16", "F32", "F64"]), raw=st.binary(min_size=0, max_size=512),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 63)), max_size=40),
       small=st.lists(st.tuples(st.integers(0, 10_000), st.floats(-1e-4, 1e-4)), max_size=40), atol=_ATOLS)
def test_same_dtype_matches_torch_on_any_bits(dtype, raw, flips, small, atol):
    base = _tensor_from_bits(raw, dtype)
    tuned = base.clone()
    n = base.numel()
    if n:
        bits = tuned.view(torch.uint8).numpy().view(_UINT[tuned.element_size()])
        for i, b in flips:  # arbitrary bit flips: NaNs, Infs, signed zeros, subnormals…
            bits[i % n] ^= bits.dtype.type(1) << bits.dtype.type(b % (8 * tuned.element_size()))
        for i, eps in small:  # small value moves around the tolerances
            tuned[i % n] = (tuned[i % n].double() + eps).to(tuned.dtype)
    _check(base, tuned, dtype, dtype, dtype, atol=atol)


@settings(max_examples=60, deadline=None)
@given(pair=st.sampled_from([("BF16", "F32"), ("F16", "F32"), ("BF16", "F16"), ("F32", "F64"), ("BF16", "F64")]),
       seed=st.integers(0, 2**31), n=st.integers(0, 300), scale=st.sampled_from([1e-7, 1e-5, 1e-3, 1.0]))
def test_mixed_dtypes_compare_in_the_wider_type(pair, seed, n, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    base = w.to(_TORCH[pair[0]])
    tuned = (base.double() + torch.randn(n, generator=g, dtype=torch.float64) * scale
             * (torch.rand(n, generator=g) < 0.5)).to(_TORCH[pair[1]])
    cd = "F64" if "F64" in pair else "F32"
    _check(base, tuned, pair[0], pair[1], cd)


def test_tolerance_is_taken_in_bf16_like_the_papers_torch_code():
    # Δ = bf16(1e-5) exactly: torch compares |Δ| <= bf16(1e-5) → unchanged; an f64 threshold would say changed.
    base = torch.zeros(4, dtype=torch.bfloat16)
    tuned = torch.tensor([1e-5, 1.0014e-5, 1.1e-5, 0.0]).bfloat16()  # first two round to one bf16
    r = _check(base, tuned, "BF16", "BF16", "BF16")
    assert (r.changed_bits, r.changed) == (3, 1)  # an f64 threshold would give (3, 3)


@pytest.mark.parametrize("atol", [0.0, 3e-6, 1e-5])
def test_a_delta_exactly_at_a_tolerance_is_unchanged_and_the_next_float_up_is_changed(atol):
    # F32, where |Δ| can equal a cut-off exactly: for the mask's and every ladder step's, Δ at
    # the float32 tolerance, one float above and one below, both signs; and −0 against +0,
    # which differs in bits but not in value. 19 values × 5 = 95 entries: the vector steps
    # and the scalar tail both see every case.
    vals = [np.float32(-0.0)]
    for t in (atol, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4):
        t32 = np.float32(t)
        vals += [t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(0))]
    tuned = np.array(vals * 5, np.float32)
    tuned[1::2] = -tuned[1::2]
    base = np.zeros_like(tuned)
    r = _check(torch.from_numpy(base), torch.from_numpy(tuned), "F32", "F32", "F32", atol=atol)
    assert r.changed_bits == np.count_nonzero(tuned.view(np.uint32) != 0)
    assert r.changed == np.count_nonzero(np.abs(tuned) > np.float32(atol))
    assert r.changed_ladder == tuple(int(np.count_nonzero(np.abs(tuned) > np.float32(t)))
                                     for t in (1e-8, 1e-7, 1e-6, 1e-5, 1e-4))


#: User tolerances of the boundary tests: the default (a ladder step, whose compare the
#: portable loop shares with the mask), one off the ladder, and a power of two at which f16's
#: step doubles — the one place an f16 Δ can need rounding near these magnitudes.
BOUNDARY_ATOLS = (1e-5, 3e-6, 2.0**-13)


@pytest.mark.parametrize("atol", BOUNDARY_ATOLS)
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_every_cut_off_is_where_the_papers_torch_code_puts_it(dtype, atol):
    """Δ on, just under and just over the cut-off of the run's atol and of every ladder step,
    counted and masked exactly as torch's ``(tuned - base).abs() <= t`` in the stored dtype."""
    base, tuned = boundary_pair(_TORCH[dtype], LADDER + (atol,))
    _check(base, tuned, dtype, dtype, dtype, atol=atol)
    # the pairs reach the cut-off: some Δ is dtype(atol) exactly, and where the dtype rounds Δ
    # there (bf16; f16 at its step change), some exact Δ above dtype(atol) rounds down onto it
    exact = (tuned.double() - base.double()).abs().numpy()
    target = float(torch.tensor(atol, dtype=torch.float64).to(_TORCH[dtype]))
    assert (exact == target).any()
    if dtype == "BF16" or (dtype == "F16" and atol == 2.0**-13):
        assert ((exact > target) & ~ref_diff(base, tuned, atol=atol)["mask"]).any()


@pytest.mark.parametrize("atol", BOUNDARY_ATOLS[:2])
@pytest.mark.parametrize("pair", [("BF16", "F32"), ("F16", "F32"), ("F32", "F64"), ("BF16", "F64")])
def test_mixed_dtypes_at_every_cut_off(pair, atol):
    bd, td = pair
    base, tuned = boundary_pair(_TORCH[td], LADDER + (atol,), base_dtype=_TORCH[bd])
    cd = "F64" if "F64" in pair else "F32"
    _check(base, tuned, bd, td, cd, atol=atol)
    assert ((tuned.double() - base.double()).abs() == float(torch.tensor(atol, dtype=torch.float64).to(_TORCH[cd]))).any()


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_fp8_at_a_user_atol_it_can_hold(dtype):
    base, tuned = boundary_pair(_TORCH[dtype], (2.0**-9,))
    r = _check(base, tuned, dtype, dtype, dtype, atol=2.0**-9)
    assert ((tuned.float() - base.float()).abs() == 2.0**-9).any() and 0 < r.changed < r.changed_bits


def test_fp8_and_integer_tensors():
    g = torch.Generator().manual_seed(3)
    for dt in ("F8_E4M3", "F8_E5M2"):
        base = (torch.randn(200, generator=g)).to(_TORCH[dt])
        tuned = base.clone()
        tuned[::7] = (tuned[::7].float() * 1.5).to(_TORCH[dt])
        _check(base, tuned, dt, dt, dt)
    a = np.arange(100, dtype=np.int32).view(np.uint32)
    b = a.copy()
    b[[3, 50]] += 1
    r = diff_unit(a, b, "I32", "I32", "I32", Criteria())
    assert (r.changed_bits, r.changed, r.changed_rel, r.max_abs_delta, r.nonfinite) == (2, 2, 2, None, 0)
    assert r.changed_ladder == (2,) * 5
    flags = np.zeros(77, np.uint8)  # BOOL: bits compared, as integers are
    flipped = flags.copy()
    flipped[[0, 9, 76]] = 1
    r = diff_unit(flags, flipped, "BOOL", "BOOL", "BOOL", Criteria())
    assert (r.changed_bits, r.changed, r.changed_ladder, r.nonfinite) == (3, 3, (3,) * 5, 0)
    np.testing.assert_array_equal(decode_mask(r.mask_codec, r.mask, 77), flags != flipped)


@pytest.mark.parametrize("extra", [-1, 1])
def test_units_of_different_sizes_are_refused(extra):
    a = np.zeros(10, np.uint16)
    with pytest.raises(ValueError, match="^unit sizes differ: base 10, tuned "):
        diff_unit(a, np.zeros(10 + extra, np.uint16), "BF16", "BF16", "BF16", Criteria())


def test_nonfinite_deltas_count_as_changed():
    base = torch.tensor([1.0, 2.0, float("inf"), float("nan"), 0.0, -0.0])
    tuned = torch.tensor([float("nan"), float("inf"), float("inf"), float("nan"), -0.0, 5e-6])
    r = _check(base, tuned, "F32", "F32", "F32")
    assert (r.changed_bits, r.nonfinite, r.changed) == (4, 2, 2)


def test_diff_with_itself_is_empty_and_chunking_adds_up():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 0x7F00, 10_000, dtype=np.uint16)  # finite bf16 bit patterns, both signs below
    a[::3] |= 0x8000
    r = diff_unit(a, a, "BF16", "BF16", "BF16", Criteria(), row_len=100)
    assert (r.changed_bits, r.changed, r.rows_touched, r.mask_codec) == (0, 0, 0, "empty")
    b = a.copy()
    b[rng.random(a.size) < 0.1] ^= 1
    whole = diff_unit(a, b, "BF16", "BF16", "BF16", Criteria(), row_len=100)
    parts = [diff_unit(a[i:i + 1000], b[i:i + 1000], "BF16", "BF16", "BF16", Criteria(), row_len=100)
             for i in range(0, a.size, 1000)]
    assert whole.changed_bits == sum(p.changed_bits for p in parts)
    assert whole.rows_touched == sum(p.rows_touched for p in parts)
    assert whole.sum_sq_base == pytest.approx(sum(p.sum_sq_base for p in parts), rel=1e-12)
    ref = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).double()
    assert whole.sum_sq_base == pytest.approx(float((ref ** 2).sum()), rel=SUM_REL)
    assert decode(a, "BF16").tolist() == ref.tolist()


def test_the_base_norm_of_a_unit_of_many_blocks_is_every_entry_s():
    """‖W0‖F² on the numpy path (F64 here) goes 65,536 entries at a time: a unit of three
    blocks and a bit must sum every block (a bound as ``i | block`` skipped every other)."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal(3 * 65536 + 5)
    b = a.copy()
    b[::7] += 1e-3
    r = diff_unit(a.view(np.uint64), b.view(np.uint64), "F64", "F64", "F64", Criteria())
    assert r.sum_sq_base == pytest.approx(float(np.dot(a, a)), rel=1e-12)
    assert r.changed == int(np.count_nonzero(~(np.abs(b - a) <= 1e-5)))


@pytest.mark.parametrize("dtype", ["BOOL", "I8", "I32", "U8", "F8_E8M0", "bf16"])
def test_decode_refuses_what_is_not_a_stored_float_dtype(dtype):
    # BOOL sorts before F32: a range compare for a float name would reinterpret its bytes.
    with pytest.raises(ValueError, match=f"{dtype} is not a float dtype"):
        decode(np.zeros(4, np.uint32), dtype)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F32"]), seed=st.integers(0, 2**31), n=st.integers(0, 3000))
def test_delta_of_bits_is_torchs_difference_in_the_dtype(dtype, seed, n):
    """ΔW from the stored bits is torch's ``tuned - base`` in the pair's dtype, bit for bit:
    random bit patterns (NaN, ±Inf, subnormals, differences that overflow to ±Inf) and
    nearby values that round to even."""
    rng = np.random.default_rng(seed)
    t, bits = (torch.bfloat16, np.uint16) if dtype == "BF16" else (torch.float32, np.uint32)
    a = rng.integers(0, np.iinfo(bits).max, n, dtype=bits, endpoint=True)
    b = np.where(rng.random(n) < 0.5, a + rng.integers(-3, 4, n).astype(bits), rng.integers(
        0, np.iinfo(bits).max, n, dtype=bits, endpoint=True)).astype(bits)
    b[:4] = np.array([0x7F7F, 0xFF7F, 0x0001, 0x7F80] if dtype == "BF16" else [0x7F7FFFFF, 0xFF7FFFFF, 1, 0x7F800000],
                     bits)[:min(4, n)]
    want = (torch.from_numpy(b.view(np.int16 if dtype == "BF16" else np.int32)).view(t)
            - torch.from_numpy(a.view(np.int16 if dtype == "BF16" else np.int32)).view(t)).float().numpy()
    got = delta_of_bits(a, b, dtype)
    assert got.dtype == np.float32 and got.shape == (n,)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    out = np.full(n, 7.0, np.float32)  # a buffer written over, as an executor reuses it
    assert delta_of_bits(a, b, dtype, out) is out
    assert np.array_equal(out.view(np.uint32), got.view(np.uint32))


def test_delta_of_bits_refuses_other_dtypes_and_shapes():
    with pytest.raises(ValueError, match="BF16 or F32 bits, got F16"):
        delta_of_bits(np.zeros(2, np.uint16), np.zeros(2, np.uint16), "F16")
    with pytest.raises(ValueError, match=r"shapes differ: \(2,\) and \(3,\)"):
        delta_of_bits(np.zeros(2, np.uint16), np.zeros(3, np.uint16), "BF16")
    for out in (np.empty(3, np.float32), np.empty(2, np.float64), np.empty(4, np.float32)[::2]):
        with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of 2 entries"):
            delta_of_bits(np.zeros(2, np.uint16), np.zeros(2, np.uint16), "BF16", out)


def test_spectrum_matches_torch_matrix_rank_and_sketch_finds_planted_rank():
    g = torch.Generator().manual_seed(0)
    low = (torch.randn(300, 16, generator=g) @ torch.randn(16, 200, generator=g)) * 1e-2
    noisy = low + torch.randn(300, 200, generator=g) * 1e-6
    for d in (low, noisy, torch.randn(50, 80, generator=g)):
        ex = spectrum(d, "exact")
        assert ex.rank == int(torch.linalg.matrix_rank(d))
        s = torch.linalg.svdvals(d.double())
        assert ex.top_sv[:5] == pytest.approx(s[:5].tolist(), rel=1e-4)
        assert ex.stable_rank == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-4)
    sk = spectrum(noisy, "sketch", sketch_rank=32)
    ex = spectrum(noisy, "exact")
    assert sk.rank is None and sk.rank_cutoffs == ex.rank_cutoffs == (16, 16, 16)
    assert sk.top_sv[:16] == pytest.approx(ex.top_sv[:16], rel=1e-3)
    assert spectrum(torch.zeros(3, 4), "exact").rank == 0


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16", "F32"]), seed=st.integers(0, 2**31), rows=st.integers(1, 90),
       cols=st.sampled_from([1, 3, 8, 13, 64, 70, 4096, 5000]), density=st.sampled_from([0.0, 0.002, 0.05, 0.6]),
       quiet_rows=st.floats(0, 1), wild=st.integers(0, 20), as_rows=st.booleans(), atol=_ATOLS)
def test_blocked_loop_matches_numpy_across_blocks_rows_and_columns(dtype, seed, rows, cols, density, quiet_rows,
                                                                   wild, as_rows, atol):
    """Many blocks (rows, or 4096-entry blocks of a 1-D unit), rows of any length (not only
    multiples of 8), blocks with no change, NaN/Inf/huge values: every count, the mask, the
    touched rows and columns and all sums equal the numpy/torch reference."""
    rng = np.random.default_rng(seed)
    t = _TORCH[dtype]
    base = (torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)) * 0.02).to(t)
    tuned = base.clone()
    move = torch.from_numpy((rng.random((rows, cols)) < density) & (rng.random((rows, 1)) >= quiet_rows))
    tuned[move] = (tuned[move].double() + torch.from_numpy(rng.choice([-1, 1], int(move.sum())) *
                                                           10.0 ** rng.uniform(-9, -2, int(move.sum())))).to(t)
    bits = tuned.view(torch.uint8).numpy().view(_UINT[tuned.element_size()]).reshape(-1)
    hits = rng.integers(0, bits.size, wild)
    bits[hits] = rng.integers(0, np.iinfo(bits.dtype).max, wild, dtype=bits.dtype, endpoint=True)  # any pattern
    row_len = cols if as_rows else 0
    base, tuned = base.reshape(-1), tuned.reshape(-1)  # the reference's rank needs no NaN-free 2-D Δ
    r = _check(base, tuned, dtype, dtype, dtype, row_len=row_len, atol=atol)
    ref = ref_diff(base, tuned, atol=atol)
    assert r.sum_sq_base == pytest.approx(ref["base_fro"] ** 2, rel=SUM_REL, nan_ok=True)
    if r.changed_bits:
        assert r.sum_abs_delta == pytest.approx(ref["mean_abs_delta"] * base.numel(), rel=SUM_REL)
    if as_rows:
        grid = ref["mask"].reshape(rows, cols)
        assert r.rows_touched == int(grid.any(axis=1).sum())
        want_cols = np.packbits(grid.any(axis=0), bitorder="little").tobytes() if r.changed else b""
        assert r.cols_bitmap == want_cols


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_a_delta_that_overflows_the_dtype_is_summed_in_float64(dtype):
    big = 3.0e38  # finite in both dtypes; big - (-big) is not
    base = torch.tensor([big, 1.0, -big, 2.0], dtype=torch.float32).to(_TORCH[dtype])
    tuned = torch.tensor([-big, 1.0, big, 2.5], dtype=torch.float32).to(_TORCH[dtype])
    r = _check(base, tuned, dtype, dtype, dtype)
    b, w = float(base[0]), float(tuned[0])
    assert (r.changed_bits, r.changed, r.nonfinite) == (3, 3, 0)
    assert r.max_abs_delta == abs(w - b) and r.sum_abs_delta == 2 * abs(w - b) + 0.5


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_squares_beyond_float32_are_summed_in_float64(dtype):
    """The fused loop sums in float32 runs, which would overflow on a w² or Δ² above ~3.4e38;
    such a run is summed again in float64, so the sums still equal numpy's float64 ones."""
    rng = np.random.default_rng(3)
    base = torch.from_numpy(rng.standard_normal(3000, dtype=np.float32)).to(_TORCH[dtype])
    base[700] = 1e20  # w² overflows float32
    tuned = base.clone()
    tuned[::7] = tuned[::7] * 1.5 + 0.25
    tuned[1500] = -1e20  # a finite Δ whose square overflows float32
    r = _check(base, tuned, dtype, dtype, dtype)
    ref = ref_diff(base, tuned)
    assert ref["base_fro"] > 9e19 and ref["delta_fro"] > 9e19 and np.isfinite(r.sum_sq_delta)
    assert r.sum_sq_base == pytest.approx(ref["base_fro"] ** 2, rel=SUM_REL)
    assert r.sum_sq_delta == pytest.approx(ref["delta_fro"] ** 2, rel=SUM_REL)
    assert r.sum_abs_delta == pytest.approx(ref["mean_abs_delta"] * base.numel(), rel=SUM_REL)


@pytest.mark.parametrize("pair", [("BF16", "F32"), ("F32", "F16"), ("F32", "F64"), ("F64", "BF16"), ("BF16", "F16"),
                                  ("F8_E4M3", "F32")])
def test_mixed_pairs_count_the_changes_a_resave_in_the_narrower_dtype_erases(pair):
    """``changed_subprecision``: of the entries whose widened values differ, those that are
    equal once the wider side is rounded to the narrower dtype, as torch's ``.to()`` rounds.
    Moves up and down, below and above the narrower type's precision; ``None`` where neither dtype is
    narrower (BF16 vs F16) or the narrower one is fp8."""
    g = torch.Generator().manual_seed(4)
    n = 4000
    base = torch.randn(n, generator=g, dtype=torch.float64).to(_TORCH[pair[0]])
    w = base.double()
    fine = 2.0 ** -12 if {"BF16", "F16"} & set(pair) else 2.0 ** -30  # below the narrower type's precision
    step = w.abs() * torch.where(torch.rand(n, generator=g) < 0.5, fine, 2.0 ** -4)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    tuned = (w + step * sign * (torch.rand(n, generator=g) < 0.6)).to(_TORCH[pair[1]])
    r = diff_unit(_bits(base), _bits(tuned), pair[0], pair[1], "F64" if "F64" in pair else "F32", Criteria(), 0)
    if base.element_size() == tuned.element_size() or "F8_E4M3" in pair:
        assert r.changed_subprecision is None
        return
    narrow, wide = (base, tuned) if base.element_size() < tuned.element_size() else (tuned, base)
    differs = base.double() != tuned.double()
    erased = wide.to(narrow.dtype).double() == narrow.double()
    want = int((differs & erased).sum())
    assert r.changed_subprecision == want
    assert 0 < want < int(differs.sum())  # entries a re-save erases and entries it keeps


def test_dtype_names_read_from_a_header_are_recognised():
    """Dtype names come from a shard's JSON header: new string objects, not the literals of
    the kernel's source (mutants comparing them by identity survived tests that passed
    literals only)."""
    import json

    from raydiff.kernel.diff import cutoff

    cutoff.cache_clear()  # cut-offs cached for the literals by earlier tests would hide it
    g = torch.Generator().manual_seed(8)
    for names in (["BF16", "BF16", "BF16"], ["F16", "F16", "F16"], ["BF16", "F32", "F32"], ["F32", "F64", "F64"],
                  ["F64", "F64", "F64"]):
        read = json.loads(json.dumps(names))
        assert all(a is not b for a, b in zip(read, names))  # other objects, as a header's are
        base = torch.randn(500, generator=g).to(_TORCH[names[0]])
        w = base.double()
        # moves of 1e-3 and, for the F64 side, of 2^-30 (below float32's precision)
        tuned = (w + torch.where(torch.arange(500) % 2 == 0, 1e-3, 2.0 ** -30 * w.abs())).to(_TORCH[names[1]])
        if names[1] == "F64":
            tuned[0], base[0] = 1e-5, 0.0  # a Δ exactly at the atol, in float64: unchanged
        _check(base, tuned, *read)  # against torch
        assert diff_unit(_bits(base), _bits(tuned), *read, Criteria(), 0) == \
            diff_unit(_bits(base), _bits(tuned), *names, Criteria(), 0)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_round_to_rounds_as_torch_does_and_leaves_wider_types_alone(dtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-30, 30, 20_000)).astype(np.float32)
    x[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 7e4]  # 7e4 overflows F16
    got = round_to(x.copy(), dtype)
    want = torch.from_numpy(x).to(_TORCH[dtype]).float().numpy() if dtype in ("BF16", "F16") else x
    np.testing.assert_array_equal(got.view(np.uint32)[3:], want.view(np.uint32)[3:])  # bit for bit, ±0 too
    np.testing.assert_array_equal(got[:3], want[:3])  # NaN where NaN (its payload aside), ±Inf


def test_a_half_changed_unit_stores_its_mask_as_the_packed_bits():
    """At half changed a mask is stored as its ``ceil(n/8)`` packed bytes (a mutant sizing
    the kernel's mask buffer wrong changed only the codec it picked, not the decoded mask)."""
    n = 8 * 1000 + 3
    g = torch.Generator().manual_seed(6)
    base = torch.randn(n, generator=g).bfloat16()
    tuned = base.clone()
    moved = torch.rand(n, generator=g) < 0.5
    tuned[moved] = (base[moved].float() * 1.5 + 0.1).bfloat16()
    r = _check(base, tuned, "BF16", "BF16", "BF16")
    assert (r.mask_codec, len(r.mask)) == (CODEC_PACKBITS, (n + 7) // 8)
