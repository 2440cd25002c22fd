"""Checkpoint layouts the field publishes that do not line up tensor for tensor.

- **Block-scaled FP8** (DeepSeek-V3): a weight stored as ``F8_E4M3`` codes beside
  ``<weight>_scale_inv``, one float32 scale per block of ``quantization_config.weight_block_size``
  (128×128) entries, edge blocks partial; its value is ``code × scale``. The scale tensor is
  paired with its weight, not diffed as a weight of its own.
- **Fused projections** (vLLM, verl, Phi-3): ``qkv_proj`` holds the rows of ``q_proj``,
  ``k_proj`` and ``v_proj`` (sizes from the heads in ``config.json``), ``gate_up_proj``
  those of ``gate_proj`` and ``up_proj``; a fused tensor on one side pairs part by part with
  the split tensors on the other.
- **Expert stacks** (MoE): a 3-D tensor of experts (``mlp.experts.gate_up_proj``,
  experts × rows × cols) is cut into units that stay inside one expert, and gets a spectrum
  per expert matrix. Transformers v5 saves a mixture of experts so (``gate_up_proj``
  experts × 2·I × H with each expert's gate rows first, ``down_proj`` experts × H × I),
  where v4 and most published checkpoints have ``experts.{e}.gate_proj.weight`` (Mixtral:
  ``block_sparse_moe.experts.{e}.w1.weight``) and the like: a stack on one side pairs expert
  by expert with the other side's per-expert tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from raydiff.dtypes import DTYPES
from raydiff.errors import InvalidCheckpoint
from raydiff.inputs.safetensors import TensorInfo

#: The suffix of a block-scaled FP8 weight's scale tensor (DeepSeek-V3's name for it).
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
_FP8 = ("F8_E4M3", "F8_E5M2")
_SCALE_DTYPES = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class BlockScale:
    """The block scales of an FP8 weight: entry ``(i, j)`` is ``code × scale[i // rows, j // cols]``.

    Attributes:
        scale: the scale tensor (``ceil(m / rows) × ceil(n / cols)`` floats).
        rows, cols: the block's size.
    """

    scale: TensorInfo
    rows: int
    cols: int


def rows_of(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """The rows ``[start, stop)`` (first dimension) of a tensor, as a tensor of their own."""
    row = info.numel // info.shape[0] if info.shape[0] else 0
    size = DTYPES[info.dtype].itemsize
    return TensorInfo(info.name, info.dtype, (stop - start,) + info.shape[1:], info.file,
                      info.offset + start * row * size, (stop - start) * row * size)


def matrix_of(info: TensorInfo, index: int) -> TensorInfo:
    """Matrix ``index`` of a 3-D tensor (an expert of a stack), as a 2-D tensor."""
    one = rows_of(info, index, index + 1)
    return TensorInfo(info.name, info.dtype, info.shape[1:], one.file, one.offset, one.nbytes)


def block_size(config: Mapping[str, object] | None) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of a config (128×128 where it names none)."""
    q = config.get("quantization_config") if config else None
    size = q.get("weight_block_size") if isinstance(q, dict) else None
    if isinstance(size, list) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size):
        return size[0], size[1]
    return DEFAULT_BLOCK


def block_scales(tensors: Mapping[str, TensorInfo], config: Mapping[str, object] | None,
                 where: str) -> dict[str, BlockScale]:
    """The block-scaled FP8 weights of one side: weight name → its scales.

    Raises:
        InvalidCheckpoint: a scale tensor whose grid does not fit its weight and the block size.
    """
    out = {}
    rows, cols = block_size(config)
    for name, scale in tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            continue
        weight = tensors.get(name[: -len(SCALE_SUFFIX)])
        if weight is None or weight.dtype not in _FP8 or len(weight.shape) != 2:
            continue
        m, n = weight.shape
        want = (math.ceil(m / rows), math.ceil(n / cols))
        if scale.shape != want or scale.dtype not in _SCALE_DTYPES:
            raise InvalidCheckpoint(
                f"{where}: tensor {weight.name!r} has block scales {scale.name!r} of {scale.dtype} {list(scale.shape)}, "
                f"but a {list(weight.shape)} weight in {rows}×{cols} blocks (quantization_config.weight_block_size) "
                f"needs float scales {list(want)}; the scales and the config disagree — fix the config's block size "
                "or use the checkpoint's own"
            )
        out[weight.name] = BlockScale(scale, rows, cols)
    return out


#: fused name → the split names it holds, in row order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_FUSED_NAME = re.compile(r"^(?P<prefix>.*\.)(?P<fused>qkv_proj|gate_up_proj)\.(?P<kind>weight|bias)$")


def fused_split(name: str, info: TensorInfo, configs: list[Mapping[str, object] | None],
                other: Mapping[str, TensorInfo]) -> list[tuple[str, int, int]] | None:
    """How a fused projection's rows split into the tensors the other side has separately:
    ``[(split name, first row, end row), …]``, or ``None`` when the other side has not all
    of them, or their sizes do not add up (both sides then keep their own rows)."""
    m = _FUSED_NAME.match(name)
    if m is None or not info.shape:
        return None
    parts = [f"{m['prefix']}{p}.{m['kind']}" for p in FUSED[m["fused"]]]
    if not all(p in other for p in parts):
        return None
    sizes = [other[p].shape[0] if other[p].shape else -1 for p in parts]
    for config in configs:  # the heads and sizes the configs name, where they name them
        expect = _sizes(m["fused"], config, info.shape[0])
        if expect is not None:
            sizes = expect
            break
    if sum(sizes) != info.shape[0] or any(other[p].shape != (s, *info.shape[1:]) for p, s in zip(parts, sizes)):
        return None
    out, start = [], 0
    for p, s in zip(parts, sizes):
        out.append((p, start, start + s))
        start += s
    return out


_STACK_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?experts\.)(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)$")
#: a stack's projection → the per-expert tensors that may hold its rows, in row order
#: (Qwen- and DeepSeek-style names, one expert's fused gate_up_proj, Mixtral's w1/w3/w2)
_STACK_PARTS = {"gate_up_proj": (("gate_proj", "up_proj"), ("gate_up_proj",), ("w1", "w3")),
                "gate_proj": (("gate_proj",), ("w1",)), "up_proj": (("up_proj",), ("w3",)),
                "down_proj": (("down_proj",), ("w2",))}


def stack_split(name: str, info: TensorInfo, other: Mapping[str, TensorInfo]) -> list[tuple[str, int, int]] | None:
    """How a 3-D stack of experts (``….experts.gate_up_proj``, experts × rows × cols) splits
    into the per-expert tensors the other side has (``….experts.{e}.gate_proj.weight`` and
    ``….up_proj.weight``, each expert's ``gate_up_proj.weight``, or Mixtral's
    ``….block_sparse_moe.experts.{e}.w1.weight`` and ``w3``): ``[(name, first row, end row), …]``
    in the stack's rows taken as one experts·rows × cols matrix, or ``None`` when the other
    side has not every expert's parts at the sizes that add up to the stack's."""
    m = _STACK_NAME.match(name)
    if m is None or len(info.shape) != 3:
        return None
    experts, rows, cols = info.shape
    prefixes = [m["prefix"]]
    if m["prefix"].endswith("mlp.experts."):  # transformers 5 calls Mixtral's block_sparse_moe mlp
        prefixes.append(m["prefix"][:-len("mlp.experts.")] + "block_sparse_moe.experts.")
    for prefix in prefixes:
        for parts in _STACK_PARTS[m["proj"]]:
            names = [[f"{prefix}{e}.{p}.weight" for p in parts] for e in range(experts)]
            if not all(n in other for row in names for n in row):
                continue
            sizes = [other[n].shape[0] if len(other[n].shape) == 2 else -1 for n in names[0]]
            if sum(sizes) != rows or any(other[n].shape != (s, cols) for row in names for n, s in zip(row, sizes)):
                continue
            out = []
            for e, row in enumerate(names):
                start = e * rows
                for n, s in zip(row, sizes):
                    out.append((n, start, start + s))
                    start += s
            return out
    return None


def _sizes(fused: str, config: Mapping[str, object] | None, rows: int) -> list[int] | None:
    if not config:
        return None
    if fused == "gate_up_proj":
        inter = config.get("intermediate_size")
        return [inter, inter] if isinstance(inter, int) else None
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if not isinstance(heads, int) or not isinstance(hidden, int) or heads <= 0:
        return None
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(kv, int) or not isinstance(head_dim, int):
        return None
    return [heads * head_dim, kv * head_dim, kv * head_dim]


_EXPERTS = re.compile(r"(^|\.)experts\.")


def expert_stack(name: str, shape: tuple[int, ...]) -> int:
    """The number of experts a tensor stacks (its first dimension), or 0 when it is not a
    3-D tensor of experts (``mlp.experts.gate_up_proj`` and the like)."""
    return shape[0] if len(shape) == 3 and _EXPERTS.search(name) and not re.search(r"experts\.\d+\.", name) else 0
