"""The torch paths of GPU actors (diff kernel, spectrum) agree with the CPU ones on the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import LADDER, SUM_REL, boundary_pair, ref_diff
from raydiff.kernel.diff import Criteria, diff_unit
from raydiff.kernel.torch_diff import diff_unit_torch
from raydiff.kernel.masks import decode_mask

#: The torch kernel runs on every device a GPU actor may have; "cuda" cases are reported as
#: skipped, with the reason, where there is none.
DEVICES = ["cpu", "cuda"]


def _device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the torch kernel's CUDA path runs only on a GPU machine")
    return device
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_WIDTH = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _same(x, y):
    assert (x.numel, x.changed_bits, x.changed, x.changed_ladder, x.changed_rel, x.nonfinite, x.rows_touched) == \
           (y.numel, y.changed_bits, y.changed, y.changed_ladder, y.changed_rel, y.nonfinite, y.rows_touched)
    np.testing.assert_array_equal(decode_mask(x.mask_codec, x.mask, x.numel), decode_mask(y.mask_codec, y.mask, y.numel))
    assert x.cols_bitmap == y.cols_bitmap
    assert x.max_abs_delta == pytest.approx(y.max_abs_delta, rel=1e-6, nan_ok=True)
    for k in ("sum_abs_delta", "sum_sq_delta", "sum_sq_base"):  # each within the kernel's bound
        a, b = getattr(x, k), getattr(y, k)
        assert a == pytest.approx(b, rel=2 * SUM_REL, nan_ok=True), k


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=80, deadline=None)
@given(dtype=st.sampled_from(sorted(_WIDTH)), seed=st.integers(0, 2**31), rows=st.integers(0, 40),
       cols=st.integers(1, 33), density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), raw_bits=st.booleans())
def test_torch_kernel_matches_cpu_kernel(device, dtype, seed, rows, cols, density, raw_bits):
    rng = np.random.default_rng(seed)
    u = _UINT[_WIDTH[dtype]]
    n = rows * cols
    if raw_bits:  # any bit pattern: NaN, Inf, subnormals, signed zeros
        a = rng.integers(0, np.iinfo(u).max, n, dtype=u, endpoint=True)
    else:
        a = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(
            {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[dtype]).view(torch.uint8).numpy().view(u)
    b = a.copy()
    sel = rng.random(n) < density
    b[sel] ^= rng.integers(1, 2 ** min(8 * _WIDTH[dtype] - 1, 20), sel.sum(), dtype=u)
    ref = diff_unit(a, b, dtype, dtype, dtype, Criteria(), cols)
    got = diff_unit_torch(a, b, dtype, dtype, dtype, Criteria(), cols, device=_device(device))
    _same(got, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_kernel_takes_the_tolerance_in_bf16(device):
    base = torch.zeros(4, dtype=torch.bfloat16)
    tuned = torch.tensor([1e-5, 1.0014e-5, 1.1e-5, 0.0]).bfloat16()
    bits = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    r = diff_unit_torch(bits(base), bits(tuned), "BF16", "BF16", "BF16", Criteria(), device=_device(device))
    assert (r.changed_bits, r.changed) == (3, 1)  # as torch's own (tuned - base).abs() <= 1e-5


_TORCH_DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol", [("BF16", 1e-5), ("BF16", 3e-6), ("F16", 2.0**-13), ("F32", 1e-5),
                                         ("F64", 3e-6), ("F8_E4M3", 2.0**-9), ("F8_E5M2", 2.0**-9)])
def test_torch_kernel_cut_offs_match_torch_itself(device, dtype, atol):
    """Against torch's own ``(tuned - base).abs() <= t`` (builders.ref_diff), not the CPU kernel:
    Δ on and a hair either side of the cut-off of the atol and of every ladder step."""
    tols = LADDER + (atol,) if not dtype.startswith("F8") else (atol,)
    base, tuned = boundary_pair(_TORCH_DT[dtype], tols)
    bits = lambda t: t.contiguous().view(torch.uint8).numpy().view(_UINT[t.element_size()])  # noqa: E731
    r = diff_unit_torch(bits(base), bits(tuned), dtype, dtype, dtype, Criteria(atol=atol), device=_device(device))
    ref = ref_diff(base, tuned, atol=atol)
    assert (r.changed_bits, r.changed, r.changed_rel) == (ref["changed_bits"], ref["changed"], ref["changed_rel"])
    assert r.changed_ladder == tuple(ref[k] for k in ("changed_1e8", "changed_1e7", "changed_1e6", "changed_1e5",
                                                      "changed_1e4"))
    np.testing.assert_array_equal(decode_mask(r.mask_codec, r.mask, r.numel), ref["mask"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_spectrum_matches_cpu():
    from raydiff.kernel.spectrum import spectrum

    g = torch.Generator().manual_seed(0)
    d = torch.randn(512, 256, generator=g) @ torch.diag(torch.logspace(0, -6, 256))
    cpu, gpu = spectrum(d, "exact"), spectrum(d.cuda(), "exact")
    assert gpu.device.startswith("cuda") and gpu.rank == cpu.rank
    assert np.allclose(gpu.top_sv, cpu.top_sv, rtol=1e-4)
