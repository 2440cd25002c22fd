"""Stage 1 — inputs: checkpoint references resolved into :class:`Checkpoint` records.

- :mod:`~raydiff.inputs.refs`: a local path or ``org/name[@revision]`` → :class:`Checkpoint`;
- :mod:`~raydiff.inputs.checkpoint`: local layouts (index, shards, single file), identity;
- :mod:`~raydiff.inputs.safetensors`: one shard's header, parsed and validated;
- :mod:`~raydiff.inputs.hub`, :mod:`~raydiff.inputs.remote`: the Hub's API and byte ranges;
- :mod:`~raydiff.inputs.reader`: tensor bytes for the actors (mmap, range, node cache).

Nothing here reads a tensor byte except the reader.
"""

from raydiff.inputs.checkpoint import Checkpoint, load_checkpoint
from raydiff.inputs.refs import identify, resolve
from raydiff.inputs.safetensors import TensorInfo

__all__ = ["Checkpoint", "TensorInfo", "identify", "load_checkpoint", "resolve"]
