"""The family on disk: bf16 checkpoints in Hugging Face layout, trained once and reused."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from raydiff.demo.model import TinyLlama, _config_json
from raydiff.demo.task import FamilyConfig
from raydiff.demo.train import _dpo, _grpo, _pretrain, _sft, accuracy


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
