"""The store's layout: plain Parquet a reader without raydiff can query, and a store of the
earlier layout (1: per-unit files, no catalog) converted by ``raydiff store upgrade`` into the
same results, its incomplete run still resumable."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from builders import interrupted_run, perturb, ref_diff, write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import StoreError
from raydiff.kernel.masks import decode_mask
from raydiff.options import DiffOptions, SubmitOptions
from raydiff.records import WatchEventRecord
from raydiff.run.submit import submit
from raydiff.store import Store
from raydiff.query.views import query

pytestmark = pytest.mark.usefixtures("ray_cluster")

ROOT = Path(__file__).resolve().parent.parent
_V1_LADDER = ("changed_1e8", "changed_1e7", "changed_1e6", "changed_1e5", "changed_1e4")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 48, generator=g).bfloat16(),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(48, 48, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(48, generator=g)}
    tuned = [{k: perturb(v, density, 1e-2, 10 * i + j) for j, (k, v) in enumerate(base.items())}
             for i, density in enumerate((0.1, 0.3, 0.05))]
    b = write_checkpoint(root / "base", base, shards=2)
    ts = [write_checkpoint(root / f"t{i}", t, shards=2) for i, t in enumerate(tuned)]
    return root, b, ts, base, tuned


def _snapshot(store: str) -> dict:
    """Everything the views say about a store's runs, masks decoded."""
    _, runs = query(store, "SELECT run_id, name, status, numel, changed, changed_bits, n_spectra, ladder FROM runs "
                           "ORDER BY run_id")
    _, tensors = query(store, "SELECT * FROM tensors ORDER BY run_id, tensor")
    _, masks = query(store, "SELECT run_id, tensor, \"start\", \"stop\", mask_codec, mask FROM masks "
                            "ORDER BY run_id, tensor, \"start\"")
    _, spectra = query(store, "SELECT run_id, tensor, rank, top_sv FROM spectra ORDER BY run_id, tensor")
    _, overlap = query(store, "SELECT * FROM overlap('a', 'b')")
    _, events = query(store, "SELECT event_id, action, outcome FROM watch_events ORDER BY event_id")
    return dict(runs=runs, tensors=tensors, spectra=spectra, overlap=overlap, events=events,
                masks=[(r, t, s, e, decode_mask(c, m, e - s).tobytes()) for r, t, s, e, c, m in masks])


def to_layout1(root: Path) -> None:
    """Rewrite a store the way raydiff 0.1 kept it (layout 1): no catalog, no layout file, each
    run's units and spectra one file each, the ladder as five columns, and each watch event a
    file named ``<time>-<event id>.parquet``."""

    def v1(t: pa.Table) -> pa.Table:
        if "changed_ladder" in t.column_names:
            lists = t.column("changed_ladder").to_pylist()
            for i, name in enumerate(_V1_LADDER):
                t = t.append_column(name, pa.array([None if v is None else v[i] for v in lists], pa.int64()))
            t = t.drop_columns(["changed_ladder"])
        added = ["ladder", "n_spectra_skipped"] + (["note"] if "fro" in t.column_names else [])  # fro: a spectrum
        return t.drop_columns([c for c in added if c in t.column_names])

    for d in (root / "runs").iterdir():
        for name in ("run.parquet", "plan.parquet", "tensors.parquet", "commit.parquet"):
            if (d / name).exists():
                pq.write_table(v1(pq.read_table(d / name)), d / name)
        for folded, folder, key, prefix in (("units.parquet", "units", "unit_id", "u"),
                                            ("spectra.parquet", "spectra", "tensor_index", "s")):
            if (d / folded).exists():
                table = v1(pq.read_table(d / folded))
                (d / folder).mkdir(exist_ok=True)
                for i in range(table.num_rows):
                    row = table.slice(i, 1)
                    pq.write_table(row, d / folder / f"{prefix}{row.column(key)[0].as_py():08d}.parquet")
                (d / folded).unlink()
            elif (d / folder).exists():
                for f in (d / folder).iterdir():
                    pq.write_table(v1(pq.read_table(f)), f)
    events = pa.concat_tables([pq.read_table(f) for f in (root / "watch" / "events").iterdir()])
    shutil.rmtree(root / "watch" / "events")
    (root / "watch" / "events").mkdir()
    for row in events.to_pylist():
        at = row["recorded_at"].astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        pq.write_table(pa.Table.from_pylist([row], schema=events.schema),
                       root / "watch" / "events" / f"{at}-{row['event_id']}.parquet")
    shutil.rmtree(root / "catalog")
    (root / "raydiff-store.json").unlink()


def test_a_layout_1_store_is_refused_then_upgraded_into_the_same_results(family, tmp_path):
    root, b, ts, base, tuned = family
    store = tmp_path / "store"
    opts = lambda name, rank="exact": SubmitOptions(store=str(store), name=name,  # noqa: E731
                                                    diff=DiffOptions(chunk_elems=1024, rank=rank))
    submit(str(b), str(ts[0]), opts("a"))
    submit(str(b), str(ts[1]), opts("b", "off"))
    run_c, n_c = interrupted_run(b, ts[2], opts("c", "off"))
    for i in range(3):
        Store(str(store)).write_watch_event(WatchEventRecord(
            event_id=uuid.uuid4().hex, tick_id="t", watch="w", recorded_at=dt.datetime.now(dt.timezone.utc),
            action="list", repo="org/x", refs=None, revision=None, base=None, base_revision=None, run_id=None,
            outcome="failed" if i else "recovered", attempt=1, error=None, retry_at=None, seconds=0.0))
    before = _snapshot(str(store))
    assert len(before["runs"]) == 3 and len(before["events"]) == 3 and before["spectra"]

    to_layout1(store)
    runner = CliRunner()
    r = runner.invoke(app, ["sql", "SELECT * FROM runs", "--store", str(store)])
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"Error: store {store} was written by an earlier raydiff (layout 1, no catalog); convert it once with "
        f"`raydiff store upgrade --store {store}`")
    with pytest.raises(StoreError, match="raydiff store upgrade"):
        submit(str(b), str(ts[1]), opts("b", "off"))

    r = runner.invoke(app, ["store", "upgrade", "--store", str(store)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"store {store}: upgraded: 2 complete runs, 1 incomplete, 3 watch events"
    after = _snapshot(str(store))
    assert after == before
    runs = store / "runs"
    assert not [p for p in runs.rglob("u*.parquet") if p.parent.name == "units" and run_c not in str(p)]
    r = runner.invoke(app, ["store", "upgrade", "--store", str(store)])
    assert r.stdout.strip() == f"store {store}: already of the current layout; nothing to do"

    # the incomplete run resumes from its units, and its results are torch's
    res = submit(str(b), str(ts[2]), opts("c", "off"))
    assert res.run_id == run_c and res.resumed and res.commit.n_units == n_c
    _, rows = query(str(store), "SELECT tensor, changed, changed_bits FROM tensors WHERE run_id = ?", [run_c])
    assert sorted(rows) == sorted((k, ref_diff(base[k], tuned[2][k])["changed"],
                                   ref_diff(base[k], tuned[2][k])["changed_bits"]) for k in base)


def _plain_queries() -> list[str]:
    """The README's queries for plain DuckDB, without raydiff."""
    readme = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    blocks = re.findall(r"```sql\n(-- plain DuckDB.*?)```", readme, re.S)
    return [q.strip().rstrip(";") for block in blocks for q in block.split(";\n") if q.strip()]


def test_the_store_is_plain_parquet(family, tmp_path):
    """Each of the README's plain-DuckDB queries runs on a store with a complete and an
    incomplete run, in a DuckDB that has never heard of raydiff, and gives the numbers torch
    gives."""
    root, b, ts, base, tuned = family
    store = tmp_path / "raydiff-store"
    submit(str(b), str(ts[0]), SubmitOptions(store=str(store), name="a", diff=DiffOptions(chunk_elems=1024)))
    interrupted_run(b, ts[1], SubmitOptions(store=str(store), name="b", diff=DiffOptions(chunk_elems=1024, rank="off")))
    queries = _plain_queries()
    assert len(queries) >= 3
    con = duckdb.connect()
    results = {}
    for q in queries:
        results[q.splitlines()[0]] = con.execute(q.replace("raydiff-store", str(store))).fetchall()
    changed = sum(ref_diff(base[k], tuned[0][k])["changed"] for k in base)
    numel = sum(v.numel() for v in base.values())
    got = dict((name, sp) for name, sp in results["-- plain DuckDB, no raydiff: complete runs and their sparsity"])
    assert got == {"a": pytest.approx(1 - changed / numel)}  # the incomplete run is not there
    listed = results["-- plain DuckDB: every run the catalog lists, complete or not"]
    assert sorted(name for _, name in listed) == ["a", "b"]
    per_tensor = dict(results["-- plain DuckDB: changed entries per tensor, from a complete run's units"])
    assert per_tensor == {k: ref_diff(base[k], tuned[0][k])["changed"] for k in base}
    masks = results["-- plain DuckDB: a unit's mask, to decode with raydiff.kernel.masks.decode_mask or numpy"]
    for tensor, start, stop, codec, mask in masks:
        ref = ref_diff(base[tensor], tuned[0][tensor])["mask"][start:stop]
        np.testing.assert_array_equal(decode_mask(codec, mask, stop - start), ref)
