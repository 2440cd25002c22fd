"""The demo's task (2-digit addition as token sequences) and the family's sizes and budgets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# -- the task ------------------------------------------------------------------------------
# tokens 0-9 are digits; the rest of the vocabulary is never used by the task (as most of a
# real model's vocabulary is unused by one finetuning task).
PLUS, EQ, BOS, EOS = 10, 11, 12, 13
VOCAB = 64
SEQ = 11  # <bos> a a + b b = s s s <eos>, the sum's digits least significant first
PROMPT = 7  # tokens up to and including '='
ANSWER = SEQ - PROMPT  # s s s <eos>


@dataclass(frozen=True)
class FamilyConfig:
    """Sizes and training budgets of the demo family. ``small()`` is the tests' variant."""

    hidden: int = 96
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    pretrain_steps: int = 1150
    pretrain_lr: float = 3e-3
    batch: int = 128
    rl_steps: int = 80
    rl_prompts: int = 32
    rl_group: int = 8
    rl_lr: float = 1e-5
    rl_kl: float = 0.05
    dpo_steps: int = 60
    dpo_lr: float = 1e-5
    dpo_beta: float = 0.1
    sft_steps: int = 60
    sft_lr: float = 1e-4
    snapshots: int = 3
    seed: int = 0

    @staticmethod
    def small() -> "FamilyConfig":
        return FamilyConfig(hidden=32, intermediate=64, pretrain_steps=150, batch=64, rl_steps=6,
                            rl_prompts=8, rl_group=4, dpo_steps=6, sft_steps=6, snapshots=2)


MEMBERS = ("rl-seed1", "rl-seed2", "dpo", "sft")


def _batch(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randint(0, 100, (n,), generator=gen)
    b = torch.randint(0, 100, (n,), generator=gen)
    return encode(a, b)


def encode(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Token sequences ``<bos> a a + b b = s s s <eos>`` for operand tensors, the sum written
    units digit first: the order in which a carry is known, which a 2-layer transformer learns
    reliably (most significant first, it stalls near 10 % exact answers on some CPUs)."""
    s = a + b
    cols = [torch.full_like(a, BOS), a // 10, a % 10, torch.full_like(a, PLUS), b // 10, b % 10,
            torch.full_like(a, EQ), s % 10, (s // 10) % 10, s // 100, torch.full_like(a, EOS)]
    return torch.stack(cols, 1)
