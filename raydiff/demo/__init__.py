"""A real, small finetune family trained on the spot, and ``raydiff demo`` over it.

The family (all in Llama layout, bf16 shards + index + ``config.json`` loadable as
``LlamaForCausalLM``):

- ``base``: a 2-layer decoder pretrained from scratch on 2-digit addition
  (``a a + b b = s s s <eos>``, the sum units digit first) to 99.8 % exact answers;
- ``rl-seed1``, ``rl-seed2``: GRPO (group-normalised exact-match rewards, k3 KL penalty to the
  base) on the same prompts, two seeds; ``rl-seed1-step{N}``: intermediate checkpoints, which
  with ``rl-seed1`` the demo analyses as a chain (every step against the one before);
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

__all__ = ["CHAIN", "MEMBERS", "Family", "FamilyConfig", "build_family", "chain_members", "run_demo",
           "save_checkpoint"]


def run_demo(store: str, family_dir: str | None, cluster, log: Callable[[str], None] | None = None,
             config: FamilyConfig | None = None) -> str:
    """Build or reuse the family, submit each finetune against the base and the RL run's
    checkpoints as the chain ``rl-seed1`` (:data:`CHAIN`), return a report."""
    from raydiff.options import DiffOptions, SubmitOptions
    from raydiff.query.report import demo_report
    from raydiff.run.chain import submit_chain
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
    # The demo shows the Ray path (a local cluster, its actor pool kept for the seven submissions)
    # unless told otherwise.
    cluster = dataclasses.replace(cluster, keep_actors=True, backend="ray" if cluster.backend == "auto" else cluster.backend)
    run_ids = {}
    for name, path in fam.members.items():
        res = submit(str(fam.base), str(path), SubmitOptions(store=store, name=name, diff=DiffOptions(),
                                                               cluster=cluster), _Notes())
        run_ids[name] = res.run_id
        log(f"demo: submitted {name}: run {res.run_id}")
    steps = chain_members(fam.members)
    chain = None
    if len(steps) > 1:
        done = submit_chain(str(fam.base), [str(fam.members[n]) for n in steps], CHAIN,
                            SubmitOptions(store=store, diff=DiffOptions(), cluster=cluster), _Notes())
        chain = CHAIN
        log(f"demo: submitted the chain {CHAIN} ({' → '.join(steps)}): {len(done.runs)} runs at atol 0")
    return demo_report(store, run_ids, fam.accuracy, chain=chain)


#: The chain of the demo: the checkpoints of the first RL run, in training order.
CHAIN = "rl-seed1"


def chain_members(members) -> list[str]:
    """The RL run's checkpoints among ``members``, in training order: ``rl-seed1-step{N}`` by
    N, then ``rl-seed1``."""
    snaps = sorted((n for n in members if n.startswith(f"{CHAIN}-step") and n[len(CHAIN) + 5:].isdigit()),
                   key=lambda n: int(n[len(CHAIN) + 5:]))
    return snaps + [CHAIN] if CHAIN in members else snaps
