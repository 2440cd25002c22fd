"""Stage 6 — questions: DuckDB over a store, mask intersections, reports.

- :mod:`~raydiff.query.views`: the connection, its views and macros (``queries/*.sql``);
- :mod:`~raydiff.query.overlap`: intersections of stored masks, as DuckDB functions;
- :mod:`~raydiff.query.report`: the demo's text report and the HTML/PNG report;
- :mod:`~raydiff.query.export`: change masks out as a safetensors file of bool tensors.
"""
