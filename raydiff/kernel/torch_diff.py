"""The diff kernel in torch, for actors that hold a GPU: same inputs, same :class:`UnitDiff`.

Semantics are those of :func:`raydiff.kernel.diff.diff_unit` (whose docstring is the contract):
the same thresholds through :func:`raydiff.kernel.diff.cutoff`, the same masks, the same counts;
only the summation order of the float statistics differs. Same-dtype float pairs run on the
device; mixed and integer pairs, rare in checkpoints, go to the CPU kernel. Runs on
``device="cpu"`` too, which is how the tests check it against the CPU kernel.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from raydiff.kernel.diff import Criteria, UnitDiff, cutoff, diff_unit
from raydiff.kernel.masks import encode_packed

_TORCH_FLOAT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)  # LSB-first, as masks.py stores


def read_only_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of an array that may be read-only (a view of a checkpoint's
    memory map), without torch's warning about it, which a user would otherwise see on every
    run that hands such a view to torch: what takes these tensors only reads them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(a)


def _to_device(bits: np.ndarray, device: str) -> torch.Tensor:
    return read_only_tensor(bits.view(np.dtype(f"i{bits.dtype.itemsize}"))).to(device, non_blocking=True)


def _packbits(mask: torch.Tensor) -> np.ndarray:
    n = mask.numel()
    pad = (-n) % 8
    m = torch.nn.functional.pad(mask.to(torch.int32), (0, pad)).view(-1, 8)
    return (m * _BIT_WEIGHTS.to(mask.device)).sum(1).to(torch.uint8).cpu().numpy()


def diff_unit_torch(base: np.ndarray, tuned: np.ndarray, base_dtype: str, tuned_dtype: str,
                    compare_dtype: str, criteria: Criteria, row_len: int = 0,
                    device: str = "cuda") -> UnitDiff:
    """:func:`raydiff.kernel.diff.diff_unit` on a torch device (``cuda``, ``cuda:1``, ``cpu``)."""
    if base_dtype != tuned_dtype or compare_dtype not in _TORCH_FLOAT:
        return diff_unit(base, tuned, base_dtype, tuned_dtype, compare_dtype, criteria, row_len)
    n = int(base.size)
    if row_len and n % row_len:
        raise ValueError(f"unit of {n} elements does not cover whole rows of {row_len}")
    a, b = _to_device(base, device), _to_device(tuned, device)
    neq = a != b
    tdt = _TORCH_FLOAT[compare_dtype]
    wide = torch.float64 if compare_dtype == "F64" else torch.float32
    wa = a.view(tdt).to(wide)
    wb = b.view(tdt).to(wide)
    d = wb - wa
    ad = d.abs()
    cuts = [cutoff(criteria.atol, compare_dtype)] + [cutoff(t, compare_dtype) for t in criteria.ladder]
    over = [neq & ~(ad <= float(c)) for c in cuts]
    eta = torch.tensor(np.float32(criteria.rel_eta), dtype=wide, device=a.device)
    rel = neq & ~(ad <= eta * torch.maximum(wa.abs(), wb.abs()))
    finite = torch.isfinite(wa) & torch.isfinite(wb)
    stats_sel = neq & finite
    d64 = (wb[stats_sel].double() - wa[stats_sel].double()).abs()
    mask = over[0]
    changed = int(mask.sum())
    counts = torch.stack([neq.sum(), (neq & ~finite).sum(), rel.sum()] + [o.sum() for o in over]).cpu().tolist()
    rows_touched = cols_bitmap = None
    row_sq: int | None = None
    col_changed: tuple[int, ...] | None = None
    if row_len:
        grid = mask.view(-1, row_len)
        rows_touched = int(grid.any(1).sum())
        cols_bitmap = _packbits(grid.any(0)).tobytes() if changed else b""
        row_sq, col_changed = 0, ()
        if changed:
            per_row = grid.sum(1, dtype=torch.int64)
            row_sq = int((per_row * per_row).sum())
            col_changed = tuple(grid.sum(0, dtype=torch.int64).cpu().tolist())
    codec, payload = encode_packed(_packbits(mask), changed)
    return UnitDiff(
        numel=n, changed_bits=counts[0], changed=changed, changed_ladder=tuple(counts[4:]),
        changed_rel=counts[2], changed_subprecision=None, nonfinite=counts[1],
        max_abs_delta=float(d64.max()) if d64.numel() else 0.0, sum_abs_delta=float(d64.sum()),
        sum_sq_delta=float((d64 * d64).sum()), sum_sq_base=float((wa.double() ** 2).sum()),
        rows_touched=rows_touched, cols_bitmap=cols_bitmap, mask_codec=codec, mask=payload,
        row_changed_sq=row_sq, col_changed=col_changed,
    )
