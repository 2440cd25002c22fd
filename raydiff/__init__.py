"""raydiff: what did this finetune change in the weights?

Diffs checkpoint pairs on Ray into a Parquet store queried with DuckDB. Entry points:
:func:`raydiff.run.submit.submit` (the library's ``raydiff submit``) and
:func:`raydiff.query.views.connect` (DuckDB over a store).
"""
