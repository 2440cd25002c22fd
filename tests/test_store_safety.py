"""Nothing lost, nothing half-written: the store under SIGKILL, concurrent writers and hostile SQL.

- A real ``raydiff submit`` process (its own local Ray cluster) is SIGKILLed — its whole
  process group, Ray's daemons and workers included — at five points: while Ray starts, after
  the first unit, after a third and two thirds of the units, and after every unit but before
  the commit. The store then holds an incomplete run whose files are all whole, no view shows
  a partial result, and a resubmission completes with results identical to a run that was
  never interrupted.
- Two submissions write one store at the same time (same run, different runs; threads on
  one cluster, and two OS processes each with its own cluster): both end complete, every
  Parquet file reads, no temporary is left and the results equal the reference.
- ``raydiff sql`` cannot write, delete or read a file, whatever the statement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from builders import perturb, ref_diff, write_checkpoint
from raydiff.cli.main import app
from raydiff.errors import QueryError, StoreError
from raydiff.kernel.masks import decode_mask
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions
from raydiff.records import RunRecord, UnitRecord, from_table
from raydiff.store import Store
from raydiff.run.submit import SubmitResult, submit
from raydiff.query.views import connect, query

pytestmark = pytest.mark.usefixtures("ray_cluster")

#: Every finished file a run may leave in a store.
_STORE_FILE = re.compile(r"^(runs/[0-9a-f]{20}/((run|plan|tensors|commit|units|spectra)\.parquet"
                         r"|units/u\d{8}\.parquet|spectra/s\d{8}\.parquet)"
                         r"|catalog/(runs|commits)/[es]-\d{8}T\d{12}Z-[0-9a-f]{32}\.parquet|raydiff-store\.json)$")
#: What ``Store.write`` names a file before renaming it into place.
_TEMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{32}$")
#: The run's units.parquet folded while the run goes on, in the folder the commit removes.
_FOLDING = re.compile(r"^runs/[0-9a-f]{20}/units/units\.parquet$")
_UNIT_NAME = re.compile(r"^u(\d{8})\.parquet$")
#: Marks the environment of every process a killed `raydiff submit` starts, Ray's included.
_TAG = "RAYDIFF_STORE_SAFETY_TAG"
_KILL_DIFF = DiffOptions(chunk_elems=1024, rank="off")  # what the CLI below is asked for


# ------------------------------------------------------------------------------ builders


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two 200×800 bf16 matrices and a 1-D fp32 tensor: 405 units at 1024 elements."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(7)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(200, 800, generator=g).bfloat16() for i in range(2)}
    base["model.norm.weight"] = torch.randn(5000, generator=g)
    tuned = {k: perturb(v, 0.1, 1e-2, i) for i, (k, v) in enumerate(base.items())}
    return write_checkpoint(root / "base", base, shards=2), write_checkpoint(root / "tuned", tuned, shards=2)


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A base and two different finetunes of it (about 100 units each, with spectra)."""
    root = tmp_path_factory.mktemp("small")
    g = torch.Generator().manual_seed(11)
    base = {f"model.layers.{i}.self_attn.o_proj.weight": torch.randn(96, 256, generator=g).bfloat16()
            for i in range(4)}
    base["model.norm.weight"] = torch.randn(3000, generator=g)
    t1 = {k: perturb(v, 0.2, 1e-2, i) for i, (k, v) in enumerate(base.items())}
    t2 = {k: perturb(v, 0.05, 1e-1, 100 + i) for i, (k, v) in enumerate(base.items())}
    return (write_checkpoint(root / "base", base, shards=2), write_checkpoint(root / "tuned1", t1, shards=3),
            write_checkpoint(root / "tuned2", t2))


def _results(store: str | Path, run_id: str) -> tuple[list, list]:
    """A complete run's tensors rows (less run_id) and every unit's decoded mask."""
    _, rows = query(str(store), f"SELECT * EXCLUDE (run_id) FROM tensors WHERE run_id = '{run_id}' ORDER BY tensor")
    _, masks = query(str(store), f"SELECT tensor, \"start\", \"stop\", mask_codec, mask FROM masks "
                                 f"WHERE run_id = '{run_id}' ORDER BY tensor, \"start\"")
    return rows, [(t, s, e, decode_mask(c, m, e - s).tobytes()) for t, s, e, c, m in masks]


@dataclasses.dataclass(frozen=True)
class _Reference:
    """An uninterrupted run, alone in its store."""

    result: SubmitResult
    store: Path
    results: tuple[list, list]


def _reference(store: Path, base: Path, tuned: Path, diff: DiffOptions) -> _Reference:
    res = submit(str(base), str(tuned), SubmitOptions(store=str(store), diff=diff))
    results = _results(store, res.run_id)
    # the comparisons below mean something only if there are changes to get wrong
    assert res.commit.changed > 0 and len(results[1]) == res.run.n_units
    # and the reference itself is right: its counts and masks against torch on the files
    from safetensors.torch import load_file

    b = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    t = {k: v for f in sorted(tuned.glob("*.safetensors")) for k, v in load_file(f).items()}
    _, rows = query(str(store), "SELECT tensor, changed, changed_bits FROM tensors WHERE run_id = ?", [res.run_id])
    assert sorted(rows) == sorted((k, ref_diff(b[k], t[k])["changed"], ref_diff(b[k], t[k])["changed_bits"]) for k in b)
    for name in b:
        mask = b"".join(m for tensor, _, _, m in results[1] if tensor == name)
        assert mask == ref_diff(b[name], t[name])["mask"].tobytes(), name
    return _Reference(res, store, results)


@pytest.fixture(scope="module")
def big_reference(big_pair, tmp_path_factory) -> _Reference:
    return _reference(tmp_path_factory.mktemp("big-ref") / "store", *big_pair, _KILL_DIFF)


def _files(store: Path) -> dict[str, str]:
    """Every file under a store: relative path → sha256 of its bytes."""
    return {p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def _check_files_whole(store: Path, run_ids: set[str]) -> list[str]:
    """Assert every finished file is a whole Parquet file of a known run; return the temporaries."""
    temps = []
    for rel in _files(store):
        if _TEMP_SUFFIX.search(rel):
            final = _TEMP_SUFFIX.sub("", rel)
            assert _STORE_FILE.match(final) or _FOLDING.match(final), f"temporary of no known file: {rel}"
            temps.append(rel)
            continue
        assert _STORE_FILE.match(rel), f"unexpected file in the store: {rel}"
        if rel.endswith(".json"):
            continue
        table = pq.ParquetFile(store / rel).read()  # raises on a torn or truncated file
        assert table.num_rows >= 1, rel
        assert set(table.column("run_id").to_pylist()) <= run_ids, rel
        name = rel.rsplit("/", 1)[-1]
        if m := _UNIT_NAME.match(name):
            assert table.column("unit_id").to_pylist() == [int(m.group(1))], rel
    return temps


def _unit_file_of(ref: _Reference, unit_id: int) -> bytes:
    """What the unit's own file held, made from the reference run's folded units.parquet:
    the same record (timings and pids aside), written as an actor writes one unit."""
    table = pq.read_table(ref.store / "runs" / ref.result.run_id / "units.parquet",
                          filters=[("unit_id", "=", unit_id)])
    assert table.num_rows == 1
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none", use_dictionary=False)
    return buf.getvalue()


def _unit_ids(store: Path, run_id: str) -> list[int]:
    d = store / "runs" / run_id / "units"
    return sorted(int(m.group(1)) for n in (os.listdir(d) if d.exists() else []) if (m := _UNIT_NAME.match(n)))


# ------------------------------------------------------------------- 1. SIGKILL at any point


def _tagged(tag: str) -> dict[int, str]:
    """pid → command of every live process carrying ``tag`` in its environment."""
    out = {}
    needle = f"{_TAG}={tag}".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                out[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return out


@dataclasses.dataclass
class _Victim:
    """One `raydiff submit` process, SIGKILLed once ``when(victim, units done, run dir)`` holds.

    ``expect`` says how many units may be in the store at that moment for the kill to count
    as the one named by ``point``.
    """

    point: str
    when: Callable[[_Victim, int, Path], bool]
    expect: Callable[[int], bool]
    store: Path
    complete_units: bool = False  # see the last victim of the test
    tag: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    ray_tmp: str = ""
    proc: subprocess.Popen | None = None
    log: Path | None = None
    killed: threading.Event = dataclasses.field(default_factory=threading.Event)
    failure: str | None = None
    units_at_kill: int = -1
    temporaries: int = -1  # left by the kill
    strays: dict[int, str] = dataclasses.field(default_factory=dict)


def _start(v: _Victim, base: Path, tuned: Path) -> None:
    # A private, short Ray temp dir: Ray's socket paths must fit in 107 bytes, and the
    # subprocess must neither find nor overwrite another cluster's address file.
    v.ray_tmp = tempfile.mkdtemp(prefix="rdk-", dir="/tmp")
    env = {k: v_ for k, v_ in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_TMPDIR": v.ray_tmp, _TAG: v.tag, "RAY_USAGE_STATS_ENABLED": "0"})
    v.log = v.store.parent / f"{v.store.name}.stderr"
    # At the lowest CPU priority (Ray's processes inherit it): the poller must see each kill
    # point within the second a victim takes from a third of its units to the last, on two
    # cores shared by five victims' Ray starts and the in-process resumption.
    nice = [exe, "-n", "19"] if (exe := shutil.which("nice")) else []
    with open(v.log, "wb") as err:
        v.proc = subprocess.Popen(
            [*nice, sys.executable, "-m", "raydiff.cli.main", "submit", str(base), str(tuned), "--store", str(v.store),
             "--chunk-elems", "1024", "--rank", "off", "--workers", "1", "--backend", "ray"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, cwd=v.store.parent)


def _poll(victims: list[_Victim], run_id: str, stop: threading.Event) -> None:
    """SIGKILL each victim's process group the moment its point is reached (runs in a thread)."""
    live = list(victims)
    deadline = time.time() + 150
    try:
        while live and not stop.is_set():
            for v in list(live):
                assert v.proc is not None
                k = len(_unit_ids(v.store, run_id))
                if v.when(v, k, v.store / "runs" / run_id):
                    v.units_at_kill = k
                    os.killpg(v.proc.pid, signal.SIGKILL)
                elif v.proc.poll() is not None:
                    v.failure = (f"`raydiff submit` ended (exit {v.proc.returncode}) before the kill point "
                                 f"{v.point!r}: {v.log.read_text(errors='replace')[-2000:]}")
                elif time.time() > deadline:
                    v.failure = f"kill point {v.point!r} not reached in 150 s"
                else:
                    continue
                live.remove(v)
                v.killed.set()
            time.sleep(0.003)
    except BaseException as e:  # never leave the test waiting on a dead poller
        for v in live:
            v.failure = f"poller failed: {e!r}"
            v.killed.set()
        raise


def _reap(v: _Victim) -> None:
    """End the process group, let Ray's fate-sharing end the rest; end stragglers of ours only."""
    assert v.proc is not None
    if v.proc.poll() is None:
        os.killpg(v.proc.pid, signal.SIGKILL)
    v.proc.wait()
    v.strays = _end_stragglers(v.tag)
    shutil.rmtree(v.ray_tmp, ignore_errors=True)


def _end_stragglers(tag: str) -> dict[int, str]:
    """Give Ray's own cleanup 10 s, then SIGKILL what is left of the processes carrying ``tag``."""
    deadline = time.time() + 10
    while (left := _tagged(tag)) and time.time() < deadline:
        time.sleep(0.1)
    for pid in left:  # only processes carrying this tag: never a machine-wide `ray stop`
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    while _tagged(tag) and time.time() < deadline:
        time.sleep(0.05)
    return left


def _ray_starting(v: _Victim) -> bool:
    return any("gcs_server" in cmd for cmd in _tagged(v.tag).values())


def _interrupted_then_resumed(v: _Victim, ref: _Reference, base: Path, tuned: Path) -> None:
    run_id, n = ref.result.run_id, ref.result.run.n_units
    store, d = v.store, v.store / "runs" / run_id
    assert not _tagged(v.tag), f"{v.point}: processes of the killed run still alive"
    assert v.expect(v.units_at_kill), (v.point, v.units_at_kill)
    if v.complete_units:  # the reference's unit files for the units the kill cut short
        for i in sorted(set(range(n)) - set(_unit_ids(store, run_id))):
            rel = f"units/u{i:08d}.parquet"
            tmp = d / f"{rel}.tmp-{uuid.uuid4().hex}"
            tmp.write_bytes(_unit_file_of(ref, i))
            os.replace(tmp, d / rel)
        assert len(_unit_ids(store, run_id)) == n
    # Interrupted: incomplete, no commit record, no results in any view.
    assert not (d / "commit.parquet").exists(), v.point
    _, rows = query(str(store), "SELECT run_id, status FROM runs")
    assert rows == [(run_id, "incomplete")], v.point
    _, rows = query(str(store), "SELECT count(*) FROM tensors")
    assert rows == [(0,)], v.point
    # Every file is whole; the units view shows exactly the unit files, no temporaries.
    before = _files(store)
    v.temporaries = len(_check_files_whole(store, {run_id}))
    done = _unit_ids(store, run_id)
    assert len(done) >= v.units_at_kill, v.point

    # What a kill between a temporary's write and its rename leaves: a whole file under its
    # temporary name, or a torn one. Planted (that window is microseconds wide): no view, and
    # not the resumption, may take them for results.
    todo = sorted(set(range(n)) - set(done))
    whole = ["commit.parquet", "tensors.parquet"] + ([f"units/u{todo[0]:08d}.parquet"] if todo else [])
    torn = [f"units/u{todo[-1]:08d}.parquet"] if len(todo) > 1 else []
    planted = set()
    for rel in whole + torn:
        data = (_unit_file_of(ref, int(rel[7:15])) if rel.startswith("units/")
                else (ref.store / "runs" / run_id / rel).read_bytes())
        tmp = d / f"{rel}.tmp-{uuid.uuid4().hex}"
        tmp.parent.mkdir(exist_ok=True)
        tmp.write_bytes(data if rel in whole else data[: len(data) // 2])
        planted.add(tmp.relative_to(store).as_posix())
    _, rows = query(str(store), "SELECT status, (SELECT count(*) FROM tensors), (SELECT count(*) FROM units), "
                                "(SELECT units_done FROM progress) FROM runs")
    assert rows == [("incomplete", 0, 0, len(done))], v.point
    # Nothing of the killed process is still writing: the store holds what it held after the kill.
    assert {k: h for k, h in _files(store).items() if k not in planted} == before, v.point

    res = submit(str(base), str(tuned), SubmitOptions(store=str(store), diff=_KILL_DIFF))
    assert res.run_id == run_id and not res.already_complete, v.point
    # `resumed` says units were already there: true for every kill after the first unit
    assert res.resumed is (len(done) > 0), v.point
    assert (res.commit.numel, res.commit.changed, res.commit.changed_bits, res.commit.n_units) == (
        ref.result.commit.numel, ref.result.commit.changed, ref.result.commit.changed_bits, n), v.point
    _, rows = query(str(store), "SELECT run_id, status, (SELECT count(*) FROM units), "
                                "(SELECT count(DISTINCT unit_id) FROM units) FROM runs")
    assert rows == [(run_id, "complete", n, n)], v.point
    assert _results(store, run_id) == ref.results, v.point
    # folded into the run's own file; the per-unit files are gone, the planted temporaries too
    assert _unit_ids(store, run_id) == [] and (d / "units.parquet").exists(), v.point
    assert pq.ParquetFile(d / "units.parquet").metadata.num_rows == n, v.point


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the killed run's processes through /proc")
def test_sigkill_at_any_point_loses_nothing_and_resumes(big_pair, big_reference, tmp_path):
    base, tuned = big_pair
    n = big_reference.result.run.n_units
    victims = [
        _Victim("Ray starting, no unit yet", lambda v, k, d: k == 0 and (d / "run.parquet").exists()
                and _ray_starting(v), lambda k: k == 0, tmp_path / "s0"),
        _Victim("first unit", lambda v, k, d: k >= 1, lambda k: 0 < k < n // 3, tmp_path / "s1"),
        _Victim("a third of the units", lambda v, k, d: k >= n // 3, lambda k: 0 < k < n, tmp_path / "s2"),
        _Victim("two thirds of the units", lambda v, k, d: k >= 2 * n // 3, lambda k: 0 < k < n, tmp_path / "s3"),
        # Every unit written and no commit: the driver commits within milliseconds of the last
        # unit (it aggregates the records its actors return), too short a gap to hit with a
        # signal every time. So this victim dies shortly before it, with units in flight, and
        # the reference's unit files for the rest (the same bytes but for timings and pids)
        # make the store exactly what a kill in that gap leaves.
        _Victim("every unit, before the commit", lambda v, k, d: k >= n - 100, lambda k: n - 100 <= k <= n,
                tmp_path / "s4", complete_units=True),
    ]
    # The five run side by side (a Ray start costs seconds) and a thread kills each at its point.
    # The first dies while the others start Ray, so it is checked and resumed meanwhile; the
    # others die within seconds of each other, and the poller gets the interpreter to itself then.
    for v in victims:
        _start(v, base, tuned)
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(victims, big_reference.result.run_id, stop), daemon=True)
    poller.start()
    try:
        for i, v in enumerate(victims):
            for w in victims if i else [v]:
                assert w.killed.wait(200), f"poller never got to {w.point!r}"
            _reap(v)
            assert v.failure is None, v.failure
            _interrupted_then_resumed(v, big_reference, base, tuned)
    finally:
        stop.set()
        poller.join(10)
        for v in victims:
            if v.proc is not None and v.proc.returncode is None:  # not reaped yet
                _reap(v)
    for v in victims:
        print(f"\nkilled at {v.point!r}: {v.units_at_kill}/{n} units, {v.temporaries} temporaries left; "
              f"processes that outlived the process-group kill (then killed here): {list(v.strays.values())}")


class _Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


#: Each step of a commit that makes something visible, in order: the driver dies just
#: before it. (Polling cannot hit these gaps, milliseconds wide; the kill test above covers
#: everything before the commit.)
_COMMIT_STEPS = [("write", "units.parquet"), ("write", "tensors.parquet"), ("write", "commit.parquet"),
                 ("write", "catalog/commits/"), ("delete", "/units")]


@pytest.mark.parametrize("step", _COMMIT_STEPS, ids=[s[1].strip("/") for s in _COMMIT_STEPS])
def test_a_driver_dying_at_any_step_of_the_commit_leaves_one_whole_run(big_pair, big_reference, tmp_path,
                                                                       monkeypatch, step):
    """Killed at each step of folding and committing: the run is either incomplete — no view
    shows a result, its units counted once, from their own files — and the next submission
    completes it, or complete and whole, never counted twice, and the next submission only
    clears what the kill left (once commit.parquet exists, the next submission finishes the
    commit instead of redoing it). The failure is injected where the store's files are written."""
    from raydiff.store.files import Files

    base, tuned = big_pair
    ref = big_reference
    n = ref.result.run.n_units
    store = tmp_path / "store"
    action, target = step
    real = {"write": (Files.write_table, Files.writer), "delete": Files.delete_dir}

    def dying_write_table(self, rel, *args, **kwargs):
        if target in rel:
            raise _Crash(rel)
        return real["write"][0](self, rel, *args, **kwargs)

    @contextlib.contextmanager
    def dying_writer(self, rel, kind, **kwargs):
        with real["write"][1](self, rel, kind, **kwargs) as w:
            yield w
            if target in rel:  # written whole, not yet moved into place
                raise _Crash(rel)

    def dying_delete_dir(self, rel):
        if target in rel:
            raise _Crash(rel)
        return real["delete"](self, rel)

    if action == "write":
        monkeypatch.setattr(Files, "write_table", dying_write_table)
        monkeypatch.setattr(Files, "writer", dying_writer)
    else:
        monkeypatch.setattr(Files, "delete_dir", dying_delete_dir)
    with pytest.raises(_Crash):
        submit(str(base), str(tuned), SubmitOptions(store=str(store), diff=_KILL_DIFF))
    monkeypatch.undo()
    d = store / "runs" / ref.result.run_id
    complete = action == "delete"  # only the cleanup comes after the catalog's commit entry
    _, rows = query(str(store), "SELECT status, (SELECT count(*) FROM tensors), (SELECT count(*) FROM units), "
                                "(SELECT count(DISTINCT unit_id) FROM units), (SELECT units_done FROM progress) "
                                "FROM runs")
    expect = ("complete", len(ref.results[0]), n, n, None) if complete else ("incomplete", 0, 0, 0, n)
    assert rows == [expect], step
    if complete:
        assert _results(store, ref.result.run_id) == ref.results
    assert _check_files_whole(store, {ref.result.run_id}) == []  # nothing torn, no temporary
    assert len(_unit_ids(store, ref.result.run_id)) == n  # the per-unit files outlive any crash
    res = submit(str(base), str(tuned), SubmitOptions(store=str(store), diff=_KILL_DIFF))
    # after commit.parquet the next submission only finishes the commit: catalog, cleanup
    committed = _COMMIT_STEPS.index(step) >= _COMMIT_STEPS.index(("write", "catalog/commits/"))
    assert (res.already_complete, res.resumed) == (committed, not committed), step
    assert _results(store, res.run_id) == ref.results
    assert _unit_ids(store, ref.result.run_id) == [] and (d / "units.parquet").exists()


# ------------------------------------------------------------- 2. two writers, one store


def _together(*calls: Callable[[], SubmitResult], timeout: float = 120) -> list[SubmitResult]:
    """Run the calls in threads released at the same instant; re-raise the first error."""
    barrier = threading.Barrier(len(calls))
    out: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except BaseException as e:  # surfaced below
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "concurrent submissions hang"
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out  # type: ignore[return-value]


@pytest.fixture(scope="module")
def small_references(small_pairs, tmp_path_factory) -> tuple[_Reference, _Reference]:
    base, t1, t2 = small_pairs
    root = tmp_path_factory.mktemp("small-ref")
    diff = DiffOptions(chunk_elems=1024)
    return _reference(root / "s1", base, t1, diff), _reference(root / "s2", base, t2, diff)


def _check_complete(store: Path, refs: list[_Reference]) -> None:
    ids = {r.result.run_id for r in refs}
    _, rows = query(str(store), "SELECT run_id, status FROM runs ORDER BY run_id")
    assert rows == [(i, "complete") for i in sorted(ids)]
    for r in refs:
        assert _results(store, r.result.run_id) == r.results
        n = r.result.run.n_units
        _, rows = query(str(store), f"SELECT count(*), count(DISTINCT unit_id) FROM units "
                                    f"WHERE run_id = '{r.result.run_id}'")
        assert rows == [(n, n)]
    assert _check_files_whole(store, ids) == []  # no temporary left behind


def _same(res: SubmitResult, ref: _Reference) -> bool:
    a, b = res.commit, ref.result.commit
    return (res.run_id, a.numel, a.changed, a.changed_bits, a.n_units, a.n_spectra) == (
        ref.result.run_id, b.numel, b.changed, b.changed_bits, b.n_units, b.n_spectra)


# A pool size other than the last round's makes both submissions build the driver's actor
# pool at the same moment; the same size has them share the pool that is there.
@pytest.mark.parametrize("workers", [1, 2, 2, 1, 1])
def test_concurrent_submits_of_one_run(small_pairs, small_references, tmp_path, workers):
    base, t1, _ = small_pairs
    ref = small_references[0]
    store = tmp_path / "store"
    opts = SubmitOptions(store=str(store), diff=DiffOptions(chunk_elems=1024), cluster=ClusterOptions(workers=workers))
    results = _together(lambda: submit(str(base), str(t1), opts), lambda: submit(str(base), str(t1), opts))
    assert all(_same(r, ref) for r in results)
    _check_complete(store, [ref])
    # One run record is kept, and it is one of the two the submissions report. (Both may have
    # written it: when they start within the same few milliseconds, the other one reports a
    # created_at the store does not keep.)
    (stored,) = from_table(Store(str(store)).catalog().runs, RunRecord)
    assert stored in [r.run for r in results]
    assert all(dataclasses.replace(r.run, created_at=stored.created_at) == stored for r in results)


@pytest.mark.parametrize("workers", [(1, 2), (2, 2), (None, None), (2, 2), (2, 2)])
def test_concurrent_submits_of_two_runs(small_pairs, small_references, tmp_path, workers):
    base, t1, t2 = small_pairs
    store = str(tmp_path / "store")
    a, b = (SubmitOptions(store=store, diff=DiffOptions(chunk_elems=1024), cluster=ClusterOptions(workers=w))
            for w in workers)
    r1, r2 = _together(lambda: submit(str(base), str(t1), a), lambda: submit(str(base), str(t2), b))
    assert _same(r1, small_references[0]) and _same(r2, small_references[1])
    _check_complete(tmp_path / "store", list(small_references))


def test_a_folder_created_while_it_is_listed_lists(tmp_path):
    # Two first submits into a new store: one lists runs/ as the other creates it. pyarrow's
    # local listing then fails with "not found" for a folder that exists (CI saw it, once in
    # ~20 full runs). Here a thread makes and removes the folder as fast as it can, so that
    # ~4 % of bare listings hit the window; each listing must still answer.
    from raydiff.store.files import Files

    files, runs = Files(str(tmp_path)), tmp_path / "runs"
    (runs / "r1").mkdir(parents=True)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                shutil.rmtree(runs)
            with contextlib.suppress(OSError):
                (runs / "r1").mkdir(parents=True)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        seen = Counter(tuple(files.list_subdirs("runs")) for _ in range(5000))
    finally:
        stop.set()
        thread.join()
    assert set(seen) <= {(), ("r1",)} and len(seen) == 2, seen
    shutil.rmtree(runs, ignore_errors=True)
    runs.write_text("a file where the folder belongs")  # any other failure: a StoreError naming the folder
    with pytest.raises(StoreError, match="cannot list runs .*Not a directory"):
        files.list_subdirs("runs")


def test_a_listing_taken_as_a_fold_deletes_names_its_snapshot_or_every_entry(tmp_path):
    # A record log's fold writes a snapshot, then deletes the entries it folded. A reader
    # listing the folder meanwhile must see the snapshot or the entries (those it then finds
    # gone make it list again). pyarrow's local listing stats each name after reading the
    # directory and drops, in silence, a file deleted in between: it named neither in ~90 %
    # of these races, and a reader in CI got 1 event of 64.
    from raydiff.store.files import Files

    files, folder = Files(str(tmp_path)), tmp_path / "log"
    folder.mkdir()
    torn = 0
    for trial in range(300):
        for i in range(64):
            (folder / f"e{i:03d}.parquet").write_bytes(b"entry")
        go = threading.Event()

        def fold():
            go.wait()
            (folder / "s.parquet.tmp").write_bytes(b"snapshot")
            os.replace(folder / "s.parquet.tmp", folder / "s.parquet")
            for i in range(63):
                os.unlink(folder / f"e{i:03d}.parquet")

        thread = threading.Thread(target=fold)
        thread.start()
        go.set()
        names = files.list_dir("log")
        thread.join()
        if "s.parquet" not in names and sum(n.startswith("e") for n in names) < 64:
            torn += 1
        for f in folder.iterdir():
            f.unlink()
    assert torn == 0, f"{torn} of 300 listings named neither the snapshot nor every entry"


def test_two_processes_submit_one_run_into_one_store(small_pairs, small_references, tmp_path):
    # Two `raydiff submit` processes, each starting its own Ray cluster, write the same run.
    base, t1, _ = small_pairs
    ref = small_references[0]
    store = tmp_path / "store"
    procs, tmps, tag = [], [], uuid.uuid4().hex
    try:
        for _ in range(2):
            tmps.append(tempfile.mkdtemp(prefix="rdp-", dir="/tmp"))
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            env.update({"RAY_TMPDIR": tmps[-1], _TAG: tag, "RAY_USAGE_STATS_ENABLED": "0"})
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "raydiff.cli.main", "submit", str(base), str(t1), "--store", str(store),
                 "--chunk-elems", "1024", "--workers", "1", "--backend", "ray"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        _end_stragglers(tag)
        for t in tmps:
            shutil.rmtree(t, ignore_errors=True)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == ref.result.run_id
    _check_complete(store, [ref])


def test_a_part_written_as_another_process_commits_the_run_is_dropped(small_references, tmp_path, monkeypatch):
    """The race the two-process test hits now and then, made certain: an actor's unit (or
    spectrum) file is being written when the other submission commits the run and removes
    the folder under it. The run is complete, so the write is dropped; for a run that is
    not complete the same failure is an error."""
    import raydiff.store.files as files
    from raydiff.store import layout

    ref = small_references[0]
    store = tmp_path / "store"
    shutil.copytree(ref.store, store)
    run_id = ref.result.run_id
    s = Store(str(store))
    (unit,) = [u for u in from_table(pq.read_table(store / "runs" / run_id / "units.parquet"), UnitRecord)
               if u.unit_id == 0]
    real = files._write_parquet

    def folder_removed_meanwhile(table, path, fs):
        shutil.rmtree(Path(path).parent, ignore_errors=True)
        return real(table, path, fs)

    monkeypatch.setattr(files, "_write_parquet", folder_removed_meanwhile)
    s.write_unit(unit)  # complete: dropped, nothing raised
    assert not (store / layout.units_dir(run_id)).exists()
    assert _results(store, run_id) == ref.results
    (store / layout.commit_file(run_id)).unlink()  # now as if the run were still incomplete
    with pytest.raises(FileNotFoundError):
        s.write_unit(unit)


# -------------------------------------------------------------------- 3. SQL is read-only


def test_sql_cannot_touch_files(big_reference, tmp_path, monkeypatch):
    store = tmp_path / "store"
    shutil.copytree(big_reference.store, store)
    run_id = big_reference.result.run_id
    canary = f"canary-{uuid.uuid4().hex}"
    (tmp_path / "secret.csv").write_text(f"x\n{canary}\n")
    con = duckdb.connect(str(tmp_path / "other.duckdb"))
    con.execute(f"CREATE TABLE t AS SELECT '{canary}' AS x")
    con.close()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where relative paths and DuckDB's spill files would land
    home_duckdb = Path.home() / ".duckdb"  # where INSTALL and persistent secrets would write

    def snapshot() -> tuple[dict[str, str], list[tuple[str, int]]]:
        home = sorted((p.relative_to(home_duckdb).as_posix(), p.stat().st_size)
                      for p in home_duckdb.rglob("*")) if home_duckdb.exists() else []
        return _files(tmp_path), home

    before = snapshot()
    unit = f"{store}/runs/{run_id}/units/u00000000.parquet"
    statements = [
        # write or delete files
        f"COPY (SELECT * FROM runs) TO '{tmp_path}/out.parquet' (FORMAT parquet)",
        f"COPY raw_unit TO '{store}/runs/{run_id}/units/u99999999.parquet' (FORMAT parquet)",
        "COPY (SELECT 1) TO 'relative.csv'",
        f"SELECT 1; COPY (SELECT 42) TO '{tmp_path}/second.csv'",
        f"EXPORT DATABASE '{tmp_path}/export'",
        f"ATTACH '{tmp_path}/new.duckdb' AS n",
        f"ATTACH '{store}/runs/{run_id}/commit.parquet' AS c",
        "INSTALL httpfs",
        "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')",
        f"SET temp_directory = '{tmp_path}/spill'",
        f"SET log_query_path = '{tmp_path}/queries.log'",
        f"PRAGMA profiling_output = '{tmp_path}/profile.json'",
        f"CALL enable_logging(storage = 'file', storage_path = '{tmp_path}/logs')",
        # read files outside (or inside) the store other than through the views
        f"ATTACH '{tmp_path}/other.duckdb' AS o (READ_ONLY)",
        f"SELECT * FROM read_csv('{tmp_path}/secret.csv')",
        f"SELECT * FROM read_text('{tmp_path}/secret.csv')",
        f"SELECT * FROM '{tmp_path}/secret.csv'",
        f"SELECT * FROM sniff_csv('{tmp_path}/secret.csv')",
        f"SELECT * FROM glob('{tmp_path}/*')",
        f"SELECT * FROM read_blob('{unit}')",
        f"SELECT * FROM parquet_metadata('{unit}')",
        f"IMPORT DATABASE '{tmp_path}'",
        "LOAD httpfs",
        # undo the lock
        "SET lock_configuration = false",
        "RESET enable_external_access",
        "SET allowed_directories = ['/']",
    ]
    # refused for the lock's reasons, not by luck (a missing file, no network…)
    refused = re.compile(r"^(Permission Error|Invalid Input Error: Cannot change configuration option)")
    for stmt in statements:
        with pytest.raises(QueryError) as err:
            query(str(store), stmt)
        assert refused.match(str(err.value)) and canary not in str(err.value), (stmt, str(err.value))
    # The connection's own views and tables may change; the store cannot, through them or the raw tables.
    for stmt in ("DROP VIEW runs", "CREATE TABLE x AS SELECT 1", "CREATE OR REPLACE VIEW tensors AS SELECT 1 AS x"):
        query(str(store), stmt)
    for stmt in ("DELETE FROM raw_unit", "UPDATE raw_commit SET changed = 0", "DROP TABLE raw_run",
                 "INSERT INTO raw_commit SELECT * FROM raw_commit"):
        with pytest.raises(QueryError):
            query(str(store), stmt)
    # the CLI: an `Error:` message, exit code 1, nothing of the file
    runner = CliRunner()
    for stmt in (f"ATTACH '{tmp_path}/new.duckdb' AS n", f"SELECT * FROM read_text('{tmp_path}/secret.csv')"):
        r = runner.invoke(app, ["sql", stmt, "--store", str(store)])
        assert r.exit_code == 1 and refused.match(r.stderr.removeprefix("Error: ")), (stmt, r.output)
        assert canary not in r.output, (stmt, r.output)
    assert snapshot() == before
    _, rows = query(str(store), "SELECT status, changed FROM runs")
    assert rows == [("complete", big_reference.result.commit.changed)]
    assert _results(store, run_id) == big_reference.results


# ------------------------------------------- 4. writers and readers of one store at once


def test_queries_during_two_submits_and_a_watch_never_see_a_half_written_run(small_pairs, small_references,
                                                                            tmp_path):
    """Two submissions (threads on the shared cluster) and a `raydiff watch --once` (a process
    with its own cluster, analysing a finetune published on the local fake Hub) write one
    store while a reader queries it without pause: every run a query sees complete is whole
    (all its tensors, all its units, totals that add up), an incomplete one shows no results,
    and at the end each run equals its reference."""
    from fake_hub import FakeHub, files_of

    base, t1, t2 = small_pairs
    store = tmp_path / "store"
    diff = DiffOptions(chunk_elems=1024)
    stop, seen, problems = threading.Event(), Counter(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                con = connect(str(store))
            except StoreError:  # nothing written yet
                continue
            try:
                runs = con.execute("SELECT run_id, status, n_tensors, n_units, changed FROM runs").fetchall()
                for run_id, status, n_tensors, n_units, changed in runs:
                    t, c, u = con.execute("SELECT count(*), sum(changed) FILTER (status = 'ok'), "
                                          "(SELECT count(DISTINCT unit_id) FROM units WHERE run_id = ?) "
                                          "FROM tensors WHERE run_id = ?", [run_id, run_id]).fetchone()
                    seen[status] += 1
                    if status == "complete" and (t, c, u) != (n_tensors, changed, n_units):
                        problems.append(("complete but not whole", run_id, t, c, u, n_tensors, changed, n_units))
                    if status == "incomplete" and t:
                        problems.append(("results of an incomplete run", run_id, t))
                done = [r[0] for r in runs if r[1] == "complete"]
                if len(done) >= 2:
                    con.execute("SELECT * FROM overlap_total(?, ?)", done[:2]).fetchall()
                    seen["overlap"] += 1
            except duckdb.Error as e:  # the only acceptable failure: none
                problems.append(("query failed", str(e)[:300]))
            finally:
                con.close()

    with FakeHub("hf_token_for_this_test_000000000000") as hub:
        hub.publish("org/tuned", files_of(t2))
        watch = tmp_path / "watch.toml"
        watch.write_text(f'base = "{base}"\nstore = "{store}"\nevery = "1h"\n[options]\nchunk_elems = 1024\n'
                         'workers = 1\n[[tuned]]\nrepo = "org/tuned"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), RAY_TMPDIR=tempfile.mkdtemp(dir="/tmp"))
        q = threading.Thread(target=reader, daemon=True)
        q.start()
        proc = subprocess.Popen([sys.executable, "-m", "raydiff.cli.main", "watch", str(watch), "--once"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            r1, r2 = _together(lambda: submit(str(base), str(t1), SubmitOptions(store=str(store), diff=diff)),
                               lambda: submit(str(base), str(t2), SubmitOptions(store=str(store), diff=diff)))
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            stop.set()
            q.join(60)
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0 and "1 analysed, 0 failed" in out, (out, err)
    assert problems == []
    assert seen["complete"] and seen["incomplete"] and seen["overlap"], seen  # the reader saw every stage
    _, rows = query(str(store), "SELECT name, status FROM runs ORDER BY name")
    assert [s for _, s in rows] == ["complete"] * 3
    for res, ref in ((r1, small_references[0]), (r2, small_references[1])):
        assert _results(store, res.run_id) == ref.results
    (hub_run,) = [r for r, in query(str(store), "SELECT run_id FROM runs WHERE name LIKE 'tuned@%'")[1]]
    assert _results(store, hub_run) == small_references[1].results  # the same pair, read from the Hub
