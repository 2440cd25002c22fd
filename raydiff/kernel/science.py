"""The follow-up papers' per-matrix metrics — pure torch/numpy, CPU or GPU.

Definitions (sources in ``docs/counting.md``):

- **Principal angles** (Zhu et al., arXiv 2511.08567): with ``U₀,ₖ``, ``U₁,ₖ`` the top-k left
  singular vectors of ``W₀`` and ``W₁`` (``V`` for the right), ``cos θᵢ = σᵢ(U₀,ₖᵀ U₁,ₖ)``.
  The largest angle is taken from the sines, ``sin θ_max = σ₁((I − U₀U₀ᵀ) U₁)``, which keep
  their precision where a cosine rounds to 1 (RL moves these by well under a degree).
- **Spectral shift**: ``‖σ(W₁) − σ(W₀)‖₂ / ‖σ(W₀)‖₂`` over the top-k singular values, and over
  the whole spectrum when it is computed exactly.
- **Energy rank** of ΔW (arXiv 2602.07729): the smallest r with ``Σ_{i≤r} σᵢ² ≥ 0.99 ‖ΔW‖F²``;
  ``None`` when the singular values at hand (a sketch's) do not reach 99 % of ``‖ΔW‖F²``.
- **Row and column profiles**: the coefficient of variation of the per-row and per-column
  fractions of changed entries, beside that of a mask with the same number of changes put at
  random (:func:`cv_random`).
- **Magnitude masks** (Zhu et al.; 2606.07082): ``M_low(α)``, the entries whose ``|W₀|`` is at
  most the α-quantile (the value at sorted position ``⌈α·n⌉``, so every entry equal to it is
  in); reported as ``|M_low ∩ M| / |M|`` beside its baseline ``|M_low| / n``.

The top-k subspaces come from a randomised SVD (Halko, Martinsson & Tropp 2011) of
``k + max(k, 8)`` directions with :data:`SUBSPACE_POWER_ITERS` power iterations, one random
test matrix shared by ``W₀`` and ``W₁`` (their errors are alike and cancel in the angles).
For matrices whose spectrum has a gap after σₖ the cosines are within 1e-4 of an exact SVD's
(tested); where σₖ ≈ σₖ₊₁ the top-k subspace itself is ill-defined and so are its angles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a matrix is decomposed: the commit's CVs need only numpy
    import torch

#: power iterations of the subspace sketch: each costs two passes over the matrix
SUBSPACE_POWER_ITERS = 6
#: the α of the magnitude masks, and their column suffixes
LOW_MAG_ALPHAS = (0.1, 0.3, 0.5)
#: the energy fraction of ``energy_rank_99``
ENERGY = 0.99


@dataclass(frozen=True)
class Subspace:
    """How the top-k singular subspaces of ``W₀`` and ``W₁`` differ.

    Attributes:
        k: subspace dimension used (``min(k asked, m, n)``).
        cos_u, cos_v: the k cosines of the principal angles between the left (right)
            subspaces, descending.
        angle_max_deg: the largest principal angle of either side, in degrees.
        shift_topk: ``‖σ₁:ₖ(W₁) − σ₁:ₖ(W₀)‖₂ / ‖σ₁:ₖ(W₀)‖₂``.
        seconds: wall time.
    """

    k: int
    cos_u: tuple[float, ...]
    cos_v: tuple[float, ...]
    angle_max_deg: float
    shift_topk: float | None
    seconds: float


def range_basis(w: torch.Tensor, width: int, seed: int, power_iters: int) -> torch.Tensor:
    """An orthonormal ``m × width`` basis of ``w``'s leading range: the randomised range
    finder of Halko, Martinsson & Tropp (2011) with ``power_iters`` power iterations, each
    re-orthonormalised. Deterministic for a seed (the test matrix is drawn on the CPU)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(w.shape[1], width, generator=gen, dtype=w.dtype).to(w.device)
    q, _ = torch.linalg.qr(matmul(w, omega))
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(matmul(q.T, w).T)  # wᵀq, as (qᵀw)ᵀ: BLAS's faster layout
        q, _ = torch.linalg.qr(matmul(w, z))
    return q


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``. On the CPU, float32 and float64 go through numpy's BLAS (OpenBLAS in
    numpy's wheels), which runs the sketches' skinny products 1.2–1.6× as fast as torch's
    MKL on the AMD CPU measured (59–77 against 44–50 GFLOP/s on one thread:
    ``benchmarks/run.py --only products``). One thread per worker is the caller's to set, as
    for torch (:func:`raydiff.run.local.run_work`): the BLAS's results depend on its thread
    count."""
    import torch

    if a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype \
            and a.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return a @ b


def top_subspace(w: torch.Tensor, k: int, seed: int = 0,
                 power_iters: int = SUBSPACE_POWER_ITERS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, σ, V)``: the top-k singular triplets of ``w`` by a randomised SVD (columns of
    ``U`` and ``V`` orthonormal, σ descending). Deterministic for a seed."""
    import torch

    m, n = w.shape
    q = range_basis(w, min(k + max(k, 8), m, n), seed, power_iters)
    u_small, s, vh = torch.linalg.svd(matmul(q.T, w), full_matrices=False)
    return matmul(q, u_small)[:, :k], s[:k], vh[:k].T


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[tuple[float, ...], float]:
    """The cosines of the principal angles between the spans of two orthonormal bases
    (descending), and the largest angle in degrees from the sines."""
    import torch

    a64, b64 = a.double(), b.double()
    cos = torch.linalg.svdvals(a64.T @ b64).clamp(0.0, 1.0).cpu()
    residual = b64 - a64 @ (a64.T @ b64)
    sin_max = float(torch.linalg.svdvals(residual)[0].clamp(0.0, 1.0)) if residual.numel() else 0.0
    return tuple(float(x) for x in cos), math.degrees(math.asin(sin_max))


def nonfinite(t: torch.Tensor) -> int:
    """How many entries of a float tensor are NaN or ±Inf.

    ``torch.isfinite`` over a matrix is slow on the CPU: 0.9 s for a 4096×14336 float32 one
    on one thread, which made it a large part of each spectrum's cost. Its minimum and
    maximum, which any NaN or ±Inf reaches, take 0.04 s; the exact count runs only when
    they are not finite.

    Example:
        >>> import torch; nonfinite(torch.tensor([1.0, float("nan"), float("-inf")]))
        2
    """
    import torch

    if not t.numel():
        return 0
    lo, hi = torch.aminmax(t)
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return 0
    return int(t.numel() - torch.count_nonzero(torch.isfinite(t)))


def subspace(w0: torch.Tensor, w1: torch.Tensor, k: int, seed: int = 0) -> Subspace | None:
    """Principal angles and top-k spectral shift of two float32 matrices of one shape;
    ``None`` when either holds NaN or ±Inf (no subspace to speak of)."""
    t0 = time.perf_counter()
    if nonfinite(w0) or nonfinite(w1):
        return None
    k = min(k, *w0.shape)
    u0, s0, v0 = top_subspace(w0, k, seed)
    u1, s1, v1 = top_subspace(w1, k, seed)
    cos_u, max_u = principal_cosines(u0, u1)
    cos_v, max_v = principal_cosines(v0, v1)
    return Subspace(k, cos_u, cos_v, max(max_u, max_v), spectral_shift(s0, s1), time.perf_counter() - t0)


def spectral_shift(s0: torch.Tensor, s1: torch.Tensor) -> float | None:
    """``‖s1 − s0‖₂ / ‖s0‖₂`` of two singular value vectors (NULL when ``s0`` is 0)."""
    import torch

    s0, s1 = s0.double().cpu(), s1.double().cpu()
    norm = float(torch.linalg.vector_norm(s0))
    return float(torch.linalg.vector_norm(s1 - s0)) / norm if norm > 0 else None


def energy_rank(sv: np.ndarray | torch.Tensor, fro2: float, energy: float = ENERGY) -> int | None:
    """The smallest r with ``Σ_{i≤r} σᵢ² ≥ energy · fro2``, from the leading singular values
    ``sv`` (descending); 0 for a zero matrix; ``None`` when ``sv`` do not reach it.

    Example:
        >>> energy_rank(np.array([3.0, 1.0, 0.1]), 9 + 1 + 0.01)
        2
    """
    if fro2 <= 0:
        return 0
    s = np.asarray(sv.cpu() if hasattr(sv, "cpu") else sv, np.float64)
    cum = np.cumsum(s * s)
    # the squares of the σ's sum to ‖ΔW‖F² up to the SVD's rounding: allow it
    need = energy * fro2 * (1 - 1e-6)
    hit = np.flatnonzero(cum >= need)
    return int(hit[0]) + 1 if hit.size else None


def cv_of_counts(total: int, total_sq: int, groups: int) -> float | None:
    """Coefficient of variation (population std / mean) of ``groups`` counts from their sum
    and sum of squares; ``None`` when the mean is 0."""
    if groups <= 0 or total <= 0:
        return None
    mean = total / groups
    var = max(total_sq / groups - mean * mean, 0.0)
    return math.sqrt(var) / mean


def cv_random(changed: int, numel: int, group_size: int) -> float | None:
    """The coefficient of variation of per-group counts (groups of ``group_size`` entries)
    expected of ``changed`` changes placed at random among ``numel`` entries:
    ``sqrt(E[var]) / mean`` with the hypergeometric variance
    ``g·p·(1−p)·(n−g)/(n−1)``; ``None`` when nothing changed."""
    if changed <= 0 or numel <= 1 or group_size <= 0:
        return None
    p = changed / numel
    var = group_size * p * (1 - p) * (numel - group_size) / (numel - 1)
    return math.sqrt(max(var, 0.0)) / (group_size * p)


#: The bits of +inf for the 16-bit floats whose |w| orders as ``bits & 0x7FFF``.
_INF_KEY = {"BF16": 0x7F80, "F16": 0x7C00}


def low_magnitude_overlap_bits(bits: np.ndarray, dtype: str, mask: np.ndarray,
                               alphas: tuple[float, ...] = LOW_MAG_ALPHAS,
                               packed_mask: bool = False) -> list[tuple[float | None, float]]:
    """:func:`low_magnitude_overlap` from the stored bits of a BF16 or F16 ``W₀``: ``|w|``
    orders as ``bits & 0x7FFF`` (NaNs above +inf), so one count per magnitude (32 768 bins,
    all and changed, in one pass) gives every quantile and both counts exactly, instead of a
    selection and a compare per α. ``mask``: one bool per entry, or LSB-first packed bits
    with ``packed_mask``."""
    from raydiff.kernel._gaps import magnitude_counts

    b = np.ascontiguousarray(np.asarray(bits).reshape(-1)).view(np.uint16)
    n = b.size
    if n == 0:
        return [(None, 0.0) for _ in alphas]
    packed = mask if packed_mask else np.packbits(np.asarray(mask, bool).reshape(-1), bitorder="little")
    hist = np.zeros((2, 1 << 16), np.int64)
    magnitude_counts(b, packed, hist)
    both = hist.sum(axis=0)
    changed_counts = both[1::2]
    counts = both[0::2] + changed_counts
    inf = _INF_KEY[dtype]
    cum, cum_changed = np.cumsum(counts), np.cumsum(changed_counts)
    changed = int(cum_changed[-1])
    out = []
    for alpha in alphas:
        q = min(int(np.searchsorted(cum, max(1, math.ceil(alpha * n)))), inf)  # a NaN quantile: all finite in
        out.append((int(cum_changed[q]) / changed if changed else None, int(cum[q]) / n))
    return out


def low_magnitude_overlap(abs_w0: np.ndarray, mask: np.ndarray,
                          alphas: tuple[float, ...] = LOW_MAG_ALPHAS) -> list[tuple[float | None, float]]:
    """For each α: ``(|M_low(α) ∩ M| / |M|, |M_low(α)| / n)`` with ``M_low(α)`` the entries whose
    ``|W₀|`` is at most the value at sorted position ``⌈α·n⌉`` (ties all in). The overlap is
    ``None`` when ``M`` is empty. NaN magnitudes sort last (never in ``M_low``).

    Example:
        >>> low_magnitude_overlap(np.array([1., 2., 3., 4.]), np.array([1, 0, 0, 1], bool), (0.5,))
        [(0.5, 0.5)]
    """
    a = np.asarray(abs_w0).reshape(-1)
    m = np.asarray(mask, bool).reshape(-1)
    n = a.size
    if n == 0:
        return [(None, 0.0) for _ in alphas]
    positions = [max(1, math.ceil(alpha * n)) - 1 for alpha in alphas]
    cuts = np.partition(a, sorted(set(positions)))
    changed = int(np.count_nonzero(m))
    sel = a[m]
    out = []
    for pos in positions:
        q = cuts[pos]
        if np.isnan(q):  # the position falls among NaN weights: every other entry is in
            q = np.inf
        low = int(np.count_nonzero(a <= q))
        both = int(np.count_nonzero(sel <= q))
        out.append((both / changed if changed else None, low / n))
    return out
