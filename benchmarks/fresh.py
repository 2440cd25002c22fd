"""What a user runs: fresh `raydiff submit` processes — fixed cost, marginal throughput, and a
checkpoint pair larger than the machine's memory read at the disk's speed.

Sections of ``benchmarks/run.py`` (``--only fresh disk``):

- ``fresh``: fresh ``raydiff submit --rank off`` processes on warm bf16 pairs (20 % changed):
  a tiny pair (its time is the fixed cost: start-up, plan, commit), 0.4 GB and 4.0 GB
  (marginal throughput Δbytes/Δtime), best of five each, interleaved; beside them the same submissions
  from one process whose work is already started (the kernel compiled and loaded), and the
  fixed cost of ``--backend ray`` (a local Ray cluster started and stopped per process).
- ``disk``: a Llama-3.1-8B-shaped pair (more layers where the machine has more memory), bigger
  than RAM, 25 % changed, written once and deleted at the end; page cache dropped before each
  run, alternating, two runs each: ``cat`` of the pair's files (the disk's sequential read)
  and ``raydiff submit --rank off``, with the peak anonymous memory of the raydiff process;
  with ``--disk-sketch``, then ``--rank sketch`` (``--subspace-k 0``: the sketch alone) once,
  and what it costs beyond the diff (about 15 min on 2 cores).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from pairs import llama8b_shapes, make_pair, write_llama_like

GB = 1e9
CLI = [sys.executable, "-m", "raydiff.cli.main", "submit"]


def _files(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs for p in sorted(d.glob("*.safetensors"))]


def _read(paths) -> None:
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _drop_caches(paths) -> str:
    """Empty the page cache: every clean page when root can (``drop_caches``), else the pair's
    own files (``posix_fadvise`` DONTNEED). Returns which."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def _anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def timed(cmd: list[str], **kw) -> tuple[float, int]:
    """Run ``cmd``; its wall time and the peak anonymous RSS of it and its children (sampled
    every 50 ms)."""
    peak = 0
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            try:
                kids = [int(x) for x in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
            except OSError:  # it has just ended
                kids = []
            peak = max(peak, sum(_anon(q) for q in [p.pid, *kids]))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return seconds, peak


def _submit(root: Path, store: Path, *extra: str) -> tuple[float, int]:
    shutil.rmtree(store, ignore_errors=True)
    out = timed([*CLI, str(root / "base"), str(root / "tuned"), "--store", str(store), *extra])
    shutil.rmtree(store, ignore_errors=True)
    return out


def fresh(work: Path) -> dict[str, float]:
    from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
    from raydiff.run.submit import submit

    sizes_gb = {"tiny": 0.01, "small": 0.4, "large": 4.0}
    roots, nbytes = {}, {}
    for label, gb in sizes_gb.items():
        roots[label] = work / f"pair-{gb:g}"
        if not (roots[label] / "tuned" / "model.safetensors.index.json").exists():
            make_pair(roots[label], int(gb * GB), hidden=256 if gb < 0.1 else 2048)
        files = _files(roots[label] / "base", roots[label] / "tuned")
        nbytes[label] = sum(os.path.getsize(p) for p in files)
        _read(files)  # warm, as a download or a copy leaves them
    store = work / "store-fresh"
    # best of nine, the sizes interleaved: a slow spell of this shared VM falls on all alike.
    # CPU time beside wall time: the difference of two best-of-N wall times moves by ±30 %
    # from run to run, the CPU time a size costs by far less
    fresh_s = {label: float("inf") for label in roots}
    fresh_cpu = {label: float("inf") for label in roots}
    peak = {label: 0 for label in roots}
    for _ in range(9):
        for label, root in roots.items():
            cpu0 = _cpu(resource.RUSAGE_CHILDREN)
            seconds, anon = _submit(root, store, "--rank", "off")
            fresh_cpu[label] = min(fresh_cpu[label], _cpu(resource.RUSAGE_CHILDREN) - cpu0)
            fresh_s[label], peak[label] = min(fresh_s[label], seconds), max(peak[label], anon)
    ray_fixed = min(_submit(roots["tiny"], store, "--rank", "off", "--backend", "ray")[0] for _ in range(2))

    def inproc(root: Path) -> tuple[float, float]:
        shutil.rmtree(store, ignore_errors=True)
        t0, cpu0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
        submit(str(root / "base"), str(root / "tuned"), SubmitOptions(
            store=str(store), diff=DiffOptions(rank="off"), cluster=ClusterOptions(backend="local")))
        return time.perf_counter() - t0, _cpu(resource.RUSAGE_SELF) - cpu0

    inproc(roots["tiny"])  # the work started: kernel compiled and loaded
    started = {label: float("inf") for label in roots}
    started_cpu = {label: float("inf") for label in roots}
    for _ in range(9):
        for label, root in roots.items():
            seconds, cpu = inproc(root)
            started[label], started_cpu[label] = min(started[label], seconds), min(started_cpu[label], cpu)
    shutil.rmtree(store, ignore_errors=True)
    for label in roots:
        print(f"fresh submit, warm {nbytes[label] / GB:.2f} GB: {fresh_s[label]:.2f} s "
              f"(started: {started[label]:.2f} s); peak anonymous memory {peak[label] / 2**20:.0f} MiB")
    m_fresh = (nbytes["large"] - nbytes["small"]) / (fresh_s["large"] - fresh_s["small"])
    m_started = (nbytes["large"] - nbytes["small"]) / (started["large"] - started["small"])
    print(f"fixed cost of a fresh `raydiff submit` (tiny pair, best of 9): {fresh_s['tiny']:.2f} s; "
          f"with --backend ray: {ray_fixed:.2f} s")
    print(f"marginal throughput 0.4 → 4.0 GB: fresh processes {m_fresh / GB:.2f} GB/s, started {m_started / GB:.2f} GB/s "
          f"(fresh / started = {m_fresh / m_started:.0%})")
    d_fresh = fresh_cpu["large"] - fresh_cpu["small"]
    d_started = started_cpu["large"] - started_cpu["small"]
    print(f"CPU time of the 3.6 GB more, fresh processes / started: {d_fresh:.2f} / {d_started:.2f} CPU-s "
          f"(fresh pays {d_fresh / d_started - 1:+.0%}); whole runs {fresh_cpu['small']:.2f} → "
          f"{fresh_cpu['large']:.2f} / {started_cpu['small']:.2f} → {started_cpu['large']:.2f} CPU-s")
    return {"fixed": fresh_s["tiny"], "ray_fixed": ray_fixed, "marginal_fresh": m_fresh, "marginal_started": m_started}


def _cpu(who: int) -> float:
    """User + system CPU seconds of this process, or of its children waited for."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _mem_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def disk(work: Path, keep: bool = False, sketch: bool = False) -> dict[str, float]:
    ram = _mem_bytes()
    shapes = llama8b_shapes()
    per_layer = sum(2 * _numel(s) for n, s in shapes.items() if ".layers.0." in n)
    pair = 2 * sum(2 * _numel(s) for s in shapes.values())
    layers = 32
    while pair < 1.25 * ram:  # a bigger machine: more layers until the pair is 1.25× its memory
        layers += 1
        pair += 2 * per_layer
    shapes = llama8b_shapes(layers=layers)
    root = work / f"big-{layers}l"
    free = shutil.disk_usage(work).free
    have = (root / "tuned" / "model.safetensors.index.json").exists()
    if not have and free < pair + 4 * GB:
        print(f"disk: skipped: the {pair / GB:.1f} GB pair needs {(pair + 4 * GB) / GB:.0f} GB free, {work} has "
              f"{free / GB:.0f} GB")
        return {}
    try:
        if not have:
            t0 = time.perf_counter()
            write_llama_like(root / "base", shapes, None, shard_bytes=4 << 30)
            write_llama_like(root / "tuned", shapes, 0.25, shard_bytes=4 << 30)
            print(f"disk: wrote a {pair / GB:.1f} GB pair ({layers} layers, RAM {ram / 2**30:.0f} GiB) in "
                  f"{time.perf_counter() - t0:.0f} s")
        files = _files(root / "base", root / "tuned")
        nbytes = sum(os.path.getsize(p) for p in files)
        store = work / "store-disk"
        cat, off, peaks = [], [], []
        how = ""
        for _ in range(2):
            how = _drop_caches(files)
            cat.append(timed(["cat", *files], )[0])
            _drop_caches(files)
            seconds, peak = _submit(root, store, "--rank", "off")
            off.append(seconds)
            peaks.append(peak)
        print(f"disk ({how} before each): cat {' / '.join(f'{s:.1f}' for s in cat)} s "
              f"({' / '.join(f'{nbytes / s / GB:.2f}' for s in cat)} GB/s); raydiff submit --rank off "
              f"{' / '.join(f'{s:.1f}' for s in off)} s ({' / '.join(f'{nbytes / s / GB:.2f}' for s in off)} GB/s)")
        ratio = (nbytes / min(off)) / (nbytes / min(cat))
        print(f"disk: raydiff end to end = {ratio:.0%} of the disk's sequential read (best runs); "
              f"{sum(cat) / sum(off):.0%} on the means; peak anonymous memory "
              f"{' / '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB")
        out = {"cat": min(cat), "off": min(off), "ratio": ratio, "peak": max(peaks), "bytes": nbytes}
        if sketch:
            _drop_caches(files)
            seconds, peak = _submit(root, store, "--rank", "sketch", "--subspace-k", "0")
            print(f"disk: --rank sketch --subspace-k 0: {seconds:.0f} s, {seconds - sum(off) / len(off):.0f} s beyond "
                  f"the diff; peak anonymous memory {peak / 2**20:.0f} MiB")
            out["sketch"] = seconds
        return out
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def versus_paper(work: Path, gb: float) -> float:
    """Fresh processes on both sides, the same warm pair: ``benchmarks/paper_style.py`` against
    ``raydiff submit --rank off``, best of two each, alternating. Returns the speed-up."""
    root = work / f"pair-{gb:g}"
    if not (root / "tuned" / "model.safetensors.index.json").exists():
        make_pair(root, int(gb * GB))
    files = _files(root / "base", root / "tuned")
    _read(files)
    paper, ours = [], []
    for _ in range(2):
        paper.append(timed([sys.executable, str(Path(__file__).with_name("paper_style.py")), str(root)])[0])
        ours.append(_submit(root, work / "store-paper", "--rank", "off")[0])
    size = sum(os.path.getsize(p) for p in files)
    print(f"fresh processes, warm {size / GB:.2f} GB pair: paper-style script {min(paper):.2f} s, raydiff submit "
          f"--rank off {min(ours):.2f} s: {min(paper) / min(ours):.1f}×")
    return min(paper) / min(ours)
