"""Stage 5 — the store: Parquet files written whole or not at all, runs committed atomically.

Knows records and files, nothing of planning, kernels or Ray (:mod:`~raydiff.store.base`).
"""

from raydiff.store.base import Store, redact

__all__ = ["Store", "redact"]
