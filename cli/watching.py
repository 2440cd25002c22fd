"""``raydiff watch`` on a terminal: one line per event and per tick, and the loop that stops on
SIGTERM or Ctrl-C (Ray installs SIGTERM handlers of its own with the first submit)."""

from __future__ import annotations

import datetime as dt
import signal
from typing import Any

import typer

from raydiff.records import WatchEventRecord
from raydiff.watch import Listener, TickReport, Triggers, WatchList, run_forever


def _when(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_line(e: WatchEventRecord) -> str:
    """One line per watch event: what, which commit, outcome, the run or the error."""
    if e.action == "analyse":
        what = f"{e.repo}@{','.join(e.refs or ())} {(e.revision or '')[:12]}"
    else:
        what = f"{'base' if e.action == 'resolve_base' else 'list'} {e.repo}"
    if e.outcome == "failed":
        return f"{what}: failed (attempt {e.attempt}, retry after {_when(e.retry_at)}): {e.error}"
    if e.outcome == "skipped":
        return f"{what}: skipped: {e.reason}"
    return f"{what}: {e.outcome}" + (f" run {e.run_id}" if e.run_id else "")


def tick_line(report: TickReport, due: dt.datetime | None) -> str:
    """One line per tick: analysed, failed, up to date, backing off, and the next tick."""
    parts = [f"{report.count('complete')} analysed", f"{report.count('failed')} failed",
             f"{report.up_to_date} up to date"]
    if report.count("skipped"):
        parts.append(f"{report.count('skipped')} skipped (weights unchanged)")
    if report.waiting:
        parts.append(f"{len(report.waiting)} backing off until {_when(min(w.retry_at for w in report.waiting))}")
    what = f"tick {_when(report.started_at)}" + (f" (webhook: {report.only})" if report.only else "")
    return f"{what}: " + ", ".join(parts) + (f"; next tick {_when(due)}" if due else "")


def follow(wl: WatchList, webhook: str | None = None) -> None:
    """Tick now and on the schedule, printing each event and tick, until SIGTERM or Ctrl-C;
    with ``webhook`` (``HOST:PORT``) also at once for the repo each Hub webhook names.

    Raises:
        InvalidOption: ``webhook`` cannot be listened on, or ``$RAYDIFF_WEBHOOK_SECRET`` is unset.
    """

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def _trap() -> None:
        # ray.init (in a tick's first submit) puts Ray's own SIGTERM handlers in front of
        # ours; taking SIGTERM back after every tick keeps the sleep between ticks — where a
        # watcher spends nearly all its time — stopping cleanly instead of through Ray's.
        signal.signal(signal.SIGTERM, _stop)

    def _ticked(report: TickReport, due: dt.datetime) -> None:
        _trap()
        typer.echo(tick_line(report, due))

    def _failed(e: Exception, due: dt.datetime) -> None:
        _trap()
        typer.echo(f"tick failed: {e}; retry {_when(due)}", err=True)

    triggers = Triggers() if webhook else None
    listener = (Listener(wl, triggers, webhook, on_request=lambda status, text: typer.echo(f"webhook {status} {text}", err=True))
                if webhook else None)
    _trap()
    typer.echo(f"watching {len(wl.tuned)} entr{'y' if len(wl.tuned) == 1 else 'ies'} of {wl.path} ({wl.schedule}); "
               "SIGTERM or Ctrl-C stops", err=True)
    if listener is not None:
        listener.start()
        typer.echo(f"listening for Hub webhooks on {listener.url}", err=True)
    try:
        run_forever(wl, on_event=lambda e: typer.echo(event_line(e)), on_tick=_ticked, on_error=_failed,
                    triggers=triggers)
    except KeyboardInterrupt:
        pass
    except SystemExit as e:  # Ray's own SIGTERM handler (installed by ray.init) exits with the signal number
        if e.code != signal.SIGTERM:
            raise
    finally:
        if listener is not None:
            listener.close()
    typer.echo("watch: stopped", err=True)
