"""The store at scale: what queries cost as the runs stored grow, and an overlap at 8 B size.

    .venv/bin/python benchmarks/store.py [--only scale overlap8b] [--workdir /tmp/raydiff-bench]

``scale``: the demo family's ``base → rl-seed1``, ``rl-seed2`` and ``dpo`` at
``--chunk-elems 1024`` (231 units a run), then the store grown to 10, 100 and 1,000
complete runs by cloning them under new ids. Per size, the best of 5 of: opening the store
(``connect``), and on a fresh connection each time ``SELECT … FROM runs``, one run's
``tensors`` and ``layers``, ``overlap_total`` and ``overlap`` of two runs, ``consensus``
of three; and the ratio of the 1,000-run time to the 10-run one.

``overlap8b``: two Llama-3.1-8B-shaped bf16 finetunes (25 % of entries changed) of one
base are written and submitted with ``--rank off`` (32 GB on disk at most, deleted after),
then ``overlap_total`` of the two runs is timed warm, beside its floor: reading both runs'
masks, decoding them and ANDing them, in plain pyarrow/numpy on the same threads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from builders import clone_run  # noqa: E402
from pairs import llama8b_shapes, write_llama_like  # noqa: E402


def _best(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _timed_query(store: str, sql: str, params: list) -> float:
    """Best time of a query, each on a fresh connection (its own mask reads, no memo)."""
    from raydiff.query.views import connect

    best = float("inf")
    for _ in range(5):
        con = connect(store)
        t0 = time.perf_counter()
        con.execute(sql, params).fetchall()
        best = min(best, time.perf_counter() - t0)
        con.close()
    return best


def scale(work: Path) -> None:
    from raydiff.demo import build_family
    from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
    from raydiff.query.views import connect
    from raydiff.run.submit import submit
    from raydiff.store import Store
    from raydiff.store.catalog import Catalog

    fam = build_family(work / "demo-family", log=print)
    store_root = work / "store-scale"
    shutil.rmtree(store_root, ignore_errors=True)
    opts = lambda name: SubmitOptions(store=str(store_root), name=name,  # noqa: E731
                                      diff=DiffOptions(chunk_elems=1024), cluster=ClusterOptions(keep_actors=True))
    seeds = [submit(str(fam.base), str(fam.members[m]), opts(m)).run_id for m in ("rl-seed1", "rl-seed2", "dpo")]
    store = Store(str(store_root))
    stored = 3
    queries = {
        "SELECT count(*) FROM runs": ("SELECT count(*) FROM runs", []),
        "one run's tensors": ("SELECT * FROM tensors WHERE run_id = run_ref(?)", ["rl-seed1"]),
        "one run's layers": ("SELECT * FROM layers WHERE run_id = run_ref(?)", ["rl-seed1"]),
        "overlap_total of two": ("SELECT * FROM overlap_total(?, ?)", ["rl-seed1", "rl-seed2"]),
        "overlap of two": ("SELECT * FROM overlap(?, ?)", ["rl-seed1", "rl-seed2"]),
        "consensus of three": ("SELECT * FROM consensus(?::VARCHAR[])", [["rl-seed1", "rl-seed2", "dpo"]]),
    }
    table: dict[int, dict[str, float]] = {}
    for size in (10, 100, 1000):
        t0 = time.perf_counter()
        while stored < size:
            clone_run(store, seeds[stored % 3], f"{stored:020x}", name=f"clone-{stored}")
            stored += 1
        Catalog(store).runs.fold()
        files = sum(len(fs) for _, _, fs in os.walk(store_root))
        print(f"store of {size} runs ({files} files) grown in {time.perf_counter() - t0:.1f} s")
        row = {"opening the store": _best(lambda: connect(str(store_root)).close())}
        for label, (sql, params) in queries.items():
            row[label] = _timed_query(str(store_root), sql, params)
        table[size] = row
        print("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items()))
    print("\n| query | 10 runs | 100 runs | 1,000 runs | 1,000 / 10 |\n| --- | --- | --- | --- | --- |")
    for label in table[10]:
        print(f"| {label} | " + " | ".join(f"{table[s][label] * 1e3:.0f} ms" for s in (10, 100, 1000))
              + f" | {table[1000][label] / table[10][label]:.2f}× |")


def _floor(store, a: str, b: str) -> float:
    """Reading both runs' masks, decoding them and counting the bits set in both: the whole
    mask columns read at once by pyarrow, then the same decode and fused AND-count raydiff
    uses, on every core — no Parquet row groups, no DuckDB, no pairing of units."""
    import pyarrow.parquet as pq

    from raydiff.kernel._gaps import and_count
    from raydiff.kernel.masks import decode_packed
    from raydiff.store import layout

    def work() -> int:
        ta, tb = (pq.read_table(store.path(layout.units_file(r)), columns=["start", "stop", "mask_codec", "mask"])
                  for r in (a, b))
        n = (ta.column("stop").to_numpy() - ta.column("start").to_numpy()).tolist()
        ca, cb = ta.column("mask_codec").to_pylist(), tb.column("mask_codec").to_pylist()
        ma, mb = ta.column("mask"), tb.column("mask")

        def one(i: int) -> int:
            x = decode_packed(ca[i], ma[i].as_buffer() or b"", n[i])
            y = decode_packed(cb[i], mb[i].as_buffer() or b"", n[i])
            return int(and_count(x, y))

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            return sum(pool.map(one, range(len(n))))

    return _best(work, 3)


def overlap8b(work: Path) -> None:
    from raydiff.options import DiffOptions, SubmitOptions
    from raydiff.query.views import connect
    from raydiff.run.submit import submit
    from raydiff.store import Store

    root = work / "llama8b"
    store_root = work / "store-8b"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(store_root, ignore_errors=True)
    shapes = llama8b_shapes()
    try:
        t0 = time.perf_counter()
        base = write_llama_like(root / "base", shapes, None)
        print(f"8B-shaped base written in {time.perf_counter() - t0:.0f} s")
        ids = []
        for k in (1, 2):
            tuned = write_llama_like(root / f"tuned{k}", shapes, 0.25, tuned_seed=k)
            t0 = time.perf_counter()
            res = submit(str(base), str(tuned), SubmitOptions(store=str(store_root), name=f"ft{k}",
                                                                diff=DiffOptions(rank="off")))
            print(f"ft{k}: submitted in {time.perf_counter() - t0:.0f} s, {res.commit.changed / res.commit.numel:.1%} "
                  f"changed, {res.commit.n_units} units")
            ids.append(res.run_id)
            shutil.rmtree(tuned)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    store = Store(str(store_root))
    size = sum(os.path.getsize(store.path(f"runs/{r}/units.parquet")) for r in ids)
    con = connect(str(store_root))
    con.execute("SELECT * FROM overlap_total(?, ?)", ids).fetchall()  # warm the page cache
    con.close()
    t = _timed_query(str(store_root), "SELECT * FROM overlap_total(?, ?)", ids)
    floor = _floor(store, *ids)
    (row,) = connect(str(store_root)).execute("SELECT changed_a, changed_b, changed_both FROM overlap_total(?, ?)",
                                              ids).fetchall()
    print(f"overlap_total of two 8B-shaped runs ({size / 1e9:.2f} GB of masks): {t:.2f} s warm; floor (read + "
          f"decode + AND, {os.cpu_count()} threads) {floor:.2f} s; changed {row[0]:,} / {row[1]:,}, both {row[2]:,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/raydiff-bench")
    ap.add_argument("--only", nargs="*", default=None, help="sections: scale overlap8b (default: both)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["scale", "overlap8b"])
    if "scale" in only:
        scale(work)
    if "overlap8b" in only:
        overlap8b(work)


if __name__ == "__main__":
    main()
