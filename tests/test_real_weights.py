"""Real weights written by others: silero-vad's ``silero_vad_16k.safetensors`` (MIT), which
its wheel ships (the test extra installs it; nothing is downloaded at test time).

The file is read where pip put it, as its authors wrote it (their header: its order, no
``__metadata__``, its padding), never re-saved. Its finetune is planted here in a copy of its
tensors; every count, sum and singular value is checked against numpy on the same arrays.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from builders import SUM_REL, perturb, ref_diff, write_checkpoint
from raydiff.cli.main import app
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
from raydiff.query.views import query
from raydiff.run.submit import submit

#: SHA-256 of the file in silero-vad 6.2.1–6.2.3 (the test extra's pin)
SILERO_SHA256 = "c59271c284ae9c8335d795d60e0bfdb71aaaceec578d9bd9ffc1b8153c319ea1"


def _silero() -> Path:
    spec = importlib.util.find_spec("silero_vad")  # located, not imported
    if spec is None or spec.origin is None:
        pytest.fail("silero-vad is not installed: install the test extra, `pip install -e '.[test]'`")
    return Path(spec.origin).parent / "data" / "silero_vad_16k.safetensors"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """``(base file, tuned folder, base tensors, tuned tensors)``: the shipped file, and a
    finetune of it written here (a share of the entries of each weight moved, biases not)."""
    path = _silero()
    base = {k: torch.from_numpy(v) for k, v in load_file(str(path)).items()}
    tuned = {}
    for i, (name, w) in enumerate(base.items()):
        fraction, scale = ((0.0, 0.0) if ".bias" in name else ((0.3, 1e-3) if "lstm" in name else (0.05, 1e-2)))
        tuned[name] = perturb(w, fraction, scale * float(w.abs().mean()), i) if fraction else w.clone()
    folder = write_checkpoint(tmp_path_factory.mktemp("silero") / "tuned", tuned)
    return path, folder, base, tuned


def test_the_shipped_file_is_read_as_its_authors_wrote_it(real):
    """The file pip installed is the one these tests were written for; its header as it
    is on the disk (no ``__metadata__``, 15 float32 tensors) is what raydiff's parser
    reads: each tensor's place and shape, and the bytes there are safetensors' own loader's."""
    from raydiff.inputs.safetensors import parse_header

    path, _, base, _ = real
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SILERO_SHA256, "another silero-vad file: pin the test extra's version"
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert "__metadata__" not in header and len(header) == 15
    parsed = {t.name: t for t in parse_header(str(path)).tensors}
    assert set(parsed) == set(header)
    for name, info in header.items():
        t = parsed[name]
        assert (t.dtype, t.shape, t.offset, t.nbytes) == (
            info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0],
            info["data_offsets"][1] - info["data_offsets"][0]), name
        got = np.frombuffer(raw[t.offset:t.offset + t.nbytes], np.float32).reshape(t.shape)
        np.testing.assert_array_equal(got, base[name].numpy(), err_msg=name)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_finetune_of_real_weights_counts_what_numpy_counts(real, tmp_path, backend, request):
    """Every count and Δ sum of every tensor against the reference (torch/numpy on the same
    arrays), and the exact spectra of the two 512×128 LSTM matrices against numpy's SVD, on
    the real file as base and on either backend."""
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    path, folder, base, tuned = real
    store = str(tmp_path / "store")
    res = submit(str(path), str(folder), SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1 << 16, rank="exact"),
                                                       cluster=ClusterOptions(backend=backend)))
    cols, rows = query(store, f"SELECT * FROM tensors WHERE run_id = '{res.run_id}'")
    got = {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}
    assert set(got) == set(base)
    for name in base:
        ref = ref_diff(base[name], tuned[name])
        for k in ("numel", "changed", "changed_bits", "changed_1e8", "changed_1e6", "changed_1e4", "changed_rel"):
            assert got[name][k] == ref[k], (name, k)
        assert got[name]["delta_fro"] == pytest.approx(ref["delta_fro"], rel=SUM_REL, abs=0.0), name
        assert got[name]["max_abs_delta"] == pytest.approx(ref["max_abs_delta"], rel=1e-6), name
    assert sum(1 for name in base if got[name]["changed"]) == 8  # every weight, no bias
    _, spectra = query(store, f"SELECT tensor, rank, top_sv FROM spectra WHERE run_id = '{res.run_id}'")
    assert sorted(s[0] for s in spectra) == ["lstm_cell.weight_hh", "lstm_cell.weight_ih"]
    for name, rank, top in spectra:
        delta = (tuned[name] - base[name]).double().numpy()
        sv = np.linalg.svd(delta, compute_uv=False)
        np.testing.assert_allclose(top, sv[:len(top)], rtol=1e-4, err_msg=name)
        assert rank == np.linalg.matrix_rank(delta.astype(np.float32)), name


def test_a_patch_of_real_weights_rebuilds_the_finetune_bit_for_bit(real, tmp_path):
    """``patch`` against the shipped file, then ``apply`` onto it: every tensor of the
    rebuilt checkpoint has the finetune's bytes (numpy's view of both files)."""
    path, folder, _, tuned = real
    runner = CliRunner()
    r = runner.invoke(app, ["patch", str(path), str(folder), "--out", str(tmp_path / "patch")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["apply", str(path), str(tmp_path / "patch"), "--out", str(tmp_path / "new")])
    assert r.exit_code == 0, r.output
    rebuilt = {}
    for f in sorted((tmp_path / "new").glob("*.safetensors")):
        rebuilt.update(load_file(str(f)))
    assert set(rebuilt) == set(tuned)
    for name, t in tuned.items():
        assert hashlib.sha256(rebuilt[name].tobytes()).digest() == hashlib.sha256(t.numpy().tobytes()).digest(), name


def test_the_cli_on_real_float32_weights_prints_the_run_and_nothing_else(real, tmp_path):
    """A fresh ``raydiff submit`` (default ``--rank exact``) of the float32 file: stdout is the
    run id, stderr the summary, and no library's warning (torch's about read-only arrays was
    printed on every F32 run: its memory-mapped matrices went to the metrics as they are)."""
    import subprocess
    import sys

    path, folder, base, tuned = real
    r = subprocess.run([sys.executable, "-m", "raydiff.cli.main", "submit", str(path), str(folder), "--store",
                        str(tmp_path / "store"), "--backend", "local"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    changed = sum(ref_diff(base[k], tuned[k])["changed"] for k in base)
    assert f"{changed:,} of {sum(t.numel() for t in base.values()):,} entries changed" in r.stderr
    assert "Warning" not in r.stderr and "warn" not in r.stderr.lower(), r.stderr
    assert len(r.stdout.split()) == 1
