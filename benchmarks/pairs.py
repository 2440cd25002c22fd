"""Synthetic checkpoint pairs for benchmarks: Llama-shaped bf16 matrices, a known fraction changed.

Written directly (8-byte header length + JSON header + raw bytes), so building a multi-GB
pair costs little more than writing it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


def _write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            arr.tofile(f)


def make_pair(root: Path, total_bytes: int, density: float = 0.2, hidden: int = 2048, seed: int = 0,
              shard_bytes: int = 1 << 30) -> tuple[Path, Path]:
    """Write ``root/base`` and ``root/tuned`` (each ≈ ``total_bytes / 2``) of ``hidden × 4·hidden``
    bf16 matrices; in ``tuned`` a ``density`` fraction of entries moved by ~1 bf16 ULP or more."""
    rng = np.random.default_rng(seed)
    shape = (4 * hidden, hidden)
    per = shape[0] * shape[1] * 2
    count = max(1, total_bytes // 2 // per)
    for side in ("base", "tuned"):
        (root / side).mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shard_no = 0

    def flush() -> None:
        nonlocal shard_no
        if not shard:
            return
        shard_no += 1
        fname = f"model-{shard_no:05d}.safetensors"
        _write_shard(root / "base" / fname, {k: v[0] for k, v in shard.items()})
        _write_shard(root / "tuned" / fname, {k: v[1] for k, v in shard.items()})
        weight_map.update({k: fname for k in shard})
        shard.clear()

    for i in range(count):
        w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
        base = (w >> 16).astype(np.uint16)
        tuned = base.copy()
        sel = rng.random(shape, dtype=np.float32) < density
        tuned[sel] += rng.integers(1, 4, size=int(sel.sum()), dtype=np.uint16)
        shard[f"model.layers.{i}.mlp.up_proj.weight"] = (base, tuned)
        if sum(v[0].nbytes for v in shard.values()) >= shard_bytes:
            flush()
    flush()
    for side in ("base", "tuned"):
        (root / side / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root / "base", root / "tuned"
