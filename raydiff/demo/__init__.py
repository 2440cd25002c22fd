"""A real, small finetune family trained on the spot, and ``raydiff demo`` over it.

The family (all in Llama layout, bf16 shards + index + ``config.json`` loadable as
``LlamaForCausalLM``):

- ``base``: a 2-layer decoder pretrained from scratch on 2-digit addition
  (``a a + b b = s s s <eos>``, the sum units digit first) to 99.8 % exact answers;
- ``rl-seed1``, ``rl-seed2``: GRPO (group-normalised exact-match rewards, k3 KL penalty to the
  base) on the same prompts, two seeds; ``rl-seed1-step{N}``: intermediate checkpoints;
- ``dpo``: DPO on preference pairs built from the base's own samples (correct vs wrong);
- ``sft``: supervised finetuning on off-policy data (ground-truth answers) of the same task.

Like real RL stacks, training keeps fp32 master weights (AdamW) initialised from the bf16
base and saves bf16. Everything is seeded; the family is cached in a directory and reused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from raydiff.demo.family import Family, build_family, save_checkpoint
from raydiff.demo.task import MEMBERS, FamilyConfig

__all__ = ["MEMBERS", "Family", "FamilyConfig", "build_family", "run_demo", "save_checkpoint"]


def run_demo(store: str, family_dir: str | None, cluster, log: Callable[[str], None] | None = None,
             config: FamilyConfig | None = None) -> str:
    """Build or reuse the family, submit each finetune against the base, return a report."""
    from raydiff.options import DiffOptions, SubmitOptions
    from raydiff.query.report import demo_report
    from raydiff.run.submit import Progress, submit

    log = log or (lambda _msg: None)

    class _Notes(Progress):
        def note(self, message: str) -> None:
            log(f"demo: note: {message}")

    fam_root = family_dir or (store.rstrip("/") + "/demo-family" if "://" not in store else None)
    if fam_root is None:
        from raydiff.errors import InvalidOption
        raise InvalidOption("family_dir must be a local directory for the demo checkpoints when the store is an "
                            "object store", option="family_dir")
    fam = build_family(fam_root, config, log)
    cluster = dataclasses.replace(cluster, keep_actors=True)  # seven submissions in a row
    run_ids = {}
    for name, path in fam.members.items():
        res = submit(str(fam.base), str(path), SubmitOptions(store=store, name=name, diff=DiffOptions(),
                                                               cluster=cluster), _Notes())
        run_ids[name] = res.run_id
        log(f"demo: submitted {name}: run {res.run_id}")
    return demo_report(store, run_ids, fam.accuracy)
