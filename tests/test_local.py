"""The local backend (this process's threads, no Ray): what it counts, when ``auto`` picks it,
and that a failed local run resumes like a Ray one.

Counts are checked against torch/numpy (tests/builders.py); the Ray run of the same pair is
an invariance check on top.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from builders import SUM_REL, perturb, ref_diff, write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import InvalidCheckpoint, InvalidOption
from raydiff.kernel.masks import decode_mask
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
from raydiff.run import local
from raydiff.run.submit import Progress, submit
from raydiff.query.views import query

_COUNTS = ("numel", "changed", "changed_bits", "changed_1e8", "changed_1e7", "changed_1e6", "changed_1e5",
           "changed_1e4", "changed_rel")


def _pair(tmp_path):
    g = torch.Generator().manual_seed(7)
    base = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(160, 64, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(64, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 160, generator=g).half(),
    }
    tuned = {k: perturb(v, frac, scale, i) for i, ((k, v), frac, scale) in
             enumerate(zip(base.items(), (0.3, 0.05, 0.5, 0.2), (1e-2, 3e-3, 1e-6, 1e-3)))}
    return (write_checkpoint(tmp_path / "base", base, shards=2), write_checkpoint(tmp_path / "tuned", tuned, shards=2),
            base, tuned)


def _tensors(store, run_id):
    cols, rows = query(store, f"SELECT * FROM tensors WHERE run_id = '{run_id}' ORDER BY tensor")
    return {r[cols.index("tensor")]: dict(zip(cols, r)) for r in rows}


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_local_backend_counts_what_torch_counts_and_stores_what_ray_stores(tmp_path, ray_cluster):
    b, t, base, tuned = _pair(tmp_path)
    diff = DiffOptions(chunk_elems=1024, hash=True)
    store = str(tmp_path / "local")
    res = submit(str(b), str(t), SubmitOptions(store=store, diff=diff,
                                               cluster=ClusterOptions(backend="local", workers=2)))
    got = _tensors(store, res.run_id)
    for name in base:
        ref = ref_diff(base[name], tuned[name])
        for k in _COUNTS:
            assert got[name][k] == ref[k], (name, k)
        assert got[name]["delta_fro"] == pytest.approx(ref["delta_fro"], rel=SUM_REL)
        assert (got[name]["base_sha256"], got[name]["tuned_sha256"]) == (_sha(base[name]), _sha(tuned[name]))
        if base[name].ndim == 2:
            assert got[name]["rank"] == ref["rank"], name
    _, nodes = query(store, f"SELECT DISTINCT node_id FROM units WHERE run_id = '{res.run_id}'")
    assert nodes == [(f"local:{os.uname().nodename}",)]
    # the same run id and the same results as Ray's actors
    ray_store = str(tmp_path / "ray")
    on_ray = submit(str(b), str(t), SubmitOptions(store=ray_store, diff=diff, cluster=ClusterOptions(backend="ray")))
    assert on_ray.run_id == res.run_id
    same = ("changed", "changed_bits", "changed_rel", "max_abs_delta", "delta_fro", "rank", "top_sv",
            "base_sha256", "tuned_sha256", "rows_touched", "cols_touched")
    assert {n: [r[c] for c in same] for n, r in _tensors(ray_store, res.run_id).items()} == \
           {n: [r[c] for c in same] for n, r in got.items()}


def test_sketch_spectra_are_bitwise_those_of_the_ray_backend(tmp_path, ray_cluster):
    """A sketch's products go through the BLAS, whose sums depend on its thread count (at
    256×512 already): the local backend holds it to one thread per worker, as an actor's one
    CPU does, so both backends store the same bits. Values are checked against numpy's SVD."""
    g = torch.Generator().manual_seed(11)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 512, generator=g).bfloat16() for i in range(2)}
    # a planted rank-4 update, whose top σ a sketch finds to float32 accuracy, on top of bf16 rounding
    tuned = {k: (v.float() + torch.randn(256, 4, generator=g) @ torch.randn(4, 512, generator=g) * 0.05).bfloat16()
             for k, v in base.items()}
    b, t = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", tuned)
    diff = DiffOptions(rank="sketch", sketch_rank=64, subspace_k=8)
    stores = {backend: str(tmp_path / backend) for backend in ("local", "ray")}
    runs = {backend: submit(str(b), str(t), SubmitOptions(store=store, diff=diff, cluster=ClusterOptions(
        backend=backend, **({"workers": 2} if backend == "local" else {})))) for backend, store in stores.items()}
    assert runs["local"].run_id == runs["ray"].run_id
    same = ("top_sv", "stable_rank", "principal_cos_u", "principal_cos_v", "principal_angle_max_deg", "spectral_shift")
    got = {backend: {n: {c: r[c] for c in same} for n, r in _tensors(store, runs[backend].run_id).items()}
           for backend, store in stores.items()}
    assert got["local"] == got["ray"]
    for name in base:
        delta = (tuned[name].float() - base[name].float()).bfloat16().float().numpy()
        sv = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
        np.testing.assert_allclose(got["local"][name]["top_sv"][:4], sv[:4], rtol=1e-5, err_msg=name)


def test_a_threads_reused_delta_buffer_grows_for_a_larger_matrix(tmp_path):
    """Each thread writes ΔW into one buffer it keeps (``Executor.delta_matrix``): on one
    thread, matrices of growing size in file order (none large enough to go first) each get
    numpy's singular values and torch's rank."""
    g = torch.Generator().manual_seed(13)
    sizes = range(100, 180, 10)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(k, k + 1, generator=g).bfloat16()
            for i, k in enumerate(sizes)}
    tuned = {k: perturb(v, 0.5, 1e-2, i) for i, (k, v) in enumerate(base.items())}
    b, t = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", tuned)
    store = str(tmp_path / "store")
    res = submit(str(b), str(t), SubmitOptions(store=store, diff=DiffOptions(rank="exact", subspace_k=0),
                                               cluster=ClusterOptions(backend="local", workers=1)))
    got = _tensors(store, res.run_id)
    for name in base:
        delta = (tuned[name] - base[name]).float()  # the paper's Δ, in bf16
        sv = np.linalg.svd(delta.numpy().astype(np.float64), compute_uv=False)
        np.testing.assert_allclose(got[name]["top_sv"][:8], sv[:8], rtol=1e-5, err_msg=name)
        assert got[name]["rank"] == int(torch.linalg.matrix_rank(delta)), name


def test_auto_runs_locally_only_with_no_cluster_given(monkeypatch, ray_cluster):
    assert local.chosen(ClusterOptions(backend="local"))
    assert not local.chosen(ClusterOptions(backend="ray"))
    assert not local.chosen(ClusterOptions())  # this process is connected to Ray: keep it
    monkeypatch.setattr(local, "has_gpu", lambda: False)
    assert not local.chosen(ClusterOptions(address="10.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not local.chosen(ClusterOptions())
    with pytest.raises(InvalidOption, match="backend"):
        ClusterOptions(backend="local", address="10.0.0.1:6379")
    with pytest.raises(InvalidOption, match="backend must be one of auto, ray, local"):
        ClusterOptions(backend="threads")


def test_has_gpu_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as if not loaded: decided from the devices
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local.has_gpu() is False
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    nvidia = "/proc/driver/nvidia/gpus"
    expect = (os.path.isdir(nvidia) and bool(os.listdir(nvidia))) or os.path.exists("/dev/kfd")
    assert local.has_gpu() is expect


def test_a_fresh_cli_process_with_no_cluster_runs_locally_without_ray(tmp_path):
    b, t, base, tuned = _pair(tmp_path)
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # -X importtime lists every module the process imported: Ray and torch must not be among them
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "raydiff.cli.main", "submit", str(b), str(t),
                        "--store", str(store), "--rank", "off", "--chunk-elems", "1024"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "ray" not in imported and "torch" not in imported
    run_id = p.stdout.strip()
    got = _tensors(str(store), run_id)
    for name in base:
        ref = ref_diff(base[name], tuned[name])
        assert [got[name][k] for k in _COUNTS] == [ref[k] for k in _COUNTS], name
    _, rows = query(str(store), f"SELECT count(*), count(DISTINCT node_id), min(node_id) FROM units "
                                f"WHERE run_id = '{run_id}'")
    assert rows[0][0] > len(base) and rows[0][1:] == (1, f"local:{os.uname().nodename}")


class _Truncate(Progress):
    """Cuts a shard short once the plan is made: the units reading past its end fail."""

    def __init__(self, path) -> None:
        self.path, self.saved, self.mtime = path, path.read_bytes(), path.stat().st_mtime_ns

    def planned(self, p) -> None:
        self.path.write_bytes(self.saved[: len(self.saved) // 2])

    def restore(self) -> None:
        """The file as it was, mtime included: the same checkpoint, so the same run resumes."""
        self.path.write_bytes(self.saved)
        os.utime(self.path, ns=(self.mtime, self.mtime))


def test_a_failed_local_run_names_the_tensor_and_resumes(tmp_path):
    b, t, base, tuned = _pair(tmp_path)
    store = str(tmp_path / "store")
    opts = SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1024, rank="off"),
                         cluster=ClusterOptions(backend="local", workers=2))
    shard = sorted(t.glob("*.safetensors"))[-1]
    cut = _Truncate(shard)
    with pytest.raises(InvalidCheckpoint, match=r"tensor \"model\.layers\.0\.[a-z_.]+\" extends past the end of the file"):
        submit(str(b), str(t), opts, cut)
    _, rows = query(store, "SELECT status FROM runs")
    assert rows == [("incomplete",)]
    # the units.parquet folded while the run went on is dropped with it: no temporary is left
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]
    # one a killed process would leave (in the run's units/ folder) goes with the commit
    run_dir = next((tmp_path / "store" / "runs").iterdir())
    (run_dir / "units").mkdir(exist_ok=True)
    # the tensor the cut runs through has units done before the failure (read back from their
    # files when it is folded) and units done on resume (folded from memory)
    before = {int(p.name[1:9]) for p in (run_dir / "units").glob("u*.parquet")}
    _, spans = query(store, "SELECT tensor, first_unit, n_units FROM plan")
    assert any(0 < len(before & set(range(f, f + n))) < n for _, f, n in spans), (before, spans)
    (run_dir / "units" / f"units.parquet.tmp-{'0' * 32}").write_bytes(b"torn")
    cut.restore()
    res = submit(str(b), str(t), opts)
    assert res.run_id == run_dir.name
    assert res.commit.changed == sum(ref_diff(base[n], tuned[n])["changed"] for n in base)
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]
    # folded as the units arrived: one row group per tensor, every unit once, masks as numpy's
    folded = pq.ParquetFile(run_dir / "units.parquet")
    assert folded.metadata.num_row_groups == len(base) and folded.metadata.num_rows == res.run.n_units
    for g in range(folded.metadata.num_row_groups):  # each tensor's units in order, those in files and in memory
        ids = folded.read_row_group(g, columns=["unit_id"]).column(0).to_pylist()
        assert ids == list(range(ids[0], ids[0] + len(ids))), ids
    _, rows = query(store, f"SELECT tensor, start, stop, mask_codec, mask FROM masks WHERE run_id = '{res.run_id}' "
                           "ORDER BY tensor, start")
    for name in base:
        got = np.concatenate([decode_mask(c, m, stop - start) for t_, start, stop, c, m in rows if t_ == name])
        np.testing.assert_array_equal(got, ref_diff(base[name], tuned[name])["mask"], err_msg=name)


def test_cli_backend_option(tmp_path):
    r = CliRunner().invoke(app, ["submit", "a", "b", "--store", str(tmp_path / "s"), "--backend", "threads"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: --backend must be one of auto, ray, local")


def test_the_memory_budget_runs_big_spectra_one_at_a_time_and_small_ones_together():
    budget = local._Budget(10)
    inside, most, lock = [0], [0], threading.Lock()
    go = threading.Event()

    def hold(need: int) -> None:
        with budget.held(need):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            go.wait(0.2)
            with lock:
                inside[0] -= 1

    def together(needs) -> int:
        most[0] = 0
        threads = [threading.Thread(target=hold, args=(k,)) for k in needs]
        [t.start() for t in threads]
        [t.join(10) for t in threads]
        assert not any(t.is_alive() for t in threads)  # a task bigger than the budget still runs
        return most[0]

    assert together([8, 8]) == 1  # 16 > 10: one after the other
    assert together([4, 4]) == 2  # 8 <= 10: side by side
    assert together([30]) == 1  # bigger than the whole budget: alone, not never
    assert budget.used == 0 and budget.running == 0


def test_spectra_computed_a_block_of_rows_at_a_time_match_torch(tmp_path, monkeypatch):
    """ΔW is rounded, and its ‖ΔW‖F² summed, a block of rows at a time (so that an embedding's
    ΔW costs its own size, not several copies): blocks of 3 rows here, of 100 rows of a
    1100-row matrix for the sum, so every block boundary is crossed."""
    from raydiff.kernel.spectrum import _sum_sq, spectrum
    from raydiff.run import execute

    monkeypatch.setattr(execute, "DELTA_BLOCK_ELEMS", 3 * 64)
    g = torch.Generator().manual_seed(3)
    base = {"m.weight": torch.randn(50, 64, generator=g).bfloat16()}
    tuned = {"m.weight": perturb(base["m.weight"], 0.4, 1e-2, 9)}
    b, t = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)
    store = str(tmp_path / "s")
    res = submit(str(b), str(t), SubmitOptions(store=store, diff=DiffOptions(subspace_k=0),
                                               cluster=ClusterOptions(backend="local", workers=1)))
    row = _tensors(store, res.run_id)["m.weight"]
    delta = (tuned["m.weight"] - base["m.weight"]).float()  # the paper's Δ, in bf16
    assert row["rank"] == int(torch.linalg.matrix_rank(delta))
    assert row["top_sv"][:5] == pytest.approx(torch.linalg.svdvals(delta.double())[:5].tolist(), rel=1e-5)
    big = torch.randn(1100, 7, generator=g)  # 7,700 entries: across numba's blocks of 4,096 too
    want = float((big.numpy().astype(np.float64) ** 2).sum())
    for block in (7 * 100, 1 << 16):  # the numba pass (contiguous) and torch's blocks of rows (not)
        assert _sum_sq(big, block) == pytest.approx(want, rel=1e-12)
        assert _sum_sq(big.T, block) == pytest.approx(want, rel=1e-12)
    assert spectrum(big, "exact").fro == pytest.approx(float(big.double().norm()), rel=1e-12)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_each_tensor_is_folded_into_units_parquet_as_its_last_unit_is_stored(tmp_path, request, backend):
    """The commit has little left to do: while the run goes on, each tensor's rows are
    written to the run's ``units.parquet`` (under a temporary name) once its last unit is
    stored, so the file has grown before the last unit is reported — on either backend
    (a Ray actor's reports arrive unpickled: other string objects than the driver's)."""
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    b, t, base, _ = _pair(tmp_path)
    runs = tmp_path / "store" / "runs"
    seen: list[tuple[str, int]] = []

    class Watching(Progress):
        def advanced(self, done) -> None:
            growing = list(runs.glob("*/units/units.parquet.tmp-*"))
            seen.append((done.kind, sum(p.stat().st_size for p in growing)))

    opts = SubmitOptions(store=str(tmp_path / "store"), diff=DiffOptions(chunk_elems=1024, rank="off"),
                         cluster=ClusterOptions(backend=backend, workers=1))
    res = submit(str(b), str(t), opts, Watching())
    sizes = [size for kind, size in seen if kind == "unit"]
    assert len(sizes) == res.run.n_units > len(base)
    # it grew with each tensor folded before the last unit (not just its 4-byte magic number)
    assert sizes == sorted(sizes) and len(set(sizes)) >= len(base) - 1 and sizes[-2] > sizes[0]
    assert not list(runs.glob("*/units/*.tmp-*"))
    assert pq.ParquetFile(runs / res.run_id / "units.parquet").metadata.num_row_groups == len(base)


def _resident(path) -> float:
    """The fraction of a file's pages in the page cache (``mincore`` of a fresh map)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) / pages


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_a_pair_bigger_than_memory_leaves_the_page_cache_as_its_units_are_done(tmp_path, monkeypatch):
    """Only a pair bigger than the memory available (here: the machine made to say it has
    1 MiB) is dropped from the page cache unit by unit; the counts are numpy's either way."""
    g = torch.Generator().manual_seed(5)
    # 8 MiB a tensor: the page cache's large folios (up to 2 MiB) that reach past a tensor
    # are kept, so only a tensor much larger than them leaves nearly whole
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 2048, generator=g).bfloat16() for i in range(2)}
    tuned = {k: perturb(v, 0.2, 1e-2, i) for i, (k, v) in enumerate(base.items())}
    b, t = write_checkpoint(tmp_path / "base", base, shards=2), write_checkpoint(tmp_path / "tuned", tuned, shards=2)
    files = sorted(b.glob("*.safetensors")) + sorted(t.glob("*.safetensors"))
    os.sync()  # written pages are dirty until written back, and only clean ones can be dropped
    resident = {}
    for small in (False, True):
        if small:
            monkeypatch.setattr(local, "available_memory", lambda: 1 << 20)
        for f in files:  # in the page cache to begin with, as the files' writing left them
            f.read_bytes()
        store = str(tmp_path / f"store-{small}")
        res = submit(str(b), str(t), SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1 << 20, rank="off"),
                                                   cluster=ClusterOptions(backend="local", workers=2)))
        got = _tensors(store, res.run_id)
        for name in base:
            ref = ref_diff(base[name], tuned[name])
            assert [got[name][k] for k in _COUNTS] == [ref[k] for k in _COUNTS], name
        resident[small] = [_resident(f) for f in files]
    assert min(resident[False]) == 1.0, resident
    assert max(resident[True]) < 0.05, resident  # the folios that reach past a tensor are left


def _read_bytes() -> int:
    """Bytes this process has had read from storage (``/proc/self/io``), not from the page cache."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def _read_once(tmp_path, monkeypatch, base: dict, tuned: dict) -> tuple[str, str]:
    """Submit a cold pair on 2 local threads with the machine made to say it has 1 MiB, so
    that tensors leave the page cache as they are done; check that it was read from the disk
    once and that every file is out of the cache at the end. Returns ``(store, run_id)``."""
    b, t = write_checkpoint(tmp_path / "base", base, shards=2), write_checkpoint(tmp_path / "tuned", tuned, shards=2)
    files = sorted(b.glob("*.safetensors")) + sorted(t.glob("*.safetensors"))
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if max(_resident(f) for f in files) > 0.05:
        pytest.skip("these files cannot leave the page cache here (tmpfs?)")
    monkeypatch.setattr(local, "available_memory", lambda: 1 << 20)
    before = _read_bytes()
    store = str(tmp_path / "store")
    res = submit(str(b), str(t), SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1 << 20, rank="exact",
                                                                             subspace_k=0),
                                               cluster=ClusterOptions(backend="local", workers=2)))
    read = _read_bytes() - before
    pair = sum(os.path.getsize(f) for f in files)
    if read == 0:
        pytest.skip("this file system does not count its reads in /proc/self/io")
    print(f"read {read / pair:.2f}× the pair from the disk")
    assert read < 1.25 * pair, f"read {read / pair:.2f}× the pair from the disk"
    resident = {f.name: round(_resident(f), 3) for f in files}
    assert max(resident.values()) < 0.05, resident
    return store, res.run_id


_COLD = pytest.mark.skipif(not (hasattr(os, "posix_fadvise") and os.path.exists("/proc/self/io")),
                           reason="no posix_fadvise or /proc/self/io here")


@_COLD
def test_a_sketch_run_bigger_than_memory_reads_each_tensor_from_the_disk_once(tmp_path, monkeypatch):
    """A matrix's spectrum outlasts its units: the tensor may leave the page cache only when
    both are done, or the spectrum reads it from the disk again (a 32 GB pair's sketch run
    read 49 GB). Cold files, the machine made to say it has 1 MiB; exact spectra (a sketch's
    would be the same work) checked against numpy's SVD, every file out of the cache at the end."""
    g = torch.Generator().manual_seed(6)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 4096, generator=g).bfloat16() for i in range(4)}
    tuned = {k: perturb(v, 0.2, 1e-2, i) for i, (k, v) in enumerate(base.items())}
    store, run_id = _read_once(tmp_path, monkeypatch, base, tuned)
    got = _tensors(store, run_id)
    for name in base:
        delta = (tuned[name].float() - base[name].float()).bfloat16().double().numpy()
        sv = np.linalg.svd(delta, compute_uv=False)
        np.testing.assert_allclose(got[name]["top_sv"][:8], sv[:8], rtol=1e-5, err_msg=name)


@_COLD
def test_a_stack_of_experts_leaves_the_page_cache_whole_when_a_spectrum_finishes_it(tmp_path, monkeypatch):
    """A stack of experts has a spectrum per expert, whose byte range is that expert's. The
    stack's last expert's exact SVD outlasts that expert's unit, so a spectrum finishes the
    tensor: it must drop the whole stack from the page cache, not its own expert (which left
    seven eighths of each stack cached). Each expert's spectrum checked against numpy's SVD."""
    g = torch.Generator().manual_seed(8)
    base = {f"model.layers.{i}.mlp.experts.down_proj": torch.randn(8, 256, 1024, generator=g).bfloat16()
            for i in range(2)}
    tuned = {k: perturb(v, 0.2, 1e-2, i) for i, (k, v) in enumerate(base.items())}
    store, run_id = _read_once(tmp_path, monkeypatch, base, tuned)
    _, rows = query(store, f"SELECT tensor, expert, top_sv FROM spectra WHERE run_id = '{run_id}'")
    assert sorted((name, e) for name, e, _ in rows) == sorted((name, e) for name in base for e in range(8))
    for name, e, top in rows:
        delta = (tuned[name][e].float() - base[name][e].float()).bfloat16().double().numpy()
        np.testing.assert_allclose(top[:8], np.linalg.svd(delta, compute_uv=False)[:8], rtol=1e-5,
                                   err_msg=f"{name} expert {e}")
