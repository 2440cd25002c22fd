"""The local backend: a run's work on this process's threads, no Ray.

On one machine a Ray cluster adds no speed: the kernel's loops release the GIL, the work is
bound by memory or disk bandwidth, and threads of one process read the same page cache as
actors would. What a local cluster does add is ≈ 7 s to start and ≈ 1.4 s to stop (2 cores),
more than diffing a 4 GB pair. So with no cluster given, ``auto`` runs here; Ray stays the
backend of what only it gives: several nodes, and GPUs (see :mod:`raydiff.run.actors`).

The work and its results are those of the actors: each thread holds an
:class:`~raydiff.run.execute.Executor` and writes to the store directly, so an interrupted
local run resumes like any other, on either backend.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from raydiff.options import ClusterOptions
from raydiff.plan import HashTask, SpectrumTask, WorkUnit

if TYPE_CHECKING:
    from raydiff.run.execute import Done, Executor, RunContext


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chosen(options: ClusterOptions) -> bool:
    """Whether a run goes on this process's threads (see ``ClusterOptions.backend``)."""
    if options.backend != "auto":
        return options.backend == "local"
    if options.address or os.environ.get("RAY_ADDRESS"):
        return False
    if "ray" in sys.modules:  # a library user (or a test session) already connected to Ray keeps it
        from raydiff.run import actors

        if actors.connected():
            return False
    return not has_gpu()


def has_gpu() -> bool:
    """Whether this machine has a GPU torch could use, told without importing torch (≈ 1.5 s)
    when it is not loaded yet: an NVIDIA (``/proc/driver/nvidia/gpus``) or AMD (``/dev/kfd``)
    device, unless ``CUDA_VISIBLE_DEVICES`` hides every one."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    nvidia = "/proc/driver/nvidia/gpus"
    return (os.path.isdir(nvidia) and bool(os.listdir(nvidia))) or os.path.exists("/dev/kfd")


def run_work(ctx: RunContext, units: Sequence[WorkUnit], spectra: Sequence[SpectrumTask],
             options: ClusterOptions, on_done: Callable[[Done], None] | None = None,
             on_note: Callable[[str], None] | None = None, hashes: Sequence[HashTask] = ()) -> None:
    """Run every unit, spectrum task and ``--hash`` task on ``options.workers`` threads (default:
    one per core); return when all are stored.

    The few spectra that are each a large share of the work first, by cost; then the
    other spectra, units and hashed tensors in the order of their bytes on disk (a matrix's
    spectrum just before its units, which then find its bytes in the page cache), each
    thread starting to read its next item while it computes this one. Spectra run
    together only while their estimated memory fits in half of ``MemAvailable``. Torch
    runs on one thread per worker (as on an actor's one CPU), so spectra are bitwise those
    of the Ray backend.
    On an error or Ctrl-C, work not started is dropped, the items running finish (each writes
    a whole file or nothing), and the first error is raised.

    Raises:
        RaydiffError: the first user-facing error of any item (bad checkpoint…).
    """
    if not units and not spectra and not hashes:
        return
    from raydiff.run.execute import Executor, spectrum_memory

    # The spectra that are each a large share of the work first, the costliest first, so
    # that no long decomposition is left for the end. Then everything else in the order of
    # its bytes in the base's files: the threads sweep the checkpoint front to back, which a
    # disk reads fastest (largest-first would read every tensor's full units first and come
    # back for the short last ones), and a matrix's units follow its spectrum, so that a
    # pair bigger than memory is read from the disk once, not once for each.
    workers = max(1, options.workers or cores())
    big = sum(s.flops for s in spectra) / (4 * workers)
    work: list[tuple[str, object]] = [("spectrum", s) for s in sorted(spectra, key=lambda s: -s.flops)
                                      if s.flops > big]
    placed = [(_where(None, s.base), 0, "spectrum", s) for s in spectra if s.flops <= big]
    placed += [(_where(h.units[0] if h.units else None, h.base or h.tuned), 1, "hashed", h) for h in hashes]
    placed += [(_where(u, u.base), 1, "unit", u) for u in units]
    work += [(kind, item) for *_, kind, item in sorted(placed, key=lambda x: x[:2])]
    n = max(1, min(workers, len(work)))
    node = f"local:{socket.gethostname()}"
    mine = threading.local()
    memory = _Budget(available_memory() // 2)
    # A pair bigger than memory leaves the page cache tensor by tensor as they are done:
    # the kernel would evict it anyway, and reclaiming pages still mapped costs the two
    # cores more (a 32 GB pair on 24 GB, --rank off: 51.5 / 52.1 s against 57.1 / 59.1 s).
    # Done means its units and its spectra: a spectrum outlasts its matrix's units, and
    # dropping the bytes under it made it read them from the disk again (that pair's
    # sketch run read 49 GB, 96 s against 109 s)
    release = sum(u.nbytes for u in units) > available_memory()
    left = Counter(u.tensor_index for u in units) + Counter(s.tensor_index for s in spectra)
    left_lock = threading.Lock()
    whole = {u.tensor_index: u for u in units}  # a unit's infos span its whole tensor (an expert's spectrum's, one expert)
    executors: list[Executor] = []

    def run(i: int) -> Done | list[Done]:
        kind, item = work[i]
        ex: Executor | None = getattr(mine, "ex", None)
        if ex is None:
            ex = mine.ex = Executor(ctx, node_id=node, keep_records=True)  # the fold takes them from memory
            with left_lock:
                executors.append(ex)
            if torch is not None:
                # OpenMP's and MKL's thread counts are per thread: set in this one too, or
                # torch.linalg (MKL's LAPACK) may run on every core until some torch op here
                # happens to set them (an exact svdvals first differed from an actor's)
                torch.set_num_threads(1)
        # the item that starts when this one ends (n threads take items in order): its bytes
        # come from the disk while this one is computed
        if i + n < len(work) and work[i + n][0] in ("unit", "spectrum"):
            ex.prefetch(work[i + n][1])  # type: ignore[arg-type]
        need = spectrum_memory(item, ctx) if isinstance(item, SpectrumTask) else 0
        with memory.held(need):
            done = getattr(ex, kind)(item)
        if release and kind in ("unit", "spectrum"):
            ex.release(item)  # type: ignore[arg-type]
            with left_lock:
                left[item.tensor_index] -= 1  # type: ignore[union-attr]
                last = not left[item.tensor_index]  # type: ignore[union-attr]
            if last:  # out of every thread's maps, then out of the cache
                tensor = whole.get(item.tensor_index, item)  # type: ignore[union-attr]
                with left_lock:
                    maps = list(executors)
                for other in maps:
                    if other is not ex:
                        other.release(tensor, tensor=True)  # type: ignore[arg-type]
                ex.release(tensor, tensor=True, cache=True)  # type: ignore[arg-type]
        return done

    torch = blas = None
    if spectra:  # torch only where it is used: a --rank off run never loads it
        import torch
        from threadpoolctl import threadpool_limits

        # One torch thread and one BLAS thread per worker, as an actor has one CPU: a float
        # reduction's order depends on the thread count, and a run's spectra are then
        # bitwise the same on either backend, with any --workers. (Two workers each calling
        # a two-thread OpenBLAS also get 0.65× the products' throughput of one thread each.)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        blas = threadpool_limits(1, user_api="blas")
    pool = ThreadPoolExecutor(n, thread_name_prefix="raydiff-diff")
    try:
        pending: set[Future] = {pool.submit(run, i) for i in range(len(work))}
        while pending:
            # a timeout, so that Ctrl-C reaches this thread while the work runs
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                done = f.result()
                if on_done is not None:
                    for d in done if isinstance(done, list) else [done]:
                        on_done(d)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if torch is not None:
            torch.set_num_threads(threads)
        if blas is not None:
            blas.restore_original_limits()


def available_memory() -> int:
    """Memory the machine can give without swapping (``MemAvailable``), else all of it."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _Budget:
    """Bytes that running items may hold together. An item waits while the others hold too
    much for it, and runs alone when it is bigger than the whole budget: two threads never
    decompose a 128256×4096 embedding each at once on a machine that holds one."""

    def __init__(self, total: int) -> None:
        self.total, self.used, self.running = total, 0, 0
        self._cv = threading.Condition()

    @contextmanager
    def held(self, need: int) -> Iterator[None]:
        if not need:
            yield
            return
        with self._cv:
            self._cv.wait_for(lambda: self.running == 0 or self.used + need <= self.total)
            self.used += need
            self.running += 1
        try:
            yield
        finally:
            with self._cv:
                self.used -= need
                self.running -= 1
                self._cv.notify_all()


def _where(u: WorkUnit | None, info) -> tuple[str, int]:
    """Where an item's bytes start: its base file (its tuned one for a tensor only in tuned)
    and the offset in it."""
    if info is None:
        return "", 0
    start = u.start if u is not None else 0
    return info.file, info.span(start, start)[0]
