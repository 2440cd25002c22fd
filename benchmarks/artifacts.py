"""Sparse patches: their size against the checkpoint's, and patch / apply throughput.

    .venv/bin/python benchmarks/artifacts.py [--gb 1] [--workdir /tmp/raydiff-bench-artifacts] [--workers N]

For bf16 pairs (2048×8192 matrices, ``--gb`` of base + tuned) with 1 %, 25 % and 75 % of the
entries changed, prints: the patch's size as a share of the tuned checkpoint's, the time of
``raydiff patch`` (throughput over base + tuned bytes) and of ``raydiff apply`` (throughput
over the rebuilt checkpoint's bytes; each tensor's SHA-256 checked, as always). Ray and the
actor pool start before the timed calls (a warm-up pair), so the figures are the work's, not
the start-up's; the files are in the page cache (just written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import make_pair  # noqa: E402

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="base + tuned bytes of each pair, in GB")
    ap.add_argument("--workdir", default="/tmp/raydiff-bench-artifacts")
    ap.add_argument("--workers", type=int, default=None, help="actors (default: one per CPU)")
    args = ap.parse_args()

    from raydiff.options import ClusterOptions
    from raydiff.run import actors
    from raydiff.run.patch import apply_patch, make_patch

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cluster = ClusterOptions(workers=args.workers, keep_actors=True)
    # warm-up: Ray and the actors start here, on a tiny pair
    b, t = make_pair(work / "warm", int(0.3 * GB) // 10, density=0.1, hidden=512)
    make_patch(str(b), str(t), str(work / "warm" / "patch"), cluster=cluster)
    apply_patch(str(b), str(work / "warm" / "patch"), str(work / "warm" / "new"), cluster=cluster)

    rows = []
    for density in (0.01, 0.25, 0.75):
        root = work / f"d{density:g}"
        b, t = make_pair(root, int(args.gb * GB), density=density, shard_bytes=256 << 20)
        t0 = time.perf_counter()
        p = make_patch(str(b), str(t), str(root / "patch"), cluster=cluster, shard_bytes=128 << 20)
        tp = time.perf_counter() - t0
        t0 = time.perf_counter()
        a = apply_patch(str(b), str(root / "patch"), str(root / "new"), cluster=cluster)
        ta = time.perf_counter() - t0
        rows.append((density, p.tuned_bytes, p.patch_bytes, tp, 2 * p.tuned_bytes / tp, ta, a.nbytes / ta))
        shutil.rmtree(root)
    actors.release_actors()
    shutil.rmtree(work, ignore_errors=True)

    print(f"bf16 pairs, {args.gb:g} GB base + tuned each, {cluster.workers or 'one actor per CPU'} actors\n")
    print("| changed | patch size (of the checkpoint) | patch: time, GB/s in | apply: time, GB/s out |")
    print("| --- | --- | --- | --- |")
    for density, tuned, size, tp, rp, ta, ra in rows:
        print(f"| {density:.0%} | {size / 1e6:,.1f} MB of {tuned / 1e6:,.0f} MB ({size / tuned:.1%}) | "
              f"{tp:.2f} s, {rp / GB:.2f} | {ta:.2f} s, {ra / GB:.2f} |")


if __name__ == "__main__":
    main()
