"""Stage 4 — a run: resolve → plan → actors → commit (:func:`~raydiff.run.submit.submit`).

- :mod:`~raydiff.run.submit`: the driver, the one path data takes;
- :mod:`~raydiff.run.execute`: what an actor does with one unit or one matrix, without Ray;
- :mod:`~raydiff.run.actors`: the Ray actor pool, the only module that imports Ray;
- :mod:`~raydiff.run.patch`: ``patch`` and ``apply``, sparse patches made and applied on Ray;
- :mod:`~raydiff.run.patch_work`: one patch shard or one rebuilt tensor, without Ray.
"""
