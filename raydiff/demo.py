"""A real, small finetune family trained on the spot, and ``raydiff demo`` over it.

The family (all in Llama layout, bf16 shards + index + ``config.json`` loadable as
``LlamaForCausalLM``):

- ``base``: a 2-layer decoder pretrained from scratch on 2-digit addition
  (``a a + b b = s s s <eos>``) until it is decent, not perfect;
- ``rl-seed1``, ``rl-seed2``: GRPO (group-normalised exact-match rewards, k3 KL penalty to the
  base) on the same prompts, two seeds; ``rl-seed1-step{N}``: intermediate checkpoints;
- ``dpo``: DPO on preference pairs built from the base's own samples (correct vs wrong);
- ``sft``: supervised finetuning on off-policy data (ground-truth answers) of the same task.

Like real RL stacks, training keeps fp32 master weights (AdamW) initialised from the bf16
base and saves bf16. Everything is seeded; the family is cached in a directory and reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# -- the task ------------------------------------------------------------------------------
# tokens 0-9 are digits; the rest of the vocabulary is never used by the task (as most of a
# real model's vocabulary is unused by one finetuning task).
PLUS, EQ, BOS, EOS = 10, 11, 12, 13
VOCAB = 64
SEQ = 11  # <bos> a a + b b = s s s <eos>
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
    """Token sequences ``<bos> a a + b b = s s s <eos>`` for operand tensors."""
    s = a + b
    cols = [torch.full_like(a, BOS), a // 10, a % 10, torch.full_like(a, PLUS), b // 10, b % 10,
            torch.full_like(a, EQ), s // 100, (s // 10) % 10, s % 10, torch.full_like(a, EOS)]
    return torch.stack(cols, 1)


# -- the model: Llama layout in plain torch -------------------------------------------------

class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Attention(nn.Module):
    def __init__(self, c: FamilyConfig) -> None:
        super().__init__()
        self.h, self.kv, self.d = c.heads, c.kv_heads, c.hidden // c.heads
        self.q_proj = nn.Linear(c.hidden, c.heads * self.d, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(c.heads * self.d, c.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, c: FamilyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c: FamilyConfig) -> None:
        super().__init__()
        self.input_layernorm = _RMSNorm(c.hidden)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = _RMSNorm(c.hidden)
        self.mlp = _MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, c: FamilyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, c.hidden)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.layers))
        self.norm = _RMSNorm(c.hidden)


class TinyLlama(nn.Module):
    """A decoder-only transformer whose ``state_dict`` has Llama's parameter names."""

    def __init__(self, c: FamilyConfig) -> None:
        super().__init__()
        self.model = _Body(c)
        self.lm_head = nn.Linear(c.hidden, VOCAB, bias=False)
        d = c.hidden // c.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(SEQ).float(), inv)
        emb = torch.cat((freqs, freqs), -1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, self.cos[:t], self.sin[:t])
        return self.lm_head(self.model.norm(x))


def _config_json(c: FamilyConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c.hidden, "intermediate_size": c.intermediate, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "vocab_size": VOCAB,
        "max_position_embeddings": SEQ, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": BOS, "eos_token_id": EOS, "torch_dtype": "bfloat16",
        "raydiff_demo": asdict(c),
    }


# -- training ----------------------------------------------------------------------------------

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


def save_checkpoint(model: TinyLlama, c: FamilyConfig, out: Path, metadata: dict[str, str]) -> None:
    """Write bf16 weights as two shards + ``model.safetensors.index.json`` + ``config.json``."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().bfloat16().contiguous() for k, v in model.state_dict().items()}
    first = {k for k in state if k.startswith("model.embed_tokens.") or k.startswith("model.layers.0.")}
    shards = [sorted(first), sorted(set(state) - first)]
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in names}, str(tmp / fname), metadata={"format": "pt", **metadata})
        weight_map.update({k: fname for k in names})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(_config_json(c), indent=2))
    os.replace(tmp, out)


@dataclass(frozen=True)
class Family:
    """Paths of a built family: ``base`` and every finetune by name, with base/finetune accuracies."""

    root: Path
    base: Path
    members: dict[str, Path]
    accuracy: dict[str, float]


def build_family(root: str | os.PathLike[str], config: FamilyConfig | None = None,
                 log: Callable[[str], None] | None = None) -> Family:
    """Train (or reuse) the demo family under ``root``; deterministic given the config's seed.

    A finished family is marked by ``family.json``; an interrupted build starts over.

    Example:
        >>> fam = build_family("/tmp/fam", FamilyConfig.small())  # doctest: +SKIP
        >>> sorted(fam.members)[:2]  # doctest: +SKIP
        ['dpo', 'rl-seed1']
    """
    c = config or FamilyConfig()
    root = Path(root)
    marker = root / "family.json"
    log = log or (lambda _msg: None)
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("config") == asdict(c):
            return Family(root, root / "base", {k: root / k for k in info["members"]}, info["accuracy"])
    torch_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        root.mkdir(parents=True, exist_ok=True)
        for p in root.iterdir():  # clear an interrupted build
            if p.is_dir():
                shutil.rmtree(p)
        meta = {"raydiff_demo_seed": str(c.seed)}
        base = _pretrain(c)
        acc = {"base": accuracy(base)}
        log(f"demo: pretrained base in {time.perf_counter() - t0:.0f}s, accuracy {acc['base']:.0%}")
        save_checkpoint(base, c, root / "base", meta)
        members: dict[str, Path] = {}

        def snapshot(step: int, model: TinyLlama) -> None:
            name = f"rl-seed1-step{step}"
            save_checkpoint(model, c, root / name, meta)
            members[name] = root / name
            acc[name] = accuracy(model)

        trainers = {
            "rl-seed1": lambda: _grpo(base, c, c.seed + 1, snapshot),
            "rl-seed2": lambda: _grpo(base, c, c.seed + 2),
            "dpo": lambda: _dpo(base, c, c.seed + 3),
            "sft": lambda: _sft(base, c, c.seed + 4),
        }
        for name, train in trainers.items():
            t1 = time.perf_counter()
            model = train()
            save_checkpoint(model, c, root / name, meta)
            members[name] = root / name
            acc[name] = accuracy(model)
            log(f"demo: trained {name} in {time.perf_counter() - t1:.0f}s, accuracy {acc[name]:.0%}")
        marker.write_text(json.dumps({"config": asdict(c), "members": list(members), "accuracy": acc}, indent=2))
        return Family(root, root / "base", members, acc)
    finally:
        torch.set_num_threads(torch_threads)


def run_demo(store: str, family_dir: str | None, cluster, log: Callable[[str], None] | None = None,
             config: FamilyConfig | None = None) -> str:
    """Build or reuse the family, submit each finetune against the base, return a report."""
    from raydiff.options import DiffOptions, SubmitOptions
    from raydiff.report import demo_report
    from raydiff.submit import Progress, submit

    log = log or (lambda _msg: None)

    class _Notes(Progress):
        def note(self, message: str) -> None:
            log(f"demo: note: {message}")

    fam_root = family_dir or (store.rstrip("/") + "/demo-family" if "://" not in store else None)
    if fam_root is None:
        from raydiff.errors import InvalidOption
        raise InvalidOption("with an object-store --store, give a local --family-dir for the demo checkpoints")
    fam = build_family(fam_root, config, log)
    cluster = dataclasses.replace(cluster, keep_actors=True)  # seven submissions in a row
    run_ids = {}
    for name, path in fam.members.items():
        res = submit(str(fam.base), str(path), SubmitOptions(store=store, name=name, diff=DiffOptions(),
                                                               cluster=cluster), _Notes())
        run_ids[name] = res.run_id
        log(f"demo: submitted {name}: run {res.run_id}")
    return demo_report(store, run_ids, fam.accuracy)
