"""raydiff benchmarks, one run, everything side by side.

    .venv/bin/python benchmarks/run.py [--small-gb 0.5] [--large-gb 4] [--workdir /tmp/raydiff-bench]

Prints, in order: the machine's own bandwidth (memory copy, cold and warm file reads);
the kernel's throughput at several densities: numpy's bitwise compare + count, the bitwise
criterion producing what a run stores for it (count + packed mask in one numba pass, then
the store's mask codec), and raydiff's one pass with every criterion, statistics and the
compressed mask (on an AVX-512 CPU, the portable loop's beside it); end-to-end ``submit`` (rank off)
on two pair sizes, warm and cold, as marginal throughput Δbytes/Δtime (cancels Ray
start-up); the paper-style baseline on the same pair (safetensors + torch, Δ in bf16,
``abs() <= 1e-5``); rank, exact vs sketch, on a planted low-rank + noise matrix; the
sketch's products on one thread, torch's BLAS against numpy's; mask
overlap in bits/s and its extrapolation to 7·10⁹ entries; peak memory of the driver and
actors; and, where CUDA is present, the GPU actor's kernel and rank times. Throughput counts input bytes: base + tuned.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import make_pair  # noqa: E402
import fresh as fresh_processes  # noqa: E402

GB = 1e9


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_each(fns, repeat: int = 9) -> list[float]:
    """Each function's best time, the calls interleaved so that a slow spell of the machine
    (a shared VM's neighbours) falls on all of them alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _evict(paths) -> None:
    """Drop files from the page cache (posix_fadvise DONTNEED) so the next read is cold."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _files(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs for p in sorted(d.glob("*.safetensors"))]


def _read_all(paths) -> int:
    n = 0
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n


def machine(work: Path) -> dict[str, float]:
    a = np.ones(1 << 28, np.uint8)
    b = np.empty_like(a)
    copy = a.nbytes / _best(lambda: np.copyto(b, a))
    a = b = None  # free the 512 MB before the read test
    f = work / "read.bin"
    if not f.exists():
        with open(f, "wb") as fh:
            for _ in range(8):
                fh.write(os.urandom(1 << 27))
    _evict([f])
    t0 = time.perf_counter()
    n = _read_all([f])
    cold = n / (time.perf_counter() - t0)
    warm = n / _best(lambda: _read_all([f]))
    print(f"machine: memory copy {copy / GB:.1f} GB/s; file read cold {cold / GB:.2f} GB/s, warm {warm / GB:.1f} GB/s")
    return {"copy": copy, "cold": cold, "warm": warm}


def _same_counts(a, b) -> bool:
    """Two loops' results agree: everything but the sums exactly, the sums to float32 rounding."""
    sums = ("sum_abs_delta", "sum_sq_delta", "sum_sq_base")
    return all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in sums) and all(
        np.isclose(getattr(a, f), getattr(b, f), rtol=1e-5) for f in sums)


def _bitwise_kernel():
    """The bitwise criterion alone, producing what a run stores for it (count + packed mask),
    fused the way raydiff's kernel is: compare and count in one numba pass per block, packed
    by the kernel's own block emitter."""
    from numba import njit

    from raydiff.kernel._fused import _emit

    @njit(nogil=True)
    def bits(a, b, hits, packed):
        none = np.zeros(0, np.uint8)  # no rows/columns: a 1-D unit
        cnt = 0
        for s in range(0, a.size, 4096):
            m = min(4096, a.size - s)
            ua, ub = a[s:s + m], b[s:s + m]
            c = np.int32(0)
            for j in range(m):
                h = np.int32(ua[j] != ub[j])
                c += h
                hits[j] = np.uint8(h)
            cnt += c
            _emit(hits, m, s, 0, packed, none, none)
        return cnt

    return bits


def kernel() -> dict[str, float]:
    from raydiff.kernel import _compact
    from raydiff.kernel.diff import Criteria, decode, diff_unit
    from raydiff.kernel.masks import decode_packed, encode_packed

    rng = np.random.default_rng(0)
    n = 1 << 24  # one default unit: 16 Mi elements, 32 MiB per side
    base = ((rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    out = {}
    loops = ["compact", "portable"] if _compact.available() else ["portable"]  # what raydiff runs here first
    for loop in loops:  # compile / load the cache
        diff_unit(base[:4096], base[:4096], "BF16", "BF16", "BF16", Criteria(), 64, loop)
    print("kernel: this CPU runs the " + ("AVX-512 compacting loop (the portable one shown for comparison)"
                                          if len(loops) == 2 else "portable loop (no AVX-512 here)"))
    bits = _bitwise_kernel()
    hits, packed = np.zeros(4096 + 8, np.uint8), np.zeros(n // 8, np.uint8)

    def full(loop):
        return diff_unit(base, tuned, "BF16", "BF16", "BF16", Criteria(), 4096, loop)

    for density in (0.0, 0.05, 0.2, 0.3, 0.5):
        tuned = base.copy()
        sel = rng.random(n, dtype=np.float32) < density
        tuned[sel] += 1
        nbytes = 2 * base.nbytes
        assert bits(base, tuned, hits, packed) == np.count_nonzero(base != tuned)
        assert np.array_equal(packed, np.packbits(base != tuned, bitorder="little"))
        changed = int(np.count_nonzero(sel))
        r = full(loops[0])
        assert all(_same_counts(r, full(c)) for c in loops[1:]), "the two loops disagree"
        rmask = decode_packed(r.mask_codec, r.mask, n)
        t_np, t_bits, t_code, t_rcode, *t_full = _best_each(
            [lambda: np.count_nonzero(base != tuned), lambda: bits(base, tuned, hits, packed),
             lambda: encode_packed(packed, changed), lambda: encode_packed(rmask, r.changed)]
            + [lambda c=c: full(c) for c in loops], repeat=21)
        bitwise, bits_stored, ours = nbytes / t_np, nbytes / (t_bits + t_code), nbytes / t_full[0]
        out[f"bitwise@{density}"], out[f"full@{density}"] = bitwise, ours
        out[f"bitwise_stored@{density}"] = bits_stored
        print(f"kernel, density {density:4.0%}: numpy bitwise compare+count {bitwise / GB:5.2f} GB/s; "
              f"bitwise with a run's output (count + packed mask in one numba pass {nbytes / t_bits / GB:5.2f} GB/s, "
              f"+ the store's mask codec) {bits_stored / GB:5.2f} GB/s")
        print(f"kernel, density {density:4.0%}: raydiff one pass (bits, atol ladder, rel, Δ stats, rows/cols, "
              f"compressed mask) {ours / GB:5.2f} GB/s, of which mask compression {t_rcode * 1e3:.1f} ms "
              f"of {t_full[0] * 1e3:.1f} = {bitwise / ours:.1f}× numpy bitwise, {bits_stored / ours:.2f}× bitwise "
              f"with a run's output" + (f"; the portable loop {nbytes / t_full[1] / GB:5.2f} GB/s "
                                        f"({t_full[1] / (t_bits + t_code):.2f}×)" if len(loops) == 2 else ""))
        if density == 0.2:  # one criterion each, done the plain numpy way on the same arrays
            fa, fb = decode(base, "BF16"), decode(tuned, "BF16")
            atol = nbytes / _best(lambda: np.count_nonzero(np.abs(fb - fa) > np.float32(1e-5)))
            rel = nbytes / _best(lambda: np.count_nonzero(
                np.abs(fb - fa) > np.float32(1e-3) * np.maximum(np.abs(fa), np.abs(fb))))
            print(f"kernel, density  20%: numpy per criterion, decoded to float32 first: abs tolerance "
                  f"{atol / GB:.2f} GB/s, relative {rel / GB:.2f} GB/s (each one criterion, no mask or stats)")
    return out


def end_to_end(work: Path, small_gb: float, large_gb: float) -> dict[str, float]:
    import ray

    from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
    from raydiff.run.submit import submit

    pairs = {}
    for label, gb in (("small", small_gb), ("large", large_gb)):
        root = work / f"pair-{gb:g}"
        if not (root / "tuned" / "model.safetensors.index.json").exists():
            make_pair(root, int(gb * GB))
        pairs[label] = root
    ray.init(include_dashboard=False, log_to_driver=False)
    import shutil

    results: dict[str, float] = {}
    rss: dict[str, int] = {}
    def once(root: Path, store: Path, cold: bool) -> tuple[float, object]:
        shutil.rmtree(store, ignore_errors=True)
        if cold:  # a fresh copy nobody has mapped, evicted from the page cache
            copy = work / "cold-copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(root, copy)
            root = copy
            _evict(_files(root / "base", root / "tuned"))
        else:
            _read_all(_files(root / "base", root / "tuned"))
        t0 = time.perf_counter()
        res = submit(str(root / "base"), str(root / "tuned"), SubmitOptions(
            store=str(store), diff=DiffOptions(rank="off"), cluster=ClusterOptions(keep_actors=True)))
        return time.perf_counter() - t0, res

    # Warm means in the page cache as reading the files leaves them (a download or a copy
    # leaves them alike), not as whatever touched them before: Linux caches a file read
    # through read() in large folios, which map at a fraction of the page faults that pages
    # faulted in one by one need (up to ~20 % of warm throughput here).
    for root in pairs.values():
        _evict(_files(root / "base", root / "tuned"))
        _read_all(_files(root / "base", root / "tuned"))
    once(pairs["small"], work / "store-warmup", False)  # starts the actor pool, as any second submit finds it
    for mode in ("warm", "cold"):
        times, sizes = {}, {}
        for label, root in pairs.items():
            sizes[label] = sum(os.path.getsize(p) for p in _files(root / "base", root / "tuned"))
            store = work / f"store-{label}-{mode}"
            runs = [once(root, store, mode == "cold") for _ in range(3)]
            times[label], res = min(runs, key=lambda r: r[0])
            from raydiff.query.views import query

            _, rows = query(str(store), f"SELECT max(rss_anon_bytes) FROM units WHERE run_id = '{res.run_id}'")
            rss[f"actor {label}"] = rows[0][0]
            rss[f"driver after {label}"] = _rss_anon()
            print(f"submit {mode} {label}: {sizes[label] / GB:.2f} GB in {times[label]:.2f} s "
                  f"({sizes[label] / times[label] / GB:.2f} GB/s including fixed costs)")
        marginal = (sizes["large"] - sizes["small"]) / (times["large"] - times["small"])
        results[mode] = marginal
        print(f"submit {mode}: marginal throughput {marginal / GB:.2f} GB/s")
    ray.shutdown()
    print("(best of 3 per size; the driver's actor pool is already started, as for every submit after")
    print(" the first in one process — with --backend ray a fresh `raydiff submit` adds Ray start-up, ~5 s, and actor")
    print(" start, ~2 s; the fresh section measures fresh processes)")
    print("peak memory: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss.items())
          + " (actors: anonymous RSS after each unit's kernel, max over units; driver: anonymous RSS)")
    results["large_bytes"] = sizes["large"]
    return results


def paper_baseline(work: Path, large_gb: float) -> float:
    from paper_style import count

    root = work / f"pair-{large_gb:g}"
    files = _files(root / "base", root / "tuned")
    nbytes = sum(os.path.getsize(p) for p in files)
    _read_all(files)
    dt = _best(lambda: count(root), repeat=2)
    print(f"paper-style baseline (safetensors load + torch bf16 Δ + abs() <= 1e-5): {nbytes / dt / GB:.2f} GB/s")
    return nbytes / dt


def rank() -> None:
    import torch

    from raydiff.kernel.spectrum import spectrum

    g = torch.Generator().manual_seed(0)
    m, n, r = 2048, 4096, 16
    planted = (torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)) * 1e-3
    noisy = (planted + torch.randn(m, n, generator=g) * 1e-6)
    torch.set_num_threads(1)  # one actor = one core
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # the sketch's products: numpy's BLAS
        exact = spectrum(noisy, "exact")
        sketch = spectrum(noisy, "sketch", sketch_rank=64)
    err = max(abs(a - b) / a for a, b in zip(exact.top_sv[:r], sketch.top_sv[:r]))
    print(f"rank {m}×{n} fp32, planted rank {r} + noise, one core: exact {exact.seconds:.2f} s "
          f"(matrix_rank {exact.rank}, rank@1e-2 {exact.rank_cutoffs[1]}); sketch-64 {sketch.seconds:.2f} s "
          f"(rank@1e-2 {sketch.rank_cutoffs[1]}, top-{r} σ max rel. error {err:.1e}); "
          f"speed-up {exact.seconds / sketch.seconds:.0f}×")


def gpu() -> None:
    """The GPU actor's paths: torch kernel per unit (host→device copy included, and not) and
    exact vs sketch rank of a 4096×14336 update — the matrix that takes ~38 s on 2 CPU cores."""
    import torch

    from raydiff.kernel.diff import Criteria, diff_unit
    from raydiff.kernel.torch_diff import diff_unit_torch
    from raydiff.kernel.spectrum import spectrum

    if not torch.cuda.is_available():
        print("gpu: no CUDA device, skipped")
        return
    dev = "cuda"
    print(f"gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    n = 1 << 24
    base = ((rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    for density in (0.0, 0.2):
        tuned = base.copy()
        tuned[rng.random(n, dtype=np.float32) < density] += 1
        got = diff_unit_torch(base, tuned, "BF16", "BF16", "BF16", Criteria(), 4096, device=dev)
        want = diff_unit(base, tuned, "BF16", "BF16", "BF16", Criteria(), 4096)
        assert (got.changed, got.changed_bits, got.changed_ladder, got.rows_touched) == \
               (want.changed, want.changed_bits, want.changed_ladder, want.rows_touched)
        nbytes = 2 * base.nbytes

        def run():
            diff_unit_torch(base, tuned, "BF16", "BF16", "BF16", Criteria(), 4096, device=dev)
            torch.cuda.synchronize()

        host = nbytes / _best(run, 5)
        print(f"gpu kernel, density {density:4.0%}: one unit from host memory {host / GB:6.2f} GB/s "
              f"(counts equal the CPU kernel's)")
    g = torch.Generator().manual_seed(0)
    m, k, r = 4096, 14336, 64
    d = (torch.randn(m, r, generator=g) @ torch.randn(r, k, generator=g)) * 1e-3 + torch.randn(m, k, generator=g) * 1e-6
    dc = d.to(dev)
    spectrum(dc[:256, :256], "exact")  # cusolver warm-up
    exact = spectrum(dc, "exact")
    sketch = spectrum(dc, "sketch", sketch_rank=128)
    cpu_ref = spectrum(d[:1024], "exact")
    gpu_ref = spectrum(dc[:1024], "exact")
    assert cpu_ref.rank == gpu_ref.rank, (cpu_ref.rank, gpu_ref.rank)
    err = max(abs(a - b) / a for a, b in zip(exact.top_sv[:r], sketch.top_sv[:r]))
    print(f"gpu rank {m}×{k} fp32, planted rank {r} + noise: exact {exact.seconds:.2f} s (matrix_rank "
          f"{exact.rank}); sketch-128 {sketch.seconds:.3f} s (top-{r} σ max rel. error {err:.1e}); "
          f"1024×{k} exact rank CPU {cpu_ref.rank} = GPU {gpu_ref.rank}")


def hash_cost(work: Path, gb: float = 2.0) -> None:
    """What `--hash` adds: fresh `raydiff submit --rank off` processes of a warm bf16 pair
    (20 % changed), without and with `--hash`, alternating, two runs each."""
    import shutil
    import subprocess

    root = work / f"pair-{gb:g}"
    if not (root / "tuned" / "model.safetensors.index.json").exists():
        make_pair(root, int(gb * GB))
    files = _files(root / "base", root / "tuned")
    _read_all(files)
    cli = [sys.executable, "-m", "raydiff.cli.main", "submit", str(root / "base"), str(root / "tuned"), "--rank", "off"]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for hashed in (False, True):
            store = work / "store-hash"
            shutil.rmtree(store, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run([*cli, "--store", str(store)] + (["--hash"] if hashed else []), check=True,
                           capture_output=True)
            seconds[hashed].append(time.perf_counter() - t0)
    shutil.rmtree(work / "store-hash", ignore_errors=True)
    size = sum(os.path.getsize(p) for p in files) / GB
    print(f"--hash on a warm {size:.2f} GB bf16 pair, fresh processes: without "
          f"{' / '.join(f'{s:.1f}' for s in seconds[False])} s, with {' / '.join(f'{s:.1f}' for s in seconds[True])} s")


def science(full: bool) -> None:
    """The follow-up metrics' added cost per 4096×14336 bf16 matrix (the largest of an 8 B
    Llama), each part timed alone on this machine's cores and on the GPU where there is one:
    what `--subspace-k 16` and the magnitude masks add to the matrix pass of `--rank sketch` /
    `exact`, and the two full SVDs `spectral_shift_full` adds under `--rank exact`."""
    import torch

    from raydiff.kernel import science as sci
    from raydiff.kernel.diff import Criteria, decode, diff_unit
    from raydiff.kernel.masks import decode_packed
    from raydiff.kernel.spectrum import spectrum

    rng = np.random.default_rng(2)
    m, n = 4096, 14336
    base = ((rng.standard_normal(m * n, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    tuned = base.copy()
    tuned[rng.random(m * n, dtype=np.float32) < 0.25] += 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        w0 = torch.from_numpy(decode(base, "BF16").reshape(m, n)).to(dev)
        w1 = torch.from_numpy(decode(tuned, "BF16").reshape(m, n)).to(dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def timed(fn):
            t0 = time.perf_counter()
            out = fn()
            sync()
            return out, time.perf_counter() - t0

        timed(lambda: sci.subspace(w0[:512, :512], w1[:512, :512], 16))  # warm-up (cusolver, MKL)
        sub, t_sub = timed(lambda: sci.subspace(w0, w1, 16))
        _, t_sketch = timed(lambda: spectrum(w1 - w0, "sketch", sketch_rank=128))
        def low():
            r = diff_unit(base, tuned, "BF16", "BF16", "BF16", Criteria(), n)  # the matrix's mask, as the actor does
            sci.low_magnitude_overlap_bits(base, "BF16", decode_packed(r.mask_codec, r.mask, m * n), packed_mask=True)

        low()  # numba's compiled code loaded from its cache
        t_low = _best(low, 3)
        line = (f"science per {m}×{n} bf16 matrix on {dev} ({torch.get_num_threads()} threads): subspace k=16 "
                f"{t_sub:.2f} s (max angle {sub.angle_max_deg:.3f}°), magnitude masks {t_low:.2f} s (CPU); "
                f"for scale: ΔW sketch-128 {t_sketch:.2f} s")
        if dev == "cuda" or full:  # two exact SVDs: ~76 s on 2 CPU cores
            _, t_full = timed(lambda: (torch.linalg.svdvals(w0), torch.linalg.svdvals(w1)))
            line += f"; spectral_shift_full (two exact SVDs) {t_full:.1f} s"
        print(line)


def products() -> None:
    """The sketch's products on one thread, as a worker runs them: float32 GFLOP/s of torch's
    BLAS and numpy's for a 4096×14336 matrix and 136 directions, in the three layouts the
    sketch uses, and one whole `--rank sketch` spectrum of a bf16 pair's ΔW (from the stored
    bits) with each."""
    import torch
    from threadpoolctl import threadpool_limits

    from raydiff.kernel import science as sci
    from raydiff.kernel import spectrum as sk
    from raydiff.kernel.diff import delta_of_bits
    from raydiff.kernel.spectrum import spectrum

    rng = np.random.default_rng(3)
    m, n, k = 4096, 14336, 136
    a = rng.standard_normal((m, n), dtype=np.float32)
    forms = {"w·Ω": (a, rng.standard_normal((n, k), dtype=np.float32)),
             "qᵀ·w": (rng.standard_normal((m, k), dtype=np.float32).T, a),
             "wᵀ·q": (a.T, rng.standard_normal((m, k), dtype=np.float32))}
    base = ((rng.standard_normal(m * n, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    tuned = base.copy()
    tuned[rng.random(m * n, dtype=np.float32) < 0.25] += 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            rates = []
            for name, (x, y) in forms.items():
                tx, ty = torch.from_numpy(x), torch.from_numpy(y)
                t_torch = _best(lambda: tx @ ty, 3)
                t_np = _best(lambda: np.matmul(x, y), 3)
                rates.append(f"{name} {2 * m * n * k / t_torch / 1e9:.0f} / {2 * m * n * k / t_np / 1e9:.0f}")
            delta = torch.from_numpy(delta_of_bits(base, tuned, "BF16").reshape(m, n))
            t_now = _best(lambda: spectrum(delta, "sketch", sketch_rank=128), 2)
            numpy_matmul = sci.matmul
            sci.matmul = sk.matmul = lambda x, y: x @ y  # the same products in torch
            try:
                t_torch = _best(lambda: spectrum(delta, "sketch", sketch_rank=128), 2)
            finally:
                sci.matmul = sk.matmul = numpy_matmul
    finally:
        torch.set_num_threads(threads)
    print(f"sketch products, one thread, GFLOP/s torch / numpy: {', '.join(rates)}; a 4096×14336 sketch-128 "
          f"spectrum with products in torch {t_torch:.2f} s, in numpy {t_now:.2f} s")


def overlap() -> None:
    from raydiff.kernel.masks import encode_mask
    from raydiff.query.overlap import and_count

    rng = np.random.default_rng(1)
    n = 1 << 27
    a = encode_mask(rng.random(n, dtype=np.float32) < 0.2)
    b = encode_mask(rng.random(n, dtype=np.float32) < 0.2)
    dt = _best(lambda: and_count(*a, *b, n))
    rate = n / dt
    print(f"overlap of two 20 %-dense masks ({a[0]}, {len(a[1]) / (n / 8):.0%} of packed size): "
          f"{rate / 1e9:.2f}·10⁹ entries/s per core → 7·10⁹ entries in {7e9 / rate:.1f} s on one core, "
          f"{7e9 / rate / (os.cpu_count() or 1):.1f} s on {os.cpu_count()} cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-gb", type=float, default=0.5)
    ap.add_argument("--large-gb", type=float, default=4.0)
    ap.add_argument("--workdir", default="/tmp/raydiff-bench")
    ap.add_argument("--science-full", action="store_true",
                    help="science: also time spectral_shift_full's two exact SVDs on the CPU (~1 min per matrix)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="sections: machine kernel e2e fresh disk paper rank products science hash overlap gpu (default: all "
                         "but disk, which writes a pair bigger than RAM: about 1.4× its size of free disk)")
    ap.add_argument("--keep-big", action="store_true", help="disk: keep the big pair for the next run")
    ap.add_argument("--disk-sketch", action="store_true", help="disk: also time --rank sketch on the big pair")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["machine", "kernel", "e2e", "fresh", "paper", "rank", "products", "science", "hash",
                             "overlap", "gpu"])
    print(f"raydiff benchmarks on {os.cpu_count()} cores; input bytes = base + tuned")
    if "machine" in only:
        machine(work)
    if "kernel" in only:
        kernel()
    e2e = end_to_end(work, args.small_gb, args.large_gb) if "e2e" in only else {}
    fr = fresh_processes.fresh(work) if "fresh" in only else {}
    if "disk" in only:
        fresh_processes.disk(work, keep=args.keep_big, sketch=args.disk_sketch)
    if "paper" in only:
        base = paper_baseline(work, args.large_gb)
        if e2e:
            print(f"raydiff warm marginal / paper-style baseline: {e2e['warm'] / base:.1f}×")
        if fr:
            fresh_processes.versus_paper(work, args.large_gb)
    if "rank" in only:
        rank()
    if "products" in only:
        products()
    if "science" in only:
        science(args.science_full)
    if "hash" in only:
        hash_cost(work)
    if "overlap" in only:
        overlap()
    if "gpu" in only:
        gpu()


if __name__ == "__main__":
    main()
