"""Stage 3 — the kernel: arrays of stored bits in, records out. Pure: no I/O, no Ray, no store.

- :mod:`~raydiff.kernel.diff`: one work unit → :class:`UnitDiff` (counts under every
  criterion, Δ statistics, rows/columns touched, the compressed mask), by the fused loops
  :mod:`~raydiff.kernel._compact` (AVX-512) or :mod:`~raydiff.kernel._fused`, or numpy;
- :mod:`~raydiff.kernel.torch_diff`: the same record from torch, for GPU actors;
- :mod:`~raydiff.kernel.spectrum`: singular spectrum and rank of one ΔW;
- :mod:`~raydiff.kernel.science`: the follow-up papers' per-matrix metrics (principal
  angles, spectral shift, energy rank, row/column profiles, magnitude masks);
- :mod:`~raydiff.kernel.masks`: the mask codecs (``packbits``, ``zstd``, ``gaps``);
- :mod:`~raydiff.kernel.patch`: the entries whose bits differ, and scattering them back.
"""

from raydiff.kernel.diff import Criteria, UnitDiff, best_loop, cutoff, decode, diff_unit
from raydiff.kernel.masks import decode_mask, encode_mask


# The spectrum (:mod:`raydiff.kernel.spectrum`) needs torch: imported by those who use it, so
# that reading masks (``raydiff sql``) does not load torch.
__all__ = ["Criteria", "UnitDiff", "best_loop", "cutoff", "decode", "decode_mask", "diff_unit", "encode_mask"]
