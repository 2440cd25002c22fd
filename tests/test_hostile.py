"""Broken and hostile checkpoints: each is refused with one named error, or analysed as data.

Every bad file is built here, byte by byte where safetensors' own writer would refuse it.
A refusal must be one line ``Error: …`` from the CLI naming the file (and tensor) and the fix,
with no traceback, no complete run in the store and no file anywhere it should not be.
Strange tensor names, NaN/Inf, empty, 0-d, fp8 and integer tensors are not errors: they
are diffed, and the counts are checked against the independent reference in builders.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import raydiff.inputs.checkpoint as checkpoint
import raydiff.inputs.safetensors as safetensors
from builders import ref_diff, write_checkpoint
from raydiff.inputs.safetensors import ShardHeader, parse_header, parse_header_bytes
from raydiff.dtypes import DTYPES
from raydiff.cli.main import app
from raydiff.errors import InvalidCheckpoint
from raydiff.query.views import query

pytestmark = pytest.mark.usefixtures("ray_cluster")

_CODE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
         torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int32: "I32",
         torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}
_KNOWN = "F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL"
_COUNTS = ("numel", "changed", "changed_bits", "changed_1e8", "changed_1e7", "changed_1e6",
           "changed_1e5", "changed_1e4", "changed_rel")
# Everything a run may leave in a store: names of tensors never reach a path.
_STORE_FILE = re.compile(r"^(runs/[0-9a-f]{20}/(run|plan|tensors|commit|units|spectra)\.parquet"
                         r"|catalog/(runs|commits)/[es]-\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet|raydiff-store\.json)$")


# ---------------------------------------------------------------------------- builders


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A file in safetensors layout, by hand: 8-byte little-endian length, header, data.

    ``header`` is JSON-encoded unless it is already bytes; ``length`` overrides the prefix.
    """
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def write_by_hand(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A valid safetensors file holding any names at all (safetensors' writer is stricter)."""
    header, data = {}, bytearray()
    for name, t in tensors.items():
        raw = _bits(t)
        header[name] = {"dtype": _CODE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return write_raw(path, header, bytes(data))


def _good_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.embed.weight": torch.randn(6, 4, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(4, generator=g)}


class _Boom:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"model.embed.weight": _Boom(marker)}, protocol=4)


def _tree(root: Path, skip: Path | None = None) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip is None or not p.is_relative_to(skip)}


def _cli(tmp_path: Path, base: Path | str, tuned: Path | str, rank: str = "off"):
    """Run ``raydiff submit`` and check nothing was written outside the store."""
    store = tmp_path / "store"
    before, siblings = _tree(tmp_path), set(os.listdir(tmp_path.parent))
    r = CliRunner().invoke(app, ["submit", str(base), str(tuned), "--store", str(store), "--rank", rank])
    assert _tree(tmp_path, skip=store) == before
    assert set(os.listdir(tmp_path.parent)) == siblings
    assert "Traceback" not in r.output
    return r, store


def _cli_error(tmp_path: Path, base: Path | str, tuned: Path | str) -> str:
    r, store = _cli(tmp_path, base, tuned)
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert not list(store.rglob("commit.parquet"))
    return lines[0]


def _tensor_rows(store: Path, run_id: str) -> dict[str, dict]:
    cols, rows = query(str(store), f"SELECT * FROM tensors WHERE run_id = '{run_id}'")
    return {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}


def _submit_ok(tmp_path: Path, base: Path, tuned: Path, rank: str = "off") -> tuple[Path, str, dict[str, dict]]:
    r, store = _cli(tmp_path, base, tuned, rank)
    assert r.exit_code == 0, r.output
    run_id = r.stdout.strip().splitlines()[-1]
    files = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}
    assert all(_STORE_FILE.match(f) for f in files), sorted(f for f in files if not _STORE_FILE.match(f))
    return store, run_id, _tensor_rows(store, run_id)


# ------------------------------------------------- bad inputs: one exact line each


Case = Callable[[Path], tuple[Path, Path, str]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def _base(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "base", _good_tensors())


def _sharded(tmp_path: Path) -> tuple[Path, Path]:
    d = write_checkpoint(tmp_path / "tuned", _good_tensors(), shards=2)
    return d, d / "model.safetensors.index.json"


def _edit_index(index: Path, edit: Callable[[dict], None]) -> None:
    obj = json.loads(index.read_text())
    edit(obj["weight_map"])
    index.write_text(json.dumps(obj))


_W = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@case
def truncated_data(tmp_path):
    d = write_checkpoint(tmp_path / "tuned", {"model.embed.weight": _good_tensors()["model.embed.weight"]})
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    return _base(tmp_path), d, (f'{f}: tensor "model.embed.weight": data_offsets [0, 48] lie outside the file\'s '
                                "45 data bytes; the file is truncated or corrupt")


@case
def truncated_prefix(tmp_path):
    f = tmp_path / "tuned" / "model.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"\x10\x00\x00\x00\x00")
    return _base(tmp_path), f.parent, (f"{f}: file is 5 bytes, too short for a safetensors header; "
                                       "the file is truncated — download or save it again")


@case
def header_longer_than_file(tmp_path):
    body = json.dumps({"w": _W}).encode()
    f = write_raw(tmp_path / "tuned" / "model.safetensors", body, bytes(24), length=len(body) + 1000)
    return _base(tmp_path), f.parent, (f"{f}: header claims {len(body) + 1000} bytes but the file has only "
                                       f"{len(body) + 24} after the length prefix; the file is truncated — "
                                       "download or save it again")


@case
def header_length_bomb(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"w": _W}, bytes(24), length=2**62)
    return _base(tmp_path), f.parent, (f"{f}: header claims {2**62} bytes, over the 100000000-byte limit; "
                                       "this is not a valid safetensors file")


@case
def header_not_json(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", b"{'w': 1}")
    return _base(tmp_path), f.parent, (f"{f}: header is not valid UTF-8 JSON (Expecting property name enclosed "
                                       "in double quotes: line 1 column 2 (char 1)); not a safetensors file")


@case
def header_not_utf8(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", b'{"\xff": 1}')
    return _base(tmp_path), f.parent, (f"{f}: header is not valid UTF-8 JSON ('utf-8' codec can't decode byte "
                                       "0xff in position 2: invalid start byte); not a safetensors file")


@case
def header_not_an_object(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", [{"w": _W}], bytes(24))
    return _base(tmp_path), f.parent, f"{f}: header is JSON but not an object; not a safetensors file"


@case
def header_number_too_long(tmp_path):
    body = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    f = write_raw(tmp_path / "tuned" / "model.safetensors", body, bytes(4))
    return _base(tmp_path), f.parent, (f"{f}: header JSON holds a number too long or nesting too deep to be a "
                                       "safetensors header; not a safetensors file")


@case
def header_nested_too_deep(tmp_path):
    body = b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    f = write_raw(tmp_path / "tuned" / "model.safetensors", body)
    return _base(tmp_path), f.parent, (f"{f}: header JSON holds a number too long or nesting too deep to be a "
                                       "safetensors header; not a safetensors file")


@case
def header_entry_not_object(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"w": ["F32", [2, 3], [0, 24]]}, bytes(24))
    return _base(tmp_path), f.parent, f'{f}: tensor "w": header entry is not an object; the header is corrupt'


@case
def metadata_not_strings(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"__metadata__": {"format": 1}, "w": _W}, bytes(24))
    return _base(tmp_path), f.parent, (f"{f}: __metadata__ must map strings to strings; the header is corrupt "
                                       "— save the file again")


@case
def unknown_dtype(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"w": {**_W, "dtype": "F4"}}, bytes(24))
    return _base(tmp_path), f.parent, (f"{f}: tensor \"w\": unknown dtype 'F4' (raydiff reads {_KNOWN}); "
                                       "save the tensor in one of those")


@case
def dtype_flood(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"w": {**_W, "dtype": "X\n" * 500_000}}, bytes(24))
    cut = "'" + "X\\n" * 19 + "X…"  # the repr, cut at 60 characters: still one line
    return _base(tmp_path), f.parent, (f'{f}: tensor "w": unknown dtype {cut} (raydiff reads {_KNOWN}); '
                                       "save the tensor in one of those")


@case
def negative_shape(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"w": {**_W, "shape": [-2, -3]}}, bytes(24))
    return _base(tmp_path), f.parent, (f'{f}: tensor "w": shape [-2, -3] is not a list of non-negative integers; '
                                       "the header is corrupt")


@case
def offsets_not_a_pair(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"w": {**_W, "data_offsets": [0, 24, 48]}}, bytes(48))
    return _base(tmp_path), f.parent, (f'{f}: tensor "w": data_offsets [0, 24, 48] is not a pair of integers; '
                                       "the header is corrupt")


@case
def offsets_outside_file(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors",
                  {"w": {"dtype": "F32", "shape": [250], "data_offsets": [0, 1000]}}, bytes(24))
    return _base(tmp_path), f.parent, (f'{f}: tensor "w": data_offsets [0, 1000] lie outside the file\'s 24 data '
                                       "bytes; the file is truncated or corrupt")


@case
def offsets_negative(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors",
                  {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, bytes(24))
    return _base(tmp_path), f.parent, (f'{f}: tensor "w": data_offsets [-4, 0] lie outside the file\'s 24 data '
                                       "bytes; the file is truncated or corrupt")


@case
def offsets_overlap(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors",
                  {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                   "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))
    return _base(tmp_path), f.parent, f'{f}: tensors "a" and "b" overlap in the file; the header is corrupt'


@case
def offsets_not_shape_times_dtype(tmp_path):
    f = write_raw(tmp_path / "tuned" / "model.safetensors", {"w": {**_W, "data_offsets": [0, 20]}}, bytes(24))
    return _base(tmp_path), f.parent, (f'{f}: tensor "w": holds 20 bytes but shape [2, 3] of F32 needs 24; '
                                       "the header is corrupt")


@case
def tensor_twice_in_one_header(tmp_path):
    body = (b'{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, '
            b'"w": {"dtype": "F32", "shape": [6], "data_offsets": [24, 48]}}')
    f = write_raw(tmp_path / "tuned" / "model.safetensors", body, bytes(48))
    return _base(tmp_path), f.parent, f'{f}: header lists tensor "w" twice; the file is ambiguous — save it again'


@case
def field_twice_in_one_entry(tmp_path):
    body = b'{"w": {"dtype": "F32", "shape": [2, 3], "dtype": "F16", "data_offsets": [0, 24]}}'
    f = write_raw(tmp_path / "tuned" / "model.safetensors", body, bytes(24))
    return _base(tmp_path), f.parent, f'{f}: tensor "w": header entry gives "dtype" twice; the header is corrupt'


@case
def lone_surrogate_name(tmp_path):
    body = b'{"w\\ud800": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}'
    f = write_raw(tmp_path / "tuned" / "model.safetensors", body, bytes(24))
    return _base(tmp_path), f.parent, (f'{f}: tensor "w\\ud800": the name is not valid Unicode (a lone surrogate); '
                                       "the header is corrupt")


@case
def newline_in_shard_file_name(tmp_path):
    f = write_raw(tmp_path / "tuned" / "bad\nname.safetensors", b"[]")
    return _base(tmp_path), f.parent, (json.dumps(str(f)) + ": header is JSON but not an object; "
                                       "not a safetensors file")


@case
def index_names_missing_shard(tmp_path):
    d, index = _sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    return _base(tmp_path), d, (f"{index}: names shard model-00002-of-00002.safetensors, which is missing from "
                                f"{d}; the download is incomplete — fetch the missing shard")


@case
def index_names_shard_with_newline(tmp_path):
    d, index = _sharded(tmp_path)
    _edit_index(index, lambda wm: wm.update({"model.norm.weight": "x\ny.safetensors"}))
    return _base(tmp_path), d, (f'{index}: names shard "x\\ny.safetensors", which is missing from {d}; '
                                "the download is incomplete — fetch the missing shard")


@case
def index_names_shard_too_long(tmp_path):
    d, index = _sharded(tmp_path)
    long = "x" * 300 + ".safetensors"
    _edit_index(index, lambda wm: wm.update({"model.norm.weight": long}))
    return _base(tmp_path), d, (f"{index}: names shard {long}, which is missing from {d}; "
                                "the download is incomplete — fetch the missing shard")


@case
def index_lists_absent_tensor(tmp_path):
    d, index = _sharded(tmp_path)
    _edit_index(index, lambda wm: wm.update({"ghost.weight": "model-00001-of-00002.safetensors"}))
    return _base(tmp_path), d, (f'{index}: lists tensor "ghost.weight" in model-00001-of-00002.safetensors, but '
                                "that shard's header does not hold it; the index and shards are from different saves")


@case
def index_not_json(tmp_path):
    d, index = _sharded(tmp_path)
    index.write_text("{")
    return _base(tmp_path), d, (f"{index}: model.safetensors.index.json is not valid JSON (Expecting property name "
                                "enclosed in double quotes: line 1 column 2 (char 1)); the file is corrupt — "
                                "download or save it again")


@case
def index_without_weight_map(tmp_path):
    d, index = _sharded(tmp_path)
    index.write_text(json.dumps({"metadata": {}, "weight_map": ["model-00001-of-00002.safetensors"]}))
    return _base(tmp_path), d, (f"{index}: has no weight_map of tensor name → shard file; the index is corrupt — "
                                "download it again")


def _traversal(shard: str) -> Case:
    def build(tmp_path):
        d, index = _sharded(tmp_path)
        # a perfectly valid shard waits outside: reading it would make the checkpoint whole
        write_checkpoint(tmp_path / "outside", _good_tensors())
        (tmp_path / "outside" / "model.safetensors").rename(tmp_path / "outside.safetensors")
        _edit_index(index, lambda wm: wm.update({k: shard for k in wm}))
        return _base(tmp_path), d, (f"{index}: shard name {json.dumps(shard)} is not a plain file name in the "
                                    "checkpoint directory; refusing to read outside it")
    return build


CASES["index_shard_dotdot"] = _traversal("../outside.safetensors")
CASES["index_shard_deep_dotdot"] = _traversal("../../../../../../../tmp/outside.safetensors")
CASES["index_shard_absolute"] = _traversal("/etc/passwd")
CASES["index_shard_dotdot_only"] = _traversal("..")


@case
def tensor_in_two_shards(tmp_path):
    names = sorted(_good_tensors())
    d = write_checkpoint(tmp_path / "tuned", _good_tensors(), shards=[names, names[1:]])
    return _base(tmp_path), d, (f'{d}: tensor "model.norm.weight" is stored twice, in '
                                "model-00001-of-00002.safetensors and model-00002-of-00002.safetensors; "
                                "the checkpoint is ambiguous — remove one copy")


@case
def tensor_in_two_unindexed_files(tmp_path):
    d = tmp_path / "tuned"
    write_by_hand(d / "a.safetensors", _good_tensors())
    write_by_hand(d / "b.safetensors", {"model.embed.weight": _good_tensors()["model.embed.weight"]})
    return _base(tmp_path), d, (f'{d}: tensor "model.embed.weight" is stored twice, in a.safetensors and '
                                "b.safetensors; the checkpoint is ambiguous — remove one copy")


_PICKLE_ADVICE = ("raydiff never unpickles files (loading one can run arbitrary code). "
                  "Convert it to safetensors in a trusted environment "
                  "(e.g. `safetensors.torch.save_file(torch.load(f, weights_only=True), out)`) and point raydiff "
                  "at the result")
_PICKLE_MSG = f"is a pickle checkpoint; {_PICKLE_ADVICE}"


@case
def pickle_bin_in_directory(tmp_path):
    d = tmp_path / "tuned"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(_evil_pickle(tmp_path / "PWNED"))
    return _base(tmp_path), d, f"{d / 'pytorch_model.bin'}: {_PICKLE_MSG}"


@case
def pickle_pt_file(tmp_path):
    f = tmp_path / "tuned" / "model.pt"
    f.parent.mkdir()
    f.write_bytes(_evil_pickle(tmp_path / "PWNED"))
    return _base(tmp_path), f, f"{f}: {_PICKLE_MSG}"


@case
def pickle_shard_in_safetensors_index(tmp_path):
    d, index = _sharded(tmp_path)
    (d / "pytorch_model-00001-of-00002.bin").write_bytes(_evil_pickle(tmp_path / "PWNED"))
    _edit_index(index, lambda wm: wm.update({"model.norm.weight": "pytorch_model-00001-of-00002.bin"}))
    return _base(tmp_path), d, f"{d / 'pytorch_model-00001-of-00002.bin'}: {_PICKLE_MSG}"


@case
def pickle_named_safetensors(tmp_path):
    f = tmp_path / "tuned" / "model.safetensors"
    f.parent.mkdir()
    f.write_bytes(_evil_pickle(tmp_path / "PWNED"))
    return _base(tmp_path), f.parent, (f"{f}: is a pickle (or torch.save zip) under a .safetensors name, not "
                                       f"safetensors; {_PICKLE_ADVICE}")


@case
def torch_zip_named_safetensors(tmp_path):
    f = tmp_path / "tuned" / "model.safetensors"
    f.parent.mkdir()
    torch.save({"model.embed.weight": torch.zeros(2)}, f)  # the zip format holds a pickle too
    assert f.read_bytes()[:4] == b"PK\x03\x04"
    return _base(tmp_path), f.parent, (f"{f}: is a pickle (or torch.save zip) under a .safetensors name, not "
                                       f"safetensors; {_PICKLE_ADVICE}")


@case
def not_a_file_or_directory(tmp_path):
    fifo = tmp_path / "tuned.safetensors"
    os.mkfifo(fifo)
    return _base(tmp_path), fifo, (f"{fifo}: is neither a directory nor a regular file; point raydiff at a "
                                   "checkpoint directory or a .safetensors file")


@case
def bad_base_is_named_too(tmp_path):
    f = write_raw(tmp_path / "broken" / "model.safetensors", {"w": {**_W, "dtype": "C64"}}, bytes(24))
    good = write_checkpoint(tmp_path / "tuned", _good_tensors())
    return f.parent, good, (f"{f}: tensor \"w\": unknown dtype 'C64' (raydiff reads {_KNOWN}); "
                            "save the tensor in one of those")


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_checkpoint_is_one_named_error(tmp_path, monkeypatch, name):
    base, tuned, expected = CASES[name](tmp_path)
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    for module in (checkpoint, safetensors):  # the modules that open checkpoint files
        monkeypatch.setattr(module, "open", spy, raising=False)
    assert _cli_error(tmp_path, base, tuned) == f"Error: {expected}"
    # nothing was read outside the two checkpoints, and no pickle ran
    roots = [os.path.realpath(p if p.is_dir() else p.parent) for p in (Path(base), Path(tuned))]
    assert all(any(f.startswith(r + os.sep) for r in roots) for f in opened), opened
    assert not (tmp_path / "PWNED").exists()


def test_evil_pickle_is_live(tmp_path):
    """The pickles above really would run code when loaded: refusing them is what saves us."""
    pickle.loads(_evil_pickle(tmp_path / "control"))
    assert (tmp_path / "control").exists()


def test_invalid_hub_id_is_one_named_error(tmp_path):
    assert _cli_error(tmp_path, "a--b/c", str(_base(tmp_path))) == (
        "Error: 'a--b/c': no such file or directory, and not a valid Hub repo id "
        "(Cannot have -- or .. in repo_id: 'a--b/c'); check the path or the repo name")


# ------------------------------------------------ not errors: analysed as plain data


def test_different_architectures_complete_with_only_in_statuses(tmp_path):
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(10, 8, generator=g)
    base = {"model.embed_tokens.weight": torch.randn(10, 8, generator=g).bfloat16(),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).bfloat16(),
            "model.norm.weight": torch.ones(8).bfloat16(), "lm_head.weight": shared}
    tuned = {"transformer.wte.weight": torch.randn(10, 8, generator=g),
             "transformer.h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g),
             "transformer.h.0.ln_1.weight": torch.ones(8), "transformer.ln_f.bias": torch.zeros(8),
             "lm_head.weight": shared + (torch.rand(10, 8, generator=g) < 0.25) * 0.5}
    b = write_checkpoint(tmp_path / "llama", base, shards=2)
    t = write_checkpoint(tmp_path / "gpt2", tuned)
    store, run_id, rows = _submit_ok(tmp_path, b, t)
    statuses = {n: r["status"] for n, r in rows.items()}
    assert statuses == {**{n: "only_in_base" for n in base}, **{n: "only_in_tuned" for n in tuned},
                        "lm_head.weight": "ok"}
    ref = ref_diff(base["lm_head.weight"], tuned["lm_head.weight"])
    assert {k: rows["lm_head.weight"][k] for k in _COUNTS} == {k: ref[k] for k in _COUNTS}
    cols, got = query(str(store), f"SELECT status, count(*) FROM tensors WHERE run_id = '{run_id}' "
                                  "GROUP BY status ORDER BY status")
    assert got == [("ok", 1), ("only_in_base", 3), ("only_in_tuned", 4)]
    cols, got = query(str(store), f"SELECT status, numel, changed, n_mismatched FROM runs WHERE run_id = '{run_id}'")
    assert got == [("complete", 80, ref["changed"], 7)]


_HOSTILE_NAMES = ["a/b", "..", ".", "x\0y", "../../etc/x", "/abs/olute", "n" * 5000, "\\..\\win",
                  "line\nbreak", "ünï ✓ 名", "", "%s%n${HOME}", "';DROP TABLE tensors;--"]


def test_names_are_data_never_paths(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {n: torch.randn(3, 5, generator=g) for n in _HOSTILE_NAMES}
    tuned = {n: t + (torch.rand(3, 5, generator=g) < 0.4) * 1e-3 for n, t in base.items()}
    escapes = [Path(tmp_path / "store" / "etc" / "x"), tmp_path / "etc" / "x", tmp_path.parent / "etc" / "x"]
    outside_before = [p.exists() for p in (*escapes, Path("/etc/x"), Path("/abs/olute"))]
    store, _, rows = _submit_ok(tmp_path, write_by_hand(tmp_path / "b" / "model.safetensors", base).parent,
                                write_by_hand(tmp_path / "t" / "model.safetensors", tuned).parent)
    assert set(rows) == set(_HOSTILE_NAMES)
    for n in _HOSTILE_NAMES:
        ref = ref_diff(base[n], tuned[n])
        assert rows[n]["status"] == "ok", repr(n[:20])
        assert {k: rows[n][k] for k in _COUNTS} == {k: ref[k] for k in _COUNTS}, repr(n[:20])
        assert 0 < ref["changed"] < 15
    assert [p.exists() for p in (*escapes, Path("/etc/x"), Path("/abs/olute"))] == outside_before


def _nonfinite_pair():
    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, dtype, shape in (("f32", torch.float32, (64,)), ("bf16", torch.bfloat16, (8, 8)),
                               ("f16", torch.float16, (33,)), ("f64", torch.float64, (4, 4))):
        b = torch.randn(shape, generator=g).to(dtype)
        t = b.clone()
        bf, tf = b.view(-1), t.view(-1)
        bf[0] = tf[0] = nan  # NaN on both sides, same bits: unchanged
        tf[1] = nan  # a NaN appeared
        bf[2] = nan  # a NaN went away
        tf[3], tf[4] = inf, -inf
        bf[5], tf[5] = inf, -inf
        bf[6] = tf[6] = inf  # unchanged
        tf[7] = tf[7] + 1  # one ordinary change
        out[f"nonfinite.{name}"] = (b, t)
    return out


def _special_pair():
    g = torch.Generator().manual_seed(4)
    out = {
        "empty.f32": (torch.zeros(0, 4), torch.zeros(0, 4)),
        "empty.bf16": (torch.zeros(0, 4).bfloat16(), torch.zeros(0, 4).bfloat16()),
        "empty.i32": (torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)),
        "scalar.changed": (torch.tensor(1.5), torch.tensor(2.5)),
        "scalar.same": (torch.tensor(3.0).bfloat16(), torch.tensor(3.0).bfloat16()),
        "scalar.u8": (torch.tensor(7, dtype=torch.uint8), torch.tensor(9, dtype=torch.uint8)),
    }
    for code, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        b = (torch.randn(16, 8, generator=g) * 4).to(dt)
        sel = torch.rand(16, 8, generator=g) < 0.3
        t = torch.where(sel, (b.float() * 1.5 + 0.25).to(dt), b)
        tb = t.view(torch.uint8).clone().view(-1)
        tb[0] = 0x7F  # NaN in both fp8 formats
        if dt is torch.float8_e5m2:
            tb[1] = 0x7C  # +Inf (e4m3fn has none)
        out[f"fp8.{code}"] = (b, tb.view(dt).view(16, 8))
    ints = torch.randint(-1000, 1000, (5, 7), generator=g, dtype=torch.int32)
    out["int.i32"] = (ints, torch.where(torch.rand(5, 7, generator=g) < 0.3, ints + 1, ints))
    i64 = torch.randint(-(2**40), 2**40, (9,), generator=g, dtype=torch.int64)
    out["int.i64"] = (i64, torch.where(torch.rand(9, generator=g) < 0.5, -i64, i64))
    u8 = torch.randint(0, 256, (40,), generator=g, dtype=torch.uint8)
    out["int.u8"] = (u8, torch.where(torch.rand(40, generator=g) < 0.2, u8 ^ 1, u8))
    bo = torch.rand(3, 5, generator=g) < 0.5
    out["int.bool"] = (bo, bo ^ (torch.rand(3, 5, generator=g) < 0.3))
    return out


def test_nonfinite_empty_scalar_fp8_and_integer_tensors_match_reference(tmp_path):
    pairs = {**_nonfinite_pair(), **_special_pair()}
    b = write_checkpoint(tmp_path / "base", {n: p[0] for n, p in pairs.items()})
    t = write_checkpoint(tmp_path / "tuned", {n: p[1] for n, p in pairs.items()}, shards=2)
    # --rank exact: the 2-D NaN/Inf matrices (bf16, f64, fp8) must not stop the run
    _, _, rows = _submit_ok(tmp_path, b, t, rank="exact")
    assert set(rows) == set(pairs)
    assert sum("spectrum not computed" in r["note"] for r in rows.values()) >= 3
    for name, (bt, tt) in pairs.items():
        if bt.ndim == 2 and bt.dtype.is_floating_point and bt.numel():
            bad = int((~torch.isfinite(tt.float() - bt.float())).sum())
            assert (rows[name]["rank"] is None) == (bad > 0), name
            if bad:
                assert rows[name]["note"].endswith(f"spectrum not computed: ΔW has {bad} non-finite "
                                                   f"entr{'y' if bad == 1 else 'ies'} (NaN or ±Inf)"), name
        # flat: the counts do not depend on shape, and the reference's rank step cannot take
        # NaN or fp8 matrices
        row, ref = rows[name], ref_diff(bt.reshape(-1), tt.reshape(-1))
        assert row["status"] == "ok", name
        assert {k: row[k] for k in _COUNTS} == {k: ref[k] for k in _COUNTS}, name
        if bt.dtype in (torch.int32, torch.int64, torch.uint8, torch.bool):
            assert all(row[k] == ref["changed_bits"] for k in _COUNTS[1:]), name
            assert row["max_abs_delta"] is None and row["nonfinite"] in (0, None), name
        elif bt.numel():
            assert row["nonfinite"] == ref["nonfinite"], name
            assert row["max_abs_delta"] == pytest.approx(ref["max_abs_delta"], rel=1e-6), name
    assert rows["nonfinite.f32"]["nonfinite"] == 5  # NaN appeared, NaN gone, +Inf, -Inf, Inf→-Inf
    assert rows["nonfinite.bf16"]["changed"] == 6
    assert rows["fp8.e5m2"]["nonfinite"] >= 2
    assert (rows["empty.f32"]["numel"], rows["empty.f32"]["changed"]) == (0, 0)
    assert (rows["scalar.changed"]["numel"], rows["scalar.changed"]["changed"]) == (1, 1)
    assert rows["scalar.same"]["changed"] == 0


# ------------------------------------------------------- the header parser, fuzzed


def _check_header(h: ShardHeader) -> None:
    """What a parsed header promises: every tensor inside the data, sized right, no overlaps."""
    spans = []
    for t in h.tensors:
        t.name.encode("utf-8")
        assert h.data_start <= t.offset and t.offset + t.nbytes <= h.size
        assert t.nbytes == t.numel * DTYPES[t.dtype].itemsize
        if t.nbytes:
            spans.append((t.offset, t.offset + t.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert [t.name for t in h.tensors] == sorted(t.name for t in h.tensors)


def _parses_or_refuses(fn: Callable[[], ShardHeader]) -> None:
    try:
        h = fn()
    except InvalidCheckpoint as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
    else:
        _check_header(h)


_names = st.text(max_size=12) | st.sampled_from(["__metadata__", "\ud800", "a\udfffb", "../x", "\0"])
_ints = st.integers(-3, 80) | st.integers(-(2**70), 2**70)
_json = st.recursive(
    st.none() | st.booleans() | _ints | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(_names, c, max_size=4), max_leaves=12)
_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from([*DTYPES, "F4", "bf16"]) | _json,
     "shape": st.lists(st.integers(-1, 5), max_size=3) | _json,
     "data_offsets": st.lists(_ints, min_size=2, max_size=2) | _json},
    optional={"extra": _json})
_header = st.dictionaries(_names, _entry | _json, max_size=5) | _json


# Token soup: almost-headers, with the pieces that broke parsers before (a 5000-digit number,
# nesting past the recursion limit, escapes of lone surrogates, NaN).
_soup = st.lists(st.sampled_from([
    b"{", b"}", b"[", b"]", b":", b",", b'"', b'"w"', b'"dtype"', b'"F32"', b'"shape"', b'"data_offsets"',
    b"0", b"4", b"-1", b"1e999", b"NaN", b"null", b"true", b'"\\ud800"', b"\xff", b" ",
    b"9" * 5000, b"[" * 3000, b"]" * 3000, b'{"a":' * 3000,
]), max_size=20).map(b"".join)


def _encode(obj: object, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(max_size=300) | _soup, slack=st.integers(0, 200))
def test_header_parser_bytes_never_crash(raw, slack):
    _parses_or_refuses(lambda: parse_header_bytes("f.safetensors", 8 + len(raw) + slack, raw))


@settings(max_examples=400, deadline=None)
@given(obj=_header, ascii_only=st.booleans(), slack=st.integers(0, 200), pad=st.integers(0, 7))
def test_header_parser_json_never_crash(obj, ascii_only, slack, pad):
    raw = _encode(obj, ascii_only) + b" " * pad
    _parses_or_refuses(lambda: parse_header_bytes("f.safetensors", 8 + len(raw) + slack, raw))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_header.map(lambda o: _encode(o, True)) | _soup | st.binary(max_size=100),
       length=st.none() | st.integers(0, 400) | st.integers(0, 2**64 - 1),
       data=st.binary(max_size=100), cut=st.none() | st.integers(0, 600))
def test_parse_header_on_real_files_never_crashes(tmp_path, body, length, data, cut):
    f = write_raw(tmp_path / "fuzz.safetensors", body, data, length)
    if cut is not None:
        f.write_bytes(f.read_bytes()[:cut])
    _parses_or_refuses(lambda: parse_header(f))


def test_parse_header_accepts_what_safetensors_writes(tmp_path):
    """The fuzzers' invariant also holds on real files (so `_check_header` is not vacuous)."""
    pairs = _special_pair()
    d = write_checkpoint(tmp_path / "ck", {n: p[0] for n, p in pairs.items()})
    h = parse_header(d / "model.safetensors")
    _check_header(h)
    assert {t.name for t in h.tensors} == set(pairs)
    np.testing.assert_array_equal([t.numel for t in h.tensors], [pairs[t.name][0].numel() for t in h.tensors])
