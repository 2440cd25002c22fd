"""Ray: the only module that imports it. Actors are thin shells around an Executor.

A pool of :class:`DiffActor` is sized to the cluster (one per CPU, or per GPU share when the
cluster has GPUs); it is released when the run ends, or kept for the next submission of this
process with ``ClusterOptions.keep_actors``. The driver waits for the actors the cluster can
hold to start (up to 30 s), then hands out work largest-first to started actors only — an
actor Ray cannot place yet joins when it starts instead of sitting on work — keeps two items
in flight per actor so none idles between items, and receives only small
:class:`~raydiff.run.execute.Done` records: results go from the actors to the store directly.

Fault tolerance lives here too: actors restart when their process dies
(``max_restarts``) and the unit in flight is retried (``max_task_retries``). A retried unit
rewrites the same file with the same bytes, so a retry can never duplicate a result.

``raydiff patch`` and ``apply`` run on a pool of :class:`ArtifactActor` the same way
(:func:`run_artifacts`), each item a patch shard or a rebuilt tensor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from raydiff.errors import ClusterUnavailable, RaydiffError, WorkFailed
from raydiff.options import ClusterOptions
from raydiff.plan import HashTask, SpectrumTask, WorkUnit
from raydiff.inputs.remote import HubAccess
from raydiff.run.patch_work import ArtifactExecutor, ItemDone, PatchShardItem, RebuildItem

if TYPE_CHECKING:  # imported by the diff actor when it starts: an artifact actor needs no torch
    from raydiff.run.execute import Done, Executor, RunContext

_IN_FLIGHT_PER_ACTOR = 2
_MAX_RESTARTS = 4
_MAX_TASK_RETRIES = 4
# How long a run waits for the actors the cluster can hold before it goes on with those that
# started; later ones join as Ray places them.
_START_WAIT_S = 30.0
_STILL_WAITING_S = 60.0  # while no actor has started, a note this often


def connected() -> bool:
    """Whether this process is connected to a Ray cluster already."""
    return ray.is_initialized()


def connect(address: str | None) -> dict[str, float]:
    """Connect to a Ray cluster (``address``, else ``$RAY_ADDRESS``), or start a local one.

    Returns the cluster's total resources. Reuses the connection when already connected.
    """
    if not ray.is_initialized():
        # A local cluster keeps Ray's default token authentication; only the notice that it
        # is on is dropped, since it would follow every `raydiff submit`.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda r: not r.getMessage().startswith("Token authentication is enabled for this Ray cluster"))
        # No address means a new local cluster ("local"): ray.init(None) would instead join any
        # cluster another process happens to run on this machine (its /tmp/ray session).
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, object] = dict(logging_level=logging.WARNING, log_to_driver=False)
        if address == "local":
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # Ray raises bare Exceptions (a node that timed out starting, …)
            where = "start a local Ray cluster" if address == "local" else f"connect to the Ray cluster at {address}"
            raise ClusterUnavailable(
                f"could not {where}: {' '.join(str(e).split())[:300]}. Check the machine's load and free memory "
                "(or the cluster's address), then submit again: the run resumes") from e
    # Totals from the node table: what each alive node registered with. cluster_resources()
    # comes from the resource view, which can lag a node that has just joined by a moment —
    # enough for a submit right after it to size its pool as if the node were not there.
    total: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for key, value in node.get("Resources", {}).items():
                total[key] = total.get(key, 0.0) + value
    return total or ray.cluster_resources()


@ray.remote(max_restarts=_MAX_RESTARTS, max_task_retries=_MAX_TASK_RETRIES)
class DiffActor:
    """Diffs units and computes spectra, on the node it was placed on, for any run."""

    def __init__(self, device: str) -> None:
        from threadpoolctl import threadpool_limits

        from raydiff.run import execute  # noqa: F401  (the compiled kernel, loaded as the actor starts)

        # one BLAS thread, as the actor has one CPU (torch has one already: Ray sets
        # OMP_NUM_THREADS): spectra are then bitwise those of the local backend's workers
        threadpool_limits(1, user_api="blas")

        self._node_id = ray.get_runtime_context().get_node_id()
        self._device = device
        self._ex: Executor | None = None

    def _executor(self, ctx: RunContext) -> Executor:
        if self._ex is None or self._ex.ctx != ctx:  # a new run: drop the old run's file maps
            from raydiff.run.execute import Executor

            ex = Executor(ctx, node_id=self._node_id, device=self._device)
            ex.store.check_visible(ctx.run_id, f"Ray node {self._node_id}")
            self._ex = ex
        return self._ex

    def ready(self) -> None:
        """Answers once the actor has started (its process is up and ``__init__`` has run)."""

    def unit(self, ctx: RunContext, u: WorkUnit) -> Done:
        return self._executor(ctx).unit(u)

    def spectrum(self, ctx: RunContext, s: SpectrumTask) -> Done:
        return self._executor(ctx).spectrum(s)

    def hashed(self, ctx: RunContext, h: HashTask) -> list[Done]:
        return self._executor(ctx).hashed(h)

    def release(self) -> None:
        """Unmap the run's checkpoint files (so deleted checkpoints free their disk space)."""
        self._ex = None


# A driver may keep its actor pool between submissions (the demo's seven), since an actor's
# start — a Ray worker importing torch and loading the compiled kernel — costs 1–3 s, more
# than diffing a small pair. Kept actors hold their CPUs, which would starve another driver
# on the same cluster, so keeping is opt-in. One run at a time drives the pool: two threads
# building it at once would leak a pool whose actors hold the CPUs the other waits for.
_pool: dict[str, object] = {}
_pool_lock = threading.Lock()


def _actors(n: int, gpu_share: float) -> list:
    key = (ray.get_runtime_context().get_job_id(), n, gpu_share)
    if _pool.get("key") != key:
        for a in _pool.get("actors", []):
            ray.kill(a, no_restart=True)
        _drop_artifact_pool()  # a kept pool of artifact actors would hold the CPUs this one needs
        device = "cuda" if gpu_share else "cpu"
        # SPREAD: one actor per node before two on one, so every node reads its share of bytes
        _pool["actors"] = [DiffActor.options(num_cpus=1, num_gpus=gpu_share, scheduling_strategy="SPREAD").remote(device)
                           for _ in range(n)]
        _pool["key"] = key
    return _pool["actors"]  # type: ignore[return-value]


def _drop_pool() -> None:
    for a in _pool.pop("actors", []):
        ray.kill(a, no_restart=True)
    _pool.pop("key", None)


def pool_size(resources: dict[str, float], options: ClusterOptions) -> tuple[int, float]:
    """``(actors, gpus per actor)`` for a cluster's resources and the user's options."""
    gpus = resources.get("GPU", 0.0)
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus > 0:
        n = max(1, int(gpus / options.gpus_per_actor))
        per = options.gpus_per_actor
    else:
        n, per = cpus, 0.0
    if options.workers:
        n = options.workers
    return n, per


def placeable(resources: dict[str, float], n: int, gpu_share: float) -> int:
    """How many of ``n`` actors (1 CPU and ``gpu_share`` GPU each) the cluster's totals can hold."""
    fit = min(n, int(resources.get("CPU", 0.0)))
    if gpu_share:
        fit = min(fit, int(resources.get("GPU", 0.0) / gpu_share + 1e-9))
    return fit


def run_work(ctx: RunContext, units: Sequence[WorkUnit], spectra: Sequence[SpectrumTask],
             options: ClusterOptions, on_done: Callable[[Done], None] | None = None,
             on_note: Callable[[str], None] | None = None, hashes: Sequence[HashTask] = ()) -> None:
    """Run every unit, spectrum task and ``--hash`` task (a tensor's units in order) on a pool
    of actors; return when all are stored.

    ``on_note`` hears what the user should know while the run lasts: actors that Ray cannot
    place yet (more asked for than the cluster holds, or its CPUs held by other jobs).

    Raises:
        RaydiffError: the first user-facing error raised by any actor (bad checkpoint…).
    """
    if not units and not spectra and not hashes:
        return
    with _pool_lock:
        resources = connect(options.address)
        n, gpu_share = pool_size(resources, options)
        actors = _actors(n, gpu_share)
        need = "1 CPU" + (f" and {gpu_share:g} GPU" if gpu_share else "")
        have = f"{resources.get('CPU', 0.0):g} CPUs" + (f", {resources.get('GPU', 0.0):g} GPUs" if gpu_share else "")
        pool = _Pool(actors)
        try:
            _start(pool, placeable(resources, n, gpu_share), f"each needs {need}; the cluster has {have}",
                   on_note or (lambda _: None))
            _dispatch(ctx, actors, pool, units, spectra, on_done, hashes)
        finally:
            if options.keep_actors:
                ray.get([actors[i].release.remote() for i in pool.live])
            else:
                _drop_pool()


class _Pool:
    """Which actors of a pool have started, and the readiness calls of those that have not."""

    def __init__(self, actors: list) -> None:
        self.size = len(actors)
        self.live: list[int] = []
        self.starting: dict[ray.ObjectRef, int] = {a.ready.remote(): i for i, a in enumerate(actors)}

    def started(self, ref: ray.ObjectRef) -> None:
        i = self.starting.pop(ref)
        _get(ref)  # an actor that could not start raises here
        self.live.append(i)

    def wait(self, timeout: float) -> None:
        """Until one more actor has started, or ``timeout`` seconds."""
        ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=timeout)
        for ref in ready:
            self.started(ref)


def _start(pool: _Pool, expect: int, why: str, note: Callable[[str], None]) -> None:
    """Wait until ``expect`` actors have started (at most ``_START_WAIT_S``), then until one has.

    Waiting for the pool before handing out work spreads the largest items over every node
    from the start; an actor the cluster cannot hold yet would otherwise sit on its items.
    """
    began = time.monotonic()
    while len(pool.live) < max(1, expect) and (left := began + _START_WAIT_S - time.monotonic()) > 0:
        pool.wait(left)
    while not pool.live:
        note(f"no diff actor has started after {time.monotonic() - began:.0f} s: Ray cannot place one yet ({why}, "
             "and other jobs may hold them); still waiting. Ctrl-C stops; submitting again resumes the run")
        pool.wait(_STILL_WAITING_S)
    n = pool.size
    if len(pool.live) < n:
        note(f"{len(pool.live)} of {n} diff actors started; going on with them, and the other {n - len(pool.live)} "
             f"join when Ray places them ({why}). --workers sets how many to ask for")


def _dispatch(ctx: RunContext, actors: list, pool: _Pool, units: Sequence[WorkUnit],
              spectra: Sequence[SpectrumTask], on_done: Callable[[Done], None] | None,
              hashes: Sequence[HashTask] = ()) -> None:
    # Longest first: spectra (SVDs) by cost, then hashed tensors and units by size.
    work: list[tuple[str, object]] = [("spectrum", s) for s in sorted(spectra, key=lambda s: -s.flops)]
    sized = [(h.nbytes, "hashed", h) for h in hashes] + [(u.nbytes, "unit", u) for u in units]
    work += [(kind, item) for _, kind, item in sorted(sized, key=lambda x: -x[0])]
    work.reverse()  # pop() from the end
    pending: dict[ray.ObjectRef, int] = {}
    load = [0] * len(actors)
    while work or pending:
        for i in pool.live:
            while work and load[i] < _IN_FLIGHT_PER_ACTOR:
                kind, item = work.pop()
                ref = getattr(actors[i], kind).remote(ctx, item)
                pending[ref] = i
                load[i] += 1
        ready, _ = ray.wait(list(pending) + list(pool.starting), num_returns=1)
        for ref in ready:
            if ref in pool.starting:  # a late actor joins
                pool.started(ref)
                continue
            load[pending.pop(ref)] -= 1
            done = _get(ref)
            if on_done is not None:
                for d in done if isinstance(done, list) else [done]:
                    on_done(d)


def _get(ref: ray.ObjectRef, actor: str = "a diff actor", again: str = "submit again to resume the run"):
    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = e.cause if hasattr(e, "cause") else None
        if isinstance(cause, RaydiffError):
            raise cause from None
        # the executor turns every error of a unit into a RaydiffError: this one came from Ray
        # itself or from an actor that could not be built (its traceback is the detail)
        raise WorkFailed(f"{actor} failed: {_first_line(cause or e)}; {again}", str(e)) from None
    except RayActorError as e:
        _drop_pool()
        raise RaydiffError(f"{actor} died and could not be restarted ({_first_line(e)}); {again}") from None
    except RayError as e:  # an object lost with its node, a worker that could not start…
        raise WorkFailed(f"Ray failed the run: {type(e).__name__}: {_first_line(e)}; {again}", str(e)) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# -- patch and apply ---------------------------------------------------------------------------


@ray.remote(max_restarts=_MAX_RESTARTS, max_task_retries=_MAX_TASK_RETRIES)
class ArtifactActor:
    """Writes patch shards and rebuilds tensors (:class:`~raydiff.run.patch_work.ArtifactExecutor`).

    A retried item rewrites the same temporary file (a patch shard) or the same bytes at the
    same offsets (a tensor), so a retry never leaves a different result.
    """

    def __init__(self, hub: HubAccess | None) -> None:
        self._ex = ArtifactExecutor(hub, node_id=ray.get_runtime_context().get_node_id())

    def ready(self) -> None:
        """Answers once the actor has started."""

    def run(self, item: PatchShardItem | RebuildItem) -> ItemDone:
        return self._ex.run(item)


def run_artifacts(items: Sequence[PatchShardItem | RebuildItem], options: ClusterOptions,
                  hub: HubAccess | None = None, on_done: Callable[[ItemDone], None] | None = None,
                  on_note: Callable[[str], None] | None = None) -> None:
    """Run patch or apply items on a pool of artifact actors (1 CPU each, at most one per
    item), largest first, two in flight per actor; the pool is released at the end, or kept
    for the next call of this process with ``ClusterOptions.keep_actors``.

    On an error, the items in flight finish first (so the caller can remove their
    temporaries with nothing left writing them), then the first error is raised.

    Raises:
        RaydiffError: the first user-facing error raised by any actor (a base that is not
            the patch's, a file that cannot be written…).
    """
    if not items:
        return
    again = "run the command again to resume it"
    with _pool_lock:
        resources = connect(options.address)
        n = min(pool_size(resources, options)[0], len(items))
        _drop_pool()  # a kept pool of diff actors would hold the CPUs this one needs
        key = (ray.get_runtime_context().get_job_id(), n, hub)
        if _artifact_pool.get("key") != key:
            _drop_artifact_pool()
            _artifact_pool["actors"] = [ArtifactActor.options(num_cpus=1, scheduling_strategy="SPREAD").remote(hub)
                                        for _ in range(n)]
            _artifact_pool["key"] = key
        actors: list = _artifact_pool["actors"]  # type: ignore[assignment]
        pool = _Pool(actors)
        failed = False
        pending: dict[ray.ObjectRef, int] = {}
        try:
            _start(pool, placeable(resources, n, 0.0), f"each needs 1 CPU; the cluster has "
                   f"{resources.get('CPU', 0.0):g} CPUs", on_note or (lambda _: None))
            work = sorted(items, key=lambda i: i.cost)  # pop() from the end: largest first
            load = [0] * n
            while work or pending:
                for i in pool.live:
                    while work and load[i] < _IN_FLIGHT_PER_ACTOR:
                        pending[actors[i].run.remote(work.pop())] = i
                        load[i] += 1
                ready, _ = ray.wait(list(pending) + list(pool.starting), num_returns=1)
                for ref in ready:
                    if ref in pool.starting:
                        pool.started(ref)
                        continue
                    load[pending.pop(ref)] -= 1
                    done = _get(ref, "an artifact actor", again)
                    if on_done is not None:
                        on_done(done)
            failed = False
        except BaseException as e:
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=120)
            # an error of Ray's or an actor's own (not one of the inputs) leaves a pool not worth keeping
            failed = isinstance(e, (WorkFailed, RayError)) or type(e) is RaydiffError
            raise
        finally:
            if failed or not options.keep_actors:
                _drop_artifact_pool()


_artifact_pool: dict[str, object] = {}


def _drop_artifact_pool() -> None:
    for a in _artifact_pool.pop("actors", []):  # type: ignore[attr-defined]
        ray.kill(a, no_restart=True)
    _artifact_pool.pop("key", None)


def release_actors() -> None:
    """Kill the actor pools this process kept with ``ClusterOptions.keep_actors``."""
    with _pool_lock:
        _drop_pool()
        _drop_artifact_pool()
