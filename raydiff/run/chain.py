"""Chains of checkpoints: every checkpoint of a training run against the base and against the
checkpoint before it, recorded in the store as the chain's steps.

A chain ``C1 … CT`` over a base ``C0`` is T runs ``C0 → Cₜ`` and T − 1 runs ``Cₜ₋₁ → Cₜ``
(step 1's run against its predecessor is its run against the base). A step's update can be
far below any tolerance, so every run of a chain is at ``atol = 0``: its mask is "the value
changed" (``|Δ| > 0`` in the compared dtype), which differs from "the bits differ" only for a
+0/−0 swap (equal values) — a NaN whose bits changed counts as changed. The views
``chain_steps`` and ``chain_summary`` (``queries/55_chains.sql``) combine the runs' stored
masks. Runs already complete are reused, so submitting a chain again, or a longer one,
computes only what is new.

Example:
    >>> from raydiff.run.chain import submit_chain
    >>> r = submit_chain("base/", ["step100/", "step200/"], "grpo")  # doctest: +SKIP
    >>> [(s.step, s.run_vs_base, s.run_vs_prev) for s in r.steps]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from raydiff.errors import ChainConflict, InvalidOption
from raydiff.inputs.refs import Identity, identify
from raydiff.options import SubmitOptions
from raydiff.records import ChainStepRecord
from raydiff.run.submit import Progress, SubmitResult, submit
from raydiff.store import Store

VS_BASE, VS_PREV = "vs_base", "vs_prev"
_MAX_NAME = 256


@dataclass(frozen=True)
class ChainRun:
    """One run a chain submission made or reused: step ``step``'s checkpoint against the base
    (``kind = "vs_base"``) or against the previous step's (``"vs_prev"``)."""

    step: int
    kind: str
    result: SubmitResult


@dataclass(frozen=True)
class ChainResult:
    """The outcome of :func:`submit_chain`.

    Attributes:
        chain: the chain's name.
        steps: the chain as the store now records it (every step, also those of earlier
            submissions beyond the checkpoints given).
        runs: the runs of this call, in order (``already_complete`` for those reused).
        recorded: steps this call recorded (0 when the chain was already recorded as given).
    """

    chain: str
    steps: tuple[ChainStepRecord, ...]
    runs: tuple[ChainRun, ...]
    recorded: int


def chain_options(options: SubmitOptions) -> SubmitOptions:
    """``options`` as a chain's runs use them: ``atol = 0`` (every change, however small)."""
    return dataclasses.replace(options, diff=dataclasses.replace(options.diff, atol=0.0))


def check_chain_name(chain: str) -> str:
    """The chain name, or :class:`~raydiff.errors.InvalidOption` naming what is wrong with it."""
    if not isinstance(chain, str) or not chain.strip() or len(chain) > _MAX_NAME or \
            any(ord(ch) < 32 for ch in chain):
        raise InvalidOption(f"chain must be a name of 1 to {_MAX_NAME} printable characters, got {chain!r}",
                            option="chain")
    return chain


def pinned(ident: Identity) -> str:
    """A reference to exactly this checkpoint: a Hub commit as ``org/name@<sha>``."""
    return f"{ident.ref}@{ident.revision}" if ident.revision else ident.ref


def _shown(ref: str, revision: str | None) -> str:
    return f"{ref}@{revision}" if revision else ref


def step_record(chain: str, step: int, base: Identity, tuned: Identity, run_vs_base: str,
                run_vs_prev: str) -> ChainStepRecord:
    """The record of one step of a chain (its key names the chain, the step and both runs)."""
    return ChainStepRecord(
        key=f"{chain}#{step}#{run_vs_base}#{run_vs_prev}", chain=chain, step=step, base=base.ref,
        base_revision=base.revision, tuned=tuned.ref, tuned_revision=tuned.revision, run_vs_base=run_vs_base,
        run_vs_prev=run_vs_prev, recorded_at=dt.datetime.now(dt.timezone.utc))


def check_consistent(chain: str, recorded: Sequence[ChainStepRecord], base: Identity,
                     tuned: Sequence[Identity]) -> None:
    """Raise unless ``base`` and ``tuned`` agree with the chain's recorded steps (a chain
    given again, shorter or longer, must start with the same checkpoints).

    Raises:
        ChainConflict: another base, or another checkpoint at a recorded step.
    """
    if not recorded:
        return
    first = recorded[0]
    if (first.base, first.base_revision) != (base.ref, base.revision):
        raise ChainConflict(f"chain {chain!r} is over the base {_shown(first.base, first.base_revision)}, not "
                            f"{_shown(base.ref, base.revision)}; give its base, or another chain name")
    for rec, ident in zip(recorded, tuned):
        if (rec.tuned, rec.tuned_revision) != (ident.ref, ident.revision):
            raise ChainConflict(
                f"chain {chain!r} has {_shown(rec.tuned, rec.tuned_revision)} at step {rec.step}, not "
                f"{_shown(ident.ref, ident.revision)}; give the chain's checkpoints in order from its first "
                f"(`SELECT step, tuned FROM chains WHERE chain = '{chain}'`), or another chain name")


def submit_chain(base: str, tuned: Sequence[str], chain: str, options: SubmitOptions | None = None,
                 progress: Progress | None = None,
                 on_run: Callable[[ChainRun], None] | None = None) -> ChainResult:
    """Analyse every checkpoint of ``tuned`` against ``base`` and against the one before it
    (at ``atol = 0``), and record them as the steps of chain ``chain``.

    Runs are named ``<chain>:<t>`` (against the base) and ``<chain>:<t-1>-<t>`` (a step),
    unless they were complete before under another name; complete runs are reused. Each step
    is recorded as soon as its runs are complete, so a chain cut short resumes where it
    stopped when submitted again.

    Args:
        base: the base checkpoint (local path or ``org/name[@revision]``).
        tuned: the chain's checkpoints in training order, from its first (a chain given again
            with more checkpoints grows; its recorded steps must come first, unchanged).
        chain: the chain's name.
        options: as :func:`~raydiff.run.submit.submit`'s (``atol`` is set to 0, ``name``
            is not used).
        progress: callbacks for a progress display, for every run.
        on_run: called with each run once it is complete (or found complete).

    Returns:
        The chain as recorded, and the runs of this call.

    Raises:
        InvalidOption: a bad chain name, or no checkpoint.
        ChainConflict: the chain is recorded with another base or other checkpoints.
        RaydiffError: as :func:`~raydiff.run.submit.submit`.
    """
    check_chain_name(chain)
    if not tuned:
        raise InvalidOption("chain needs at least one checkpoint after the base", option="chain")
    c = _Chain(chain, options, progress, on_run)
    base_id = identify(base)
    ids = [identify(t) for t in tuned]
    check_consistent(chain, c.recorded, base_id, ids)
    for t, ident in enumerate(ids, 1):
        c.step(t, base_id, ids[t - 2] if t > 1 else None, ident)
    return c.result()


def extend_chain(base: str, tuned: str, chain: str, options: SubmitOptions | None = None,
                 progress: Progress | None = None,
                 on_run: Callable[[ChainRun], None] | None = None) -> ChainResult:
    """Add ``tuned`` to chain ``chain`` as its next step: analysed against ``base`` and
    against the chain's last checkpoint (at ``atol = 0``), or as step 1 of a new chain.
    Nothing is done when ``tuned`` is the chain's last checkpoint already.

    ``raydiff watch`` grows the chain of a watched branch this way, one new revision at a
    time. Arguments, errors and run names as :func:`submit_chain`.
    """
    check_chain_name(chain)
    c = _Chain(chain, options, progress, on_run)
    base_id, ident = identify(base), identify(tuned)
    check_consistent(chain, c.recorded, base_id, [])
    last = c.recorded[-1] if c.recorded else None
    if last is None:
        c.step(1, base_id, None, ident)
    elif (last.tuned, last.tuned_revision) != (ident.ref, ident.revision):
        c.step(last.step + 1, base_id, Identity(last.tuned, last.tuned_revision, ""), ident)
    return c.result()


class _Chain:
    """The runs and records of one call on one chain."""

    def __init__(self, chain: str, options: SubmitOptions | None, progress: Progress | None,
                 on_run: Callable[[ChainRun], None] | None) -> None:
        self.chain, self.progress, self.on_run = chain, progress, on_run
        self.options = chain_options(options or SubmitOptions())
        self.store = Store(self.options.store)
        self.recorded = self.store.chain_steps(chain)
        self.known = {r.key for r in self.recorded}
        self.runs: list[ChainRun] = []
        self.new = 0

    def _run(self, step: int, kind: str, a: Identity, b: Identity, name: str) -> SubmitResult:
        result = submit(pinned(a), pinned(b), dataclasses.replace(self.options, name=name), self.progress)
        self.runs.append(ChainRun(step, kind, result))
        if self.on_run is not None:
            self.on_run(self.runs[-1])
        return result

    def step(self, t: int, base: Identity, prev: Identity | None, tuned: Identity) -> None:
        """Submit (or find) step ``t``'s runs and record the step, unless recorded as it is."""
        vs_base = self._run(t, VS_BASE, base, tuned, f"{self.chain}:{t}")
        vs_prev = vs_base if prev is None else self._run(t, VS_PREV, prev, tuned, f"{self.chain}:{t - 1}-{t}")
        rec = step_record(self.chain, t, base, tuned, vs_base.run_id, vs_prev.run_id)
        if rec.key not in self.known:
            self.store.record_chain_steps([rec])
            self.known.add(rec.key)
            self.new += 1

    def result(self) -> ChainResult:
        return ChainResult(self.chain, tuple(self.store.chain_steps(self.chain)), tuple(self.runs), self.new)
