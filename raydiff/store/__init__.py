"""Stage 5 — the store: Parquet files written whole or not at all, runs committed atomically.

- :mod:`~raydiff.store.layout`: where every file lives (the one description of the layout);
- :mod:`~raydiff.store.files`: whole-or-nothing writes, reads, listings on any filesystem;
- :mod:`~raydiff.store.log`: append-only record logs folded into snapshots (catalog, events);
- :mod:`~raydiff.store.catalog`: which runs the store holds and which are complete;
- :mod:`~raydiff.store.commit`: a run's units folded into one file, totals per tensor;
- :mod:`~raydiff.store.store`: :class:`Store`, a run's life from start to commit;
- :mod:`~raydiff.store.upgrade`: stores of earlier layouts converted in place;
- :mod:`~raydiff.store.tensorfiles`: safetensors files (masks, patches) written whole or not at all.

Knows records and files, nothing of planning, kernels or Ray.
"""

from raydiff.store.files import redact
from raydiff.store.store import Store

__all__ = ["Store", "redact"]
