"""Rank and singular spectrum of an update ΔW — pure torch, CPU or GPU (a sketch's products
on the CPU by numpy's BLAS, :func:`raydiff.kernel.science.matmul`).

``exact`` computes every singular value (``torch.linalg.svdvals``) and reports the paper's
``matrix_rank`` — the count of σ_i > σ_1 · max(m, n) · eps(fp32), which is exactly
``torch.linalg.matrix_rank``'s default tolerance — next to numbers that tell real rank from
bf16 rounding noise: the top singular values, stable rank ‖Δ‖F² / σ_1², effective rank
exp(H(σ / Σσ)) and the rank at relative cut-offs σ_i > c · σ_1.

``sketch`` is a randomised SVD (Halko, Martinsson & Tropp 2011, with power iterations) of
``sketch_rank`` directions: cost O(m·n·k) instead of O(m·n·min(m, n)). It gives accurate top
singular values and stable rank; ``rank`` (the paper's) and effective rank are NULL since
they need every σ, and the cut-off ranks are capped at the sketch size.

A ΔW holding NaN or ±Inf (a diverged run, an fp8 NaN code, a Δ that overflowed the compared
dtype) has no singular values: its spectrum is returned as not computed, with the reason in
``note``, instead of failing the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from raydiff.kernel._gaps import sum_squares
from raydiff.kernel.science import energy_rank, matmul, nonfinite, range_basis
from raydiff.options import RANK_CUTOFFS

_POWER_ITERS = 2
_OVERSAMPLE = 8


@dataclass(frozen=True)
class Spectrum:
    """The spectrum summary of one ΔW.

    Attributes:
        method: ``exact`` or ``sketch``.
        device: torch device the SVD ran on (``cpu``, ``cuda:0``…).
        rank: paper's rank (matrix_rank at its default tolerance); NULL for sketch.
        max_rank: ``min(m, n)``.
        top_sv: leading singular values, largest first.
        stable_rank: ‖Δ‖F² / σ_1² (NULL when Δ = 0).
        effective_rank: exp of the entropy of σ / Σσ (exact only; NULL when Δ = 0).
        rank_cutoffs: counts of σ_i > c · σ_1 for c in ``RANK_CUTOFFS`` (capped at the sketch
            size for sketch).
        fro: ‖Δ‖F of the matrix analysed (NULL when not computed).
        energy_rank_99: smallest r with ``Σ_{i≤r} σᵢ² ≥ 0.99 ‖Δ‖F²`` (NULL when the σ computed,
            a sketch's, do not reach it; 0 for Δ = 0).
        seconds: wall time of the decomposition.
        note: why the spectrum was not computed (``""`` when it was).
    """

    method: str
    device: str
    rank: int | None
    max_rank: int
    top_sv: tuple[float, ...]
    stable_rank: float | None
    effective_rank: float | None
    rank_cutoffs: tuple[int, ...]
    fro: float | None
    seconds: float
    note: str = ""
    energy_rank_99: int | None = None

    @property
    def computed(self) -> bool:
        return not self.note


def spectrum(delta: torch.Tensor, method: str = "exact", top_k: int = 32,
             sketch_rank: int = 128, seed: int = 0) -> Spectrum:
    """Rank and spectrum of a 2-D update.

    Args:
        delta: ``m × n`` float32 tensor on any device.
        method: ``exact`` or ``sketch``.
        top_k: number of leading singular values to keep.
        sketch_rank: directions in the randomised sketch (``sketch`` only).
        seed: seed of the sketch's random test matrix (results are deterministic).

    Example:
        >>> d = torch.outer(torch.arange(4.), torch.ones(3)); spectrum(d).rank
        1
        >>> spectrum(torch.tensor([[1.0, float("nan")]])).note
        'ΔW has 1 non-finite entry (NaN or ±Inf)'
    """
    if delta.ndim != 2:
        raise ValueError(f"spectrum needs a 2-D matrix, got shape {tuple(delta.shape)}")
    m, n = delta.shape
    max_rank = min(m, n)
    t0 = time.perf_counter()
    fro2 = _sum_sq(delta)
    bad = 0 if math.isfinite(fro2) else nonfinite(delta)  # any NaN or ±Inf makes Σ Δ² NaN or +Inf
    if bad:
        what = "entry" if bad == 1 else "entries"
        return Spectrum(method, str(delta.device), None, max_rank, (), None, None, (), None,
                        time.perf_counter() - t0, f"ΔW has {bad} non-finite {what} (NaN or ±Inf)")
    if method == "exact":
        s = torch.linalg.svdvals(delta).double().cpu()
    elif method == "sketch":
        s = _sketch_svdvals(delta, min(sketch_rank, max_rank), seed).double().cpu()
    else:
        raise ValueError(f"unknown spectrum method {method!r}")
    seconds = time.perf_counter() - t0
    s1 = float(s[0]) if s.numel() else 0.0
    if not math.isfinite(s1):  # finite entries whose σ₁ overflows float32 (|ΔW| near 3e38)
        return Spectrum(method, str(delta.device), None, max_rank, (), None, None, (), math.sqrt(fro2), seconds,
                        "σ₁ of ΔW overflows float32")
    if s1 == 0.0:
        return Spectrum(method, str(delta.device), 0 if method == "exact" else None, max_rank,
                        tuple(float(x) for x in s[:top_k]), None, None, (0,) * len(RANK_CUTOFFS), 0.0, seconds,
                        energy_rank_99=0)
    rank = None
    effective = None
    if method == "exact":
        tol = s1 * max(m, n) * torch.finfo(torch.float32).eps
        rank = int(torch.count_nonzero(s > tol))
        p = s / s.sum()
        p = p[p > 0]
        effective = float(torch.exp(-(p * p.log()).sum()))
    cutoffs = tuple(int(torch.count_nonzero(s > c * s1)) for c in RANK_CUTOFFS)
    return Spectrum(method, str(delta.device), rank, max_rank, tuple(float(x) for x in s[:top_k]),
                    fro2 / (s1 * s1), effective, cutoffs, math.sqrt(fro2), seconds,
                    energy_rank_99=energy_rank(s.numpy(), fro2))


def _sum_sq(a: torch.Tensor, block_elems: int = 1 << 16) -> float:
    """Σ a² in float64. On the CPU, one numba pass (:func:`raydiff.kernel._gaps.sum_squares`,
    0.05 s for a 4096×14336 float32 matrix, which also stands in for the finiteness check).
    Elsewhere a block of rows at a time: a float64 copy of the whole matrix would be twice
    its size (8.4 GB for a 128256×4096 embedding's ΔW), and blocks of ≈ ``block_elems``
    entries keep the float64 temporaries in the cache (0.12 s on the CPU, against 1.6 s with
    blocks of 1024 rows)."""
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and a.is_contiguous():
        return float(sum_squares(a.numpy().reshape(-1)))
    rows = max(1, block_elems // max(1, a.shape[1]))
    total = 0.0
    for i in range(0, a.shape[0], rows):
        total += float(torch.sum(a[i:i + rows].double() ** 2))
    return total


def _sketch_svdvals(a: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    q = range_basis(a, min(k + _OVERSAMPLE, *a.shape), seed, _POWER_ITERS)
    # σ(qᵀa) are those of R in aᵀq = ZR: a QR of the tall n × l matrix without forming Z,
    # then the l × l SVD, takes 21 ms for n = 14336 where svdvals of the wide qᵀa takes 67 ms
    # (one thread), and is as accurate (backward stable)
    return torch.linalg.svdvals(torch.linalg.qr(matmul(q.T, a).T, mode="r")[1])[:k]
