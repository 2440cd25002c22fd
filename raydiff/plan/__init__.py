"""Stage 2 — the plan: every tensor of either checkpoint paired, cut into work units.

- :mod:`~raydiff.plan.match`: pairing by name, with every decision recorded (renames, tied
  heads, resized vocabularies, widened dtypes, and the layouts of
  :mod:`~raydiff.plan.formats`: block-scaled FP8, fused projections, stacks of experts);
- :mod:`~raydiff.plan.units`: the paired tensors cut into units at fixed offsets, and the
  matrices whose spectrum is taken.
"""

from raydiff.plan.formats import BlockScale
from raydiff.plan.match import EMBEDDINGS, LM_HEAD, Pairing, compare_dtype, match_tensors
from raydiff.plan.units import (HashTask, Plan, SpectrumTask, TensorPlan, WorkUnit, hash_tasks, make_plan, summarize,
                                unit_elems_for)

__all__ = ["EMBEDDINGS", "LM_HEAD", "BlockScale", "HashTask", "Pairing", "Plan", "SpectrumTask", "TensorPlan", "WorkUnit",
           "hash_tasks",
           "compare_dtype", "make_plan", "match_tensors", "summarize", "unit_elems_for"]
