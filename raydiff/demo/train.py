"""The family's training: pretraining, GRPO, DPO and SFT, fp32 master weights from a bf16 base."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from raydiff.demo.model import TinyLlama
from raydiff.demo.task import ANSWER, PROMPT, VOCAB, FamilyConfig, _batch


def _answer_logprobs(model: TinyLlama, seqs: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the answer tokens of each sequence."""
    logits = model(seqs[:, :-1])[:, PROMPT - 1:]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, seqs[:, PROMPT:, None]).squeeze(-1)
    return lp


@torch.no_grad()
def sample(model: TinyLlama, prompts: torch.Tensor, gen: torch.Generator, greedy: bool = False) -> torch.Tensor:
    """Complete prompts (``[n, PROMPT]``) with the model; returns full ``[n, SEQ]`` sequences."""
    seqs = prompts
    for _ in range(ANSWER):
        logits = model(seqs)[:, -1].float()
        nxt = logits.argmax(-1) if greedy else torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        seqs = torch.cat([seqs, nxt[:, None]], 1)
    return seqs


def accuracy(model: TinyLlama, n: int = 1000, seed: int = 12345) -> float:
    """Greedy exact-match accuracy on ``n`` fresh problems."""
    gen = torch.Generator().manual_seed(seed)
    ref = _batch(n, gen)
    out = sample(model, ref[:, :PROMPT], gen, greedy=True)
    return float((out == ref).all(1).float().mean())


def _bf16_roundtrip(model: TinyLlama) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())


def _pretrain(c: FamilyConfig) -> TinyLlama:
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    model = TinyLlama(c)
    opt = torch.optim.AdamW(model.parameters(), lr=c.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, c.pretrain_lr, total_steps=c.pretrain_steps, pct_start=0.1)
    for _ in range(c.pretrain_steps):
        x = _batch(c.batch, gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _bf16_roundtrip(model)  # the published base is bf16; finetunes start from it
    return model


def _copy(model: TinyLlama, c: FamilyConfig) -> TinyLlama:
    m = TinyLlama(c)
    m.load_state_dict(model.state_dict())
    return m


def _grpo(base: TinyLlama, c: FamilyConfig, seed: int,
          on_snapshot: Callable[[int, TinyLlama], None] | None = None) -> TinyLlama:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy, ref = _copy(base, c), _copy(base, c)
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=c.rl_lr, weight_decay=0.01)
    snap_every = max(1, c.rl_steps // (c.snapshots + 1))
    for step in range(1, c.rl_steps + 1):
        problems = _batch(c.rl_prompts, gen).repeat_interleave(c.rl_group, 0)
        seqs = sample(policy, problems[:, :PROMPT], gen)
        reward = (seqs == problems).all(1).float().view(c.rl_prompts, c.rl_group)
        adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)).view(-1)
        lp = _answer_logprobs(policy, seqs)
        with torch.no_grad():
            ref_lp = _answer_logprobs(ref, seqs)
        log_ratio = ref_lp - lp
        kl = (log_ratio.exp() - log_ratio - 1).sum(1)  # k3 estimator of KL(π‖π_ref)
        loss = (-(adv * lp.sum(1)) + c.rl_kl * kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_snapshot and step % snap_every == 0 and step // snap_every <= c.snapshots:
            on_snapshot(step, policy)
    return policy


def _dpo(base: TinyLlama, c: FamilyConfig, seed: int) -> TinyLlama:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy, ref = _copy(base, c), _copy(base, c)
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=c.dpo_lr, weight_decay=0.01)
    for _ in range(c.dpo_steps):
        problems = _batch(c.batch, gen)
        samples = sample(ref, problems[:, :PROMPT], gen)
        # rejected: the base's own answer when wrong, else a corrupted copy of the right one
        wrong = (samples != problems).any(1)
        corrupt = problems.clone()
        corrupt[:, PROMPT + 2] = (corrupt[:, PROMPT + 2] + 1 + torch.randint(0, 9, (len(problems),), generator=gen)) % 10
        rejected = torch.where(wrong[:, None], samples, corrupt)
        pc, pr = _answer_logprobs(policy, problems).sum(1), _answer_logprobs(policy, rejected).sum(1)
        with torch.no_grad():
            rc, rr = _answer_logprobs(ref, problems).sum(1), _answer_logprobs(ref, rejected).sum(1)
        loss = -F.logsigmoid(c.dpo_beta * ((pc - rc) - (pr - rr))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return policy


def _sft(base: TinyLlama, c: FamilyConfig, seed: int) -> TinyLlama:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _copy(base, c)
    opt = torch.optim.AdamW(model.parameters(), lr=c.sft_lr, weight_decay=0.01)
    for _ in range(c.sft_steps):
        x = _batch(c.batch, gen)  # ground-truth answers: off-policy data
        lp = _answer_logprobs(model, x)
        loss = -lp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model
