"""The ``raydiff`` command line (installed as ``raydiff.cli``)."""
