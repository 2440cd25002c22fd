"""Mutation testing of the code whose bugs would silently change results.

    .venv/bin/pip install -e '.[mutation]'
    .venv/bin/python tests/mutation/run.py [--budget-minutes 120] [--only kernel masks …] [--out DIR] [--jobs N]
                                           [--again]

Cosmic Ray (``cosmic-ray``) mutates one spot at a time — a comparison, an arithmetic or
boolean operator, a number, a loop — and runs the tests that cover it; a mutant whose tests
still pass *survived*. This script runs it over copies of the repository (the working tree
is never touched), one target after another, ``--jobs`` mutants at once (one per core by
default, each in its own copy):

| target | functions | tests |
| --- | --- | --- |
| kernel | ``kernel/diff.py``: cut-offs, rounding, decoding, the numpy path, the fused loops' counts | test_kernel, test_kernel_torch |
| masks, gaps | ``kernel/masks.py``, ``kernel/_gaps.py``: the mask codecs | test_masks |
| counts | ``kernel/_gaps.py``: row/column and magnitude counts from packed masks | test_science's stripe and magnitude tests |
| science | ``kernel/science.py``: subspaces, principal angles, spectral shift, energy rank, CVs, magnitude masks | test_science's kernel-level tests |
| plan, units, formats | ``plan/``: pairing, dtypes, units, FP8 block grids, fused slices, expert stacks | test_plan (formats: + test_formats' grid errors) |
| submit | ``run/submit.py``: run identity, resume, --strict, progress | test_submit (ids, resume, atol), test_quirks (strict), test_hash (resume), test_watch (a Hub run), test_local (folding, a failed run) |
| overlap | ``query/overlap.py``: intersections, consensus | test_overlap |

plus hand-written mutants of the overlap macros' SQL (``queries/30_overlap.sql``), which no
mutation tool for Python reads. Only the named functions are mutated (Cosmic Ray's other
work items are marked skipped, as are mutants inside type annotations, which modules with
``from __future__ import annotations`` never evaluate), tests run with a fixed Hypothesis
seed. A mutant first runs only the target's tests that reach its function (found once per
run with coverage, one context per test, fastest first) and the whole list only if it
survives those, so a survivor has always passed every test of its target. Targets whose
tests submit runs keep one Ray cluster per worker, which each mutant's test session joins. A
mutant whose tests run past four times the unmutated tests' time (at least 60 s) counts as
killed. Once the budget is spent no mutant is started: those left stay pending in their
session, and the next run with the same ``--out`` goes on from there (a session begun on
another version of its module is refused: its pending mutants would land on other code). It
writes ``DIR/report.md`` (every survivor with its diff) and ``DIR/<target>.sqlite`` (Cosmic
Ray's sessions, resumable); ``docs/mutation.md`` says why each survivor left standing is
harmless; once tests are added for survivors, ``--again`` runs a session's survivors again
before its pending mutants.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0"]


@dataclass(frozen=True)
class Target:
    name: str
    module: str
    functions: tuple[str, ...]
    tests: tuple[str, ...]
    timeout: float
    ray: bool = False  # its tests submit runs: each worker keeps a Ray cluster for its mutants


_SCIENCE = "tests/test_science.py::"

TARGETS = (
    Target("kernel", "raydiff/kernel/diff.py",
           ("cutoff", "round_to", "decode", "diff_unit", "_subprecision", "_diff_fused", "_sum_sq", "_touched"),
           ("tests/test_kernel.py", "tests/test_kernel_torch.py"), 300),
    Target("masks", "raydiff/kernel/masks.py", ("encode_mask", "encode_packed", "decode_packed", "decode_mask",
                                                "_decode_gaps"), ("tests/test_masks.py",), 180),
    Target("gaps", "raydiff/kernel/_gaps.py", ("_put", "encode", "decode"), ("tests/test_masks.py",), 300),
    Target("counts", "raydiff/kernel/_gaps.py", ("_counts_aligned", "_counts_any", "row_col_counts", "magnitude_counts"),
           (f"{_SCIENCE}test_striped_masks_have_the_coefficient_of_variation_numpy_gives",
            f"{_SCIENCE}test_magnitude_masks_planted_on_the_smallest_weights"), 300),
    Target("science", "raydiff/kernel/science.py",
           ("range_basis", "top_subspace", "principal_cosines", "subspace", "spectral_shift", "energy_rank",
            "cv_of_counts", "cv_random", "low_magnitude_overlap_bits", "low_magnitude_overlap"),
           tuple(f"{_SCIENCE}{t}" for t in (
               "test_principal_angles_of_a_known_rotation", "test_spectral_shift_of_scaled_singular_values",
               "test_subspace_of_non_finite_matrices_is_not_computed", "test_energy_rank_of_a_planted_low_rank_update",
               "test_striped_masks_have_the_coefficient_of_variation_numpy_gives",
               "test_random_baseline_of_the_cv_is_that_of_random_masks",
               "test_magnitude_masks_planted_on_the_smallest_weights")), 300),
    Target("plan", "raydiff/plan/match.py", ("compare_dtype", "_renamed", "_ties", "_split_fused", "match_tensors",
                                             "_pair"), ("tests/test_plan.py",), 180),
    Target("units", "raydiff/plan/units.py", ("unit_elems_for", "_starts", "make_plan"), ("tests/test_plan.py",), 180),
    Target("formats", "raydiff/plan/formats.py", ("rows_of", "matrix_of", "block_size", "block_scales", "fused_split",
                                                  "_sizes", "expert_stack"),
           ("tests/test_plan.py", "tests/test_formats.py::test_mismatched_block_grid_is_a_clear_error"), 240),
    Target("submit", "raydiff/run/submit.py", ("run_id_for", "_check_strict", "submit"),
           ("tests/test_submit.py::test_run_ids_of_a_pair_and_its_options_are_pinned",
            "tests/test_submit.py::test_resubmit_resumes_and_never_duplicates",
            "tests/test_submit.py::test_a_user_atol_and_rel_eta_are_used_end_to_end_and_make_another_run",
            "tests/test_quirks.py::test_strict_refuses_any_decision",
            "tests/test_quirks.py::test_strict_refuses_every_kind_of_decision",
            "tests/test_quirks.py::test_strict_names_three_decisions_and_counts_the_rest",
            "tests/test_hash.py::test_an_interrupted_hash_run_resumes_to_the_same_hashes",
            "tests/test_watch.py::test_a_tick_analyses_each_new_commit_once_and_backs_off_what_fails",
            "tests/test_local.py::test_a_failed_local_run_names_the_tensor_and_resumes",
            "tests/test_local.py::test_each_tensor_is_folded_into_units_parquet_as_its_last_unit_is_stored"), 600,
           ray=True),
    Target("overlap", "raydiff/query/overlap.py", ("and_count", "count_histogram", "overlap_units",
                                                   "consensus_units"), ("tests/test_overlap.py",), 600, ray=True),
    # pairing across layouts: a prefix found without --rename, a transformers-5 stack of experts
    Target("prefixes", "raydiff/plan/match.py", ("_cuts", "prefix_rule", "_rename_to_base"),
           ("tests/test_plan.py::test_prefix_rule_finds_one_prefix_stripped_added_or_replaced_and_nothing_else",
            "tests/test_quirks.py::test_renamed_prefixes_pair_with_rename_rules_or_on_their_own",
            "tests/test_quirks.py::test_a_gpt2_base_meets_the_finetune_transformers_saves",
            "tests/test_quirks.py::test_no_prefix_is_guessed_from_a_few_names"), 300, ray=True),
    Target("stored", "raydiff/query/overlap.py", ("stored_bits", "_bits"),
           ("tests/test_overlap.py::test_a_corrupt_stored_mask_is_one_error_naming_the_run_tensor_unit_and_file",
            "tests/test_overlap.py::test_overlap_per_tensor_and_total_match_numpy",
            "tests/test_overlap.py::test_consensus_histogram_matches_numpy"), 300, ray=True),
    Target("stacks", "raydiff/plan/formats.py", ("stack_split",),
           ("tests/test_formats.py::test_a_stack_of_experts_pairs_expert_by_expert_with_per_expert_tensors",
            "tests/test_formats.py::test_experts_view_gives_sparsity_and_rank_per_layer_and_expert"), 300, ray=True),
)

#: The mutation operators used: the ones that change a computed number or decision.
OPERATORS = ("core/ReplaceComparisonOperator", "core/ReplaceBinaryOperator", "core/NumberReplacer",
             "core/ReplaceTrueWithFalse", "core/ReplaceFalseWithTrue", "core/ReplaceAndWithOr",
             "core/ReplaceOrWithAnd", "core/AddNot", "core/ReplaceUnaryOperator", "core/ZeroIterationForLoop",
             "core/ReplaceBreakWithContinue", "core/ReplaceContinueWithBreak")

#: Mutants of the overlap macros (file, text, mutated text, what it breaks).
SQL_MUTANTS = (
    ("queries/30_overlap.sql", "changed_both / NULLIF(changed_a, 0) AS o1", "changed_both / NULLIF(changed_b, 0) AS o1",
     "o1 over the wrong run's changes"),
    ("queries/30_overlap.sql", "changed_both / NULLIF(changed_a + changed_b - changed_both, 0) AS jaccard",
     "changed_both / NULLIF(changed_a + changed_b, 0) AS jaccard", "Jaccard without the union's correction"),
    ("queries/30_overlap.sql", "changed_b / NULLIF(numel, 0) AS o1_random", "changed_a / NULLIF(numel, 0) AS o1_random",
     "o1's baseline from the wrong run"),
    ("queries/30_overlap.sql", "sum(changed_both) AS changed_both", "max(changed_both) AS changed_both",
     "the total of intersections per tensor"),
    ("queries/30_overlap.sql", "WHERE NOT is_total ORDER BY tensor", "ORDER BY tensor", "overlap() with the total row"),
    ("queries/35_consensus.sql", "histogram[len(histogram)] AS in_all", "histogram[len(histogram) - 1] AS in_all",
     "in_all one short"),
)


def _spans(path: Path, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """Line ranges of the named top-level functions (and methods) of a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            out.append((node.lineno, node.end_lineno or node.lineno))
    missing = set(names) - {n.name for n in ast.walk(ast.parse(path.read_text()))
                            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if missing:
        raise SystemExit(f"{path}: no function {sorted(missing)}")
    return out


def _annotations(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the type annotations of a module are, as ``((line, col), (end line, end col))``,
    if the module has ``from __future__ import annotations``: then they are strings that
    nothing in these modules evaluates, and a mutant inside one cannot change a result."""
    tree = ast.parse(path.read_text())
    if not any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body):
        return []
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            nodes += [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
            nodes.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            nodes.append(node.annotation)
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in nodes if n is not None]


def _copy(dst: Path) -> None:
    """The tracked files and the working tree's changes, with raydiff.cli and raydiff.queries
    importable from the copy (as the wheel installs them)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    (dst / "raydiff" / "cli").symlink_to(dst / "cli", target_is_directory=True)
    (dst / "raydiff" / "queries").symlink_to(dst / "queries", target_is_directory=True)


def _script(copy: Path) -> Path:
    """This script as copied with the repository: the runs a campaign starts use the copy's
    version, whatever happens to the working tree while it lasts."""
    return copy / Path(__file__).resolve().relative_to(ROOT)


def _env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(copy)
    env["NUMBA_CACHE_DIR"] = str(copy / ".numba-cache")  # the copy's compiled loops, not the tree's
    return env


#: Imported once by each worker (``--serve``) and inherited by every mutant's forked test
#: run: importing these took two thirds of a mutant's time when each ran a fresh pytest.
#: None of them imports raydiff, which each forked run imports from the mutated files.
_PRELOAD = ("numpy", "torch", "pyarrow", "pyarrow.parquet", "pyarrow.compute", "pyarrow.dataset", "duckdb",
            "numba", "safetensors", "safetensors.torch", "huggingface_hub", "typer", "pytest", "hypothesis")


def _serve() -> None:
    """``--serve``: run mutants one after another in the current directory (a copy), each a
    JSON line on stdin answered by a JSON line on stdout. The worker imports the heavy
    libraries once; each mutant's tests run in a forked child, in a session of its own so
    that a timeout kills every process it started, with the mutated module written to disk
    for the child's imports and restored after."""
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if any(m == "raydiff" or m.startswith("raydiff.") for m in sys.modules):
        raise SystemExit("a preloaded library imported raydiff: forked runs would not see the mutant")
    reply = os.fdopen(os.dup(1), "w")  # answers only: anything else printed goes to stderr
    os.dup2(2, 1)
    for line in sys.stdin:
        reply.write(json.dumps(_run_mutant(json.loads(line))) + "\n")
        reply.flush()


def _run_mutant(job: dict) -> dict:
    import cosmic_ray.plugins
    from cosmic_ray.mutating import use_mutation
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    (m,) = job["mutations"]
    operator = cosmic_ray.plugins.get_operator(m["operator"])()
    try:
        with use_mutation(Path(m["module_path"]), operator, m["occurrence"]) as (original, mutated):
            if mutated is None:
                return {"worker_outcome": WorkerOutcome.NO_TEST.value}
            outcome, output = _forked_pytest(shlex.split(job["command"])[3:], job["timeout"])
    except Exception as e:  # noqa: BLE001 — reported as the mutant's outcome, like Cosmic Ray's worker
        return {"worker_outcome": WorkerOutcome.EXCEPTION.value, "output": repr(e),
                "test_outcome": TestOutcome.INCOMPETENT.value}
    path = m["module_path"]
    diff = "".join(difflib.unified_diff(original.splitlines(True), mutated.splitlines(True), f"a/{path}", f"b/{path}"))
    return {"worker_outcome": WorkerOutcome.NORMAL.value, "output": output[-4000:], "test_outcome": outcome.value,
            "diff": diff}


def _forked_pytest(args: list[str], timeout: float):
    """``pytest args`` in a forked child: killed if the tests fail, or run past ``timeout``."""
    from cosmic_ray.work_item import TestOutcome

    fd, name = tempfile.mkstemp(prefix="mutant-", suffix=".log")
    os.close(fd)  # a worker runs hundreds of mutants: no descriptor may stay open per mutant
    log = Path(name)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 70
        try:
            os.setsid()
            out = os.open(log, os.O_WRONLY | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            sys.dont_write_bytecode = True  # a mutant's bytecode must never be cached
            import pytest

            rc = int(pytest.main(args))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            log.unlink(missing_ok=True)
            return TestOutcome.KILLED, "timeout"
        time.sleep(0.02)
    output = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # what the tests left running (a Ray cluster)
        os.killpg(pid, signal.SIGKILL)
    return (TestOutcome.SURVIVED if os.waitstatus_to_exitcode(status) == 0 else TestOutcome.KILLED), output


def _cover_tests(module: str, out: str, tests: list[str]) -> None:
    """``--cover``: run ``tests`` under coverage, each test its own context, and write
    ``{line: [node ids]}`` for ``module``'s lines and ``{node id: seconds}`` to ``out``."""
    import coverage
    import pytest

    cov = coverage.Coverage(data_file=None, include=[str(Path(module).resolve())])
    seconds: dict[str, float] = {}

    class Contexts:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            cov.switch_context(item.nodeid)
            t0 = time.perf_counter()
            yield
            seconds[item.nodeid] = time.perf_counter() - t0

    cov.start()
    try:
        rc = pytest.main([*PYTEST[3:], *tests], plugins=[Contexts()])
    finally:
        cov.stop()
    if rc != 0:
        raise SystemExit(f"the unmutated tests fail under coverage (pytest exit {rc})")
    data = cov.get_data()
    lines: dict[int, list[str]] = {}
    for f in data.measured_files():
        for line, contexts in data.contexts_by_lineno(f).items():
            lines.setdefault(line, []).extend(c for c in contexts if c)
    Path(out).write_text(json.dumps({"lines": lines, "seconds": seconds}))


def _selections(t: Target, copy: Path, command: str, timeout: float) -> dict[tuple[int, int], str]:
    """The test command for each target function: only the tests whose run reaches one of its
    lines (coverage, one context per test), fastest first, so that ``-x`` stops a killed
    mutant early. A function no test reaches in this process (numba-compiled loops, code run
    by Ray actors) keeps the whole command, as does one whose selection fails unmutated (a
    test that needs another to run first). The selection is only a speed-up: a mutant that
    survives it is run again with the whole command before it counts as a survivor."""
    cover = copy / ".mutation-cover.json"
    r = subprocess.run([sys.executable, str(_script(copy)), "--cover", t.module, str(cover), *t.tests],
                       cwd=copy, env=_env(copy), capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  coverage failed ({r.stdout[-500:]}{r.stderr[-500:]}); every mutant runs every test", flush=True)
        return {}
    data = json.loads(cover.read_text())
    seconds = data["seconds"]
    out: dict[tuple[int, int], str] = {}
    for span in _spans(copy / t.module, t.functions):
        ids = {i for line, ctx in data["lines"].items() if span[0] <= int(line) <= span[1] for i in ctx}
        if not ids or len(ids) == len(seconds):
            continue
        chosen = " ".join([*PYTEST, *(shlex.quote(i) for i in sorted(ids, key=lambda i: (seconds.get(i, 0.0), i)))])
        check = subprocess.run(shlex.split(chosen), cwd=copy, env=_env(copy), capture_output=True, text=True,
                               timeout=timeout)
        if check.returncode == 0:
            out[span] = chosen
    print(f"  {len(out)} of {len(t.functions)} functions run a selection of the tests", flush=True)
    return out


def _hold_ray() -> None:
    """``--hold-ray``: start a local Ray cluster, print its address, keep it until stdin closes."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()
    ray.shutdown()


class _Worker:
    """A ``--serve`` process in one copy of the repository, started on first use and again
    if it dies; with ``ray``, also a ``--hold-ray`` process whose cluster the mutants' test
    sessions join (``RAYDIFF_TEST_RAY``, see ``tests/conftest.py``) rather than each starting
    and stopping one: 13 of a ``submit`` mutant's 60 s. Each test session is a job of its own,
    and Ray never lends a job's worker processes to another, so every mutant's actors import
    raydiff afresh, from the mutated files."""

    def __init__(self, copy: Path, ray: bool = False) -> None:
        self.copy = copy
        self.ray = ray
        self.proc: subprocess.Popen | None = None
        self.holder: subprocess.Popen | None = None
        self.address = ""

    def _start(self) -> None:
        env = _env(self.copy)
        if self.ray:
            if self.holder is None or self.holder.poll() is not None:
                # a cluster only this worker reaches, so no token; no bytecode from the actors' imports
                held = {**env, "RAY_AUTH_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
                self.holder = subprocess.Popen([sys.executable, str(_script(self.copy)), "--hold-ray"], cwd=self.copy,
                                               env=held, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                self.address = self.holder.stdout.readline().strip()
            env = {**env, "RAYDIFF_TEST_RAY": self.address, "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(_script(self.copy)), "--serve"], cwd=self.copy,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, item, command: str, timeout: float):
        from cosmic_ray.work_item import WorkerOutcome, WorkResult

        job = {"mutations": [{"module_path": str(m.module_path), "operator": m.operator_name,
                              "occurrence": m.occurrence} for m in item.mutations],
               "command": command, "timeout": timeout}
        if self.proc is None or self.proc.poll() is not None or (self.holder and self.holder.poll() is not None):
            self.close()  # a cluster that died would fail the next mutant's tests: a false kill
            self._start()
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            return WorkResult(**json.loads(self.proc.stdout.readline()))
        except (OSError, ValueError, TypeError) as e:
            self.close()
            return WorkResult(worker_outcome=WorkerOutcome.ABNORMAL, output=f"the worker died: {e!r}")

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.holder is not None:
            with contextlib.suppress(OSError):
                self.holder.stdin.close()  # the holder stops its cluster
            try:
                self.holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
            self.holder = None


def _baseline(command: str, copy: Path) -> float:
    """Seconds the unmutated tests take in ``copy`` (they must pass: a mutant is judged by them)."""
    t0 = time.perf_counter()
    r = subprocess.run(command.split(), cwd=copy, env=_env(copy), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the unmutated tests fail in the copy:\n{r.stdout[-3000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def _execute(session: Path, copies: list[Path], command: str, timeout: float, deadline: float,
             selections: dict[tuple[int, int], str] | None = None, ray: bool = False) -> int:
    """Run a session's pending mutants, one per copy at a time (``len(copies)`` in parallel),
    recording each result as it comes; mutants not started by ``deadline`` stay pending for
    the next run. A mutant inside a function of ``selections`` runs that function's tests
    first, and the whole ``command`` only if it survives them. Returns how many are left."""
    import queue
    import threading

    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = list(db.pending_work_items)
    todo: queue.Queue = queue.Queue()
    for item in pending:
        todo.put(item)
    results: queue.Queue = queue.Queue()

    def worker(copy: Path) -> None:
        w = _Worker(copy, ray)
        try:
            while time.time() < deadline:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                line = item.mutations[0].start_pos[0]
                chosen = next((c for (a, b), c in (selections or {}).items() if a <= line <= b), command)
                res = w.run(item, chosen, timeout)
                if chosen != command and res.test_outcome is not None and res.test_outcome.name == "SURVIVED":
                    res = w.run(item, command, timeout)
                results.put((item.job_id, res))
        finally:
            w.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in copies]
    for th in threads:
        th.start()
    done = 0
    with use_db(str(session), WorkDB.Mode.open) as db:
        while any(th.is_alive() for th in threads) or not results.empty():
            try:
                job_id, res = results.get(timeout=1)
            except queue.Empty:
                continue
            db.set_result(job_id, res)
            done += 1
            if done % 10 == 0:
                print(f"  {done} of {len(pending)} mutants run", flush=True)
    return len(pending) - done


def run_target(t: Target, copies: list[Path], out: Path, deadline: float, again: bool = False) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    copy = copies[0]
    session = out / f"{t.name}.sqlite"
    config = out / f"{t.name}.toml"
    command = " ".join([*PYTEST, *t.tests])
    config.write_text(f"""[cosmic-ray]
module-path = "{t.module}"
timeout = {t.timeout}
excluded-modules = []
test-command = "{command}"

[cosmic-ray.distributor]
name = "local"
""")
    env = _env(copy)
    # Cosmic Ray names a mutant by its operator and occurrence in the module as it was when
    # the session began: once the module changes, a pending mutant would land elsewhere.
    stamp, digest = out / f"{t.name}.sha256", hashlib.sha256((copy / t.module).read_bytes()).hexdigest()
    if session.exists() and stamp.exists() and stamp.read_text().strip() != digest:
        raise SystemExit(f"{session} was begun on another version of {t.module}: its pending mutants would "
                         f"mutate other code. Delete {session} (and {stamp}) to start that target over")
    if not session.exists():
        subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "init", str(config), str(session)], cwd=copy,
                       env=env, check=True, capture_output=True)
        spans = _spans(copy / t.module, t.functions)
        with use_db(str(session), WorkDB.Mode.open) as db:
            for item in list(db.pending_work_items):
                spec = item.mutations[0]
                inside = any(a <= spec.start_pos[0] <= b for a, b in spans)
                if not inside or not spec.operator_name.startswith(OPERATORS):
                    db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    if not stamp.exists():
        stamp.write_text(digest + "\n")
    annotations = _annotations(copy / t.module)
    with use_db(str(session), WorkDB.Mode.open) as db:
        survived = [i for i, r in db.completed_work_items
                    if r.test_outcome is not None and r.test_outcome.name == "SURVIVED"]
        for item in [*db.pending_work_items, *survived]:  # survivors: of sessions begun before this rule
            spec = item.mutations[0]
            if any(a <= tuple(spec.start_pos) < b for a, b in annotations):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                                      output="inside a type annotation, which is never evaluated"))
    if again:  # --again: the survivors run again, against the tests as they are now
        import sqlite3

        with contextlib.closing(sqlite3.connect(session)) as db, db:
            n = db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
        print(f"  {n} survivors run again", flush=True)
    t0 = time.time()
    # a mutant whose tests run past a few times their usual time is killed (an endless loop)
    timeout = min(t.timeout, max(60.0, 4 * _baseline(command, copy)))
    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = next(iter(db.pending_work_items), None) is not None
    selections = _selections(t, copy, command, timeout) if pending else {}
    left = _execute(session, copies, command, timeout, deadline, selections, t.ray)
    with use_db(str(session), WorkDB.Mode.open) as db:
        results = list(db.completed_work_items)
    survivors, killed, other = [], 0, 0
    for item, result in results:
        if result.worker_outcome == WorkerOutcome.SKIPPED:
            continue
        if result.test_outcome is not None and result.test_outcome.name == "SURVIVED":
            survivors.append({"where": f"{t.module}:{item.mutations[0].start_pos[0]}",
                              "operator": item.mutations[0].operator_name, "diff": result.diff})
        elif result.test_outcome is not None and result.test_outcome.name == "KILLED":
            killed += 1
        else:
            other += 1
    return {"target": t.name, "killed": killed, "survived": len(survivors), "other": other, "left": left,
            "minutes": (time.time() - t0) / 60, "survivors": survivors}


def run_sql(copy: Path) -> dict:
    survivors, killed = [], 0
    t0 = time.time()
    for rel, text, mutated, what in SQL_MUTANTS:
        path = copy / rel
        original = path.read_text()
        assert text in original, (rel, text)
        path.write_text(original.replace(text, mutated, 1))
        try:
            r = subprocess.run([*PYTEST, "tests/test_overlap.py"], cwd=copy, env=_env(copy), capture_output=True)
        finally:
            path.write_text(original)
        if r.returncode == 0:
            diff = "".join(difflib.unified_diff(original.splitlines(True), original.replace(text, mutated, 1)
                                                .splitlines(True), rel, rel))
            survivors.append({"where": rel, "operator": f"sql: {what}", "diff": diff})
        else:
            killed += 1
    return {"target": "overlap SQL", "killed": killed, "survived": len(survivors), "other": 0, "left": 0,
            "minutes": (time.time() - t0) / 60, "survivors": survivors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-minutes", type=float, default=180.0)
    ap.add_argument("--only", nargs="*", default=None, help=f"targets: {' '.join(t.name for t in TARGETS)} sql")
    ap.add_argument("--out", default=str(ROOT / ".mutation"))
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="mutants tested at once, each in its own copy of the repository (default: one per core)")
    ap.add_argument("--again", action="store_true",
                    help="run the sessions' survivors again first (after tests were added for them)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hold-ray", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cover", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve()
        return
    if args.hold_ray:
        _hold_ray()
        return
    if args.cover:
        _cover_tests(args.cover[0], args.cover[1], args.cover[2:])
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` removes the copies too
    base = Path(tempfile.mkdtemp(prefix="raydiff-mutation-"))
    copies = [base / str(k) for k in range(max(1, args.jobs))]
    for c in copies:
        c.mkdir()
        _copy(c)
    copy = copies[0]
    start = time.time()
    deadline = start + 60 * args.budget_minutes
    reports = []
    try:
        for t in TARGETS:
            if args.only and t.name not in args.only:
                continue
            if time.time() > deadline:
                print(f"budget spent: {t.name} not started", flush=True)
                continue
            print(f"target {t.name}: {t.module}", flush=True)
            reports.append(run_target(t, copies, out, deadline, args.again))
            print(json.dumps({k: v for k, v in reports[-1].items() if k != "survivors"}), flush=True)
        if not args.only or "sql" in args.only:
            reports.append(run_sql(copy))
            print(json.dumps({k: v for k, v in reports[-1].items() if k != "survivors"}), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    lines = ["# Mutation testing: survivors", "",
             "| target | killed | survived | other | left for the next run | minutes |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['target']} | {r['killed']} | {r['survived']} | {r['other']} | {r['left']} | {r['minutes']:.0f} |"
              for r in reports]
    for r in reports:
        for s in r["survivors"]:
            lines += ["", f"## {s['where']} — {s['operator']}", "", "```diff", s["diff"].rstrip(), "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
