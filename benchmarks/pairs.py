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


#: Llama-3.1-8B's tensors (name → shape): 32 layers, hidden 4096, MLP 14336, 8 KV heads,
#: vocabulary 128256 — 8.03 B parameters, 16.06 GB in bf16.
def llama8b_shapes(layers: int = 32, hidden: int = 4096, mlp: int = 14336, kv: int = 1024,
                   vocab: int = 128256) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
            p + "mlp.down_proj.weight": (hidden, mlp),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return dict(sorted(shapes.items()))


def _base_bits(index: int, n: int, seed: int) -> np.ndarray:
    """The base values of one tensor: finite bf16 bit patterns of magnitude ~0.002–0.03, the
    same for a given ``(index, seed)`` every time (so a finetune is written without the base)."""
    rng = np.random.default_rng([seed, index])
    raw = np.frombuffer(rng.bytes(2 * n), np.uint16)
    return (raw & np.uint16(0x80FF)) | np.uint16(0x3C00)  # sign, 8 random mantissa bits, exponent 2^-7


def write_llama_like(root: Path, shapes: dict[str, tuple[int, ...]], density: float | None, seed: int = 0,
                     tuned_seed: int = 1, shard_bytes: int = 5 << 30) -> Path:
    """Write a checkpoint of ``shapes`` (bf16, sharded, with an index) at ``root``, tensor by
    tensor so memory stays one tensor: the base when ``density`` is None, else a finetune of
    that base with a random ``density`` fraction of entries moved by one to three bf16 steps."""
    root.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    names = list(shapes)
    groups, cur, size = [], [], 0
    for name in names:
        nbytes = 2 * int(np.prod(shapes[name]))
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    groups.append(cur)
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for name in group:
            nbytes = 2 * int(np.prod(shapes[name]))
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in group:
                n = int(np.prod(shapes[name]))
                bits = _base_bits(names.index(name), n, seed)
                if density:
                    rng = np.random.default_rng([tuned_seed, names.index(name)])
                    step = np.frombuffer(rng.bytes(n), np.uint8)
                    moved = step < np.uint8(round(256 * density))
                    bits = bits + (moved * (1 + (step & np.uint8(1)))).astype(np.uint16)
                bits.tofile(f)
                weight_map[name] = fname
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root
