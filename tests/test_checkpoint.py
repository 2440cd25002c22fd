"""Header and index parsing agrees with the safetensors library; layouts resolve."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from builders import write_checkpoint
from raydiff.inputs.checkpoint import load_checkpoint
from raydiff.inputs.reader import TensorReader
from raydiff.inputs.safetensors import parse_header
from raydiff.errors import CheckpointNotFound, InvalidCheckpoint, UnsupportedFormat
from raydiff.inputs.refs import parse_hub_id, resolve

_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g).bfloat16(), "b": torch.randn(5, generator=g),
            "c.d": torch.arange(6).view(2, 3), "e": torch.zeros(0, 4, dtype=torch.float16),
            "f": torch.tensor(3, dtype=torch.uint8)}


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_parse_matches_safetensors_and_reads_exact_bytes(tmp_path, shards):
    ts = _tensors()
    ck = load_checkpoint(write_checkpoint(tmp_path / "ck", ts, shards=shards))
    assert sorted(ck.tensors) == sorted(ts)
    reader = TensorReader()
    for name, t in ts.items():
        info = ck.tensors[name]
        with safe_open(info.file, "pt") as f:
            assert name in f.keys()
        assert (info.dtype, info.shape, info.nbytes) == (_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size())
        raw = reader.read(info, 0, info.numel)
        assert raw.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_single_file_and_nonstandard_shard_names(tmp_path):
    ts = _tensors()
    write_checkpoint(tmp_path / "one", ts)
    assert sorted(load_checkpoint(tmp_path / "one" / "model.safetensors").tensors) == sorted(ts)
    d = write_checkpoint(tmp_path / "odd", ts, shards=2, shard_name="weights_{i}.safetensors")
    (d / "model.safetensors.index.json").unlink()
    assert sorted(load_checkpoint(d).tensors) == sorted(ts)


def test_index_problems_are_named(tmp_path):
    ts = _tensors()
    d = write_checkpoint(tmp_path / "ck", ts, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (d / shard).unlink()
    with pytest.raises(InvalidCheckpoint, match=f"names shard {shard}, which is missing"):
        load_checkpoint(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(UnsupportedFormat, match="never unpickles"):
        load_checkpoint(d)
    with pytest.raises(CheckpointNotFound):
        resolve(str(tmp_path / "missing"))


def test_truncated_file(tmp_path):
    d = write_checkpoint(tmp_path / "ck", _tensors())
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(InvalidCheckpoint, match="lie outside the file"):
        parse_header(f)


def test_hub_id_parsing():
    assert parse_hub_id("allenai/Llama-3.1-Tulu-3-8B-SFT") == ("allenai/Llama-3.1-Tulu-3-8B-SFT", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert parse_hub_id("../etc/passwd") is None
    assert parse_hub_id("just-a-name") is None
