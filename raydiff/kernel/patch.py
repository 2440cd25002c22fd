"""Sparse patches of stored bits: which entries differ, and putting their values back.

Arrays in, arrays out: the raw stored bits of a slice of a tensor (unsigned integers of the
dtype's width, as :class:`raydiff.inputs.reader.TensorReader` returns them). A patch holds,
per tensor, the flat indices of the entries whose bits differ and the tuned bits of those
entries; :func:`scatter` of those into the base bits gives the tuned bits exactly — NaN
payloads, signed zeros and all, since nothing here does float arithmetic.

Example:
    >>> import numpy as np
    >>> b = np.array([1, 2, 3, 4], np.uint16); t = np.array([1, 9, 3, 7], np.uint16)
    >>> idx, vals = bitwise_changes(b, t)
    >>> idx.tolist(), vals.tolist()
    ([1, 3], [9, 7])
    >>> bool((scatter(b, idx, vals) == t).all())
    True
"""

from __future__ import annotations

import numpy as np

#: Largest element count whose flat indices are stored as ``I32``.
I32_MAX = (1 << 31) - 1


def index_dtype(numel: int) -> str:
    """The safetensors dtype of a tensor's patch indices: ``I32`` when every flat index of
    ``numel`` elements fits, else ``I64``.

    Example:
        >>> index_dtype(4096 * 4096), index_dtype(1 << 32)
        ('I32', 'I64')
    """
    return "I32" if numel <= I32_MAX else "I64"


def bitwise_changes(base: np.ndarray, tuned: np.ndarray, offset: int = 0,
                    index: str = "I64") -> tuple[np.ndarray, np.ndarray]:
    """Indices and tuned bits of the entries whose stored bits differ.

    Args:
        base, tuned: the stored bits of one slice of a tensor, same length and dtype.
        offset: flat index of the slice's first element (added to every index).
        index: dtype of the indices returned, ``I32`` or ``I64`` (:func:`index_dtype`).

    Returns:
        ``(indices, values)``: ascending flat indices (``int32`` or ``int64``, little-endian)
        and ``tuned``'s bits at them.
    """
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ValueError(f"slices differ: {base.dtype}{base.shape} vs {tuned.dtype}{tuned.shape}")
    where = np.flatnonzero(base != tuned)
    values = tuned[where]
    idx = where.astype("<i4" if index == "I32" else "<i8", copy=False)
    if offset:
        idx += offset
    return idx, values


def scatter(base: np.ndarray, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A copy of ``base`` with ``values`` put at ``indices`` (relative to ``base``'s start).

    Raises:
        ValueError: lengths differ, or an index falls outside ``base`` (a patch that does
            not belong to this slice).
    """
    if indices.shape != values.shape:
        raise ValueError(f"{indices.size} indices but {values.size} values")
    out = np.array(base, copy=True)
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= out.size:
            raise ValueError(f"index {lo if lo < 0 else hi} outside a slice of {out.size} elements")
        out[indices] = values
    return out
