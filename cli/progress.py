"""The progress of ``raydiff submit`` on a terminal: a rich bar on stderr, notes above it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

from raydiff.options import SubmitOptions
from raydiff.run.chain import ChainResult, ChainRun, submit_chain
from raydiff.run.submit import Planned, Progress, SubmitResult, submit
from raydiff.run.execute import Done


class Bar(Progress):
    """A rich progress bar on stderr (bytes, rate, items, ETA), silent when stderr is no
    terminal; notes (actors Ray cannot place yet…) print above it either way."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        from rich.progress import Progress as RichProgress

        self.enabled = sys.stderr.isatty()
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TextColumn("{task.fields[items]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), disable=not self.enabled, transient=True)
        self.task = None
        self.items = (0, 0)

    def planned(self, p: Planned) -> None:
        self.items = (p.units_total - p.units_todo + p.spectra_total - p.spectra_todo,
                      p.units_total + p.spectra_total)
        self.bar.start()
        self.task = self.bar.add_task(f"diff {p.run.name}", total=p.bytes_total + 0,
                                      completed=p.bytes_total - p.bytes_todo, items=self._items())

    def _items(self) -> str:
        return f"{self.items[0]}/{self.items[1]} items"

    def advanced(self, done: Done) -> None:
        if done.kind == "hash":  # a tensor's SHA-256 pair, after its units: not an item of the bar
            return
        self.items = (self.items[0] + 1, self.items[1])
        if self.task is not None:
            self.bar.update(self.task, advance=done.nbytes if done.kind == "unit" else 0, items=self._items())

    def note(self, message: str) -> None:
        self.bar.console.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self.bar.stop()


def submit_with_progress(base: str, tuned: str, options: SubmitOptions) -> SubmitResult:
    """:func:`raydiff.run.submit.submit` with the bar; stdout is kept for the run id alone."""
    bar = Bar()
    try:
        # Ray prints its own notices (task retries after a lost worker…) on the driver's
        # stdout: they go to stderr while the run lasts.
        with contextlib.redirect_stdout(sys.stderr):
            return submit(base, tuned, options, bar)
    finally:
        bar.stop()


def submit_chain_with_progress(base: str, tuned: list[str], chain: str, options: SubmitOptions,
                               on_run: Callable[[ChainRun], None]) -> ChainResult:
    """:func:`raydiff.run.chain.submit_chain` with the bar (one line of it per run)."""
    bar = Bar()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return submit_chain(base, tuned, chain, options, bar, on_run)
    finally:
        bar.stop()
