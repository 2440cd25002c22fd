"""Stage 7 — ``raydiff watch``: analyse new Hub revisions against a base, on a schedule.

- :mod:`~raydiff.watch.config`: the watch list (TOML) as one validated model;
- :mod:`~raydiff.watch.schedule`: interval and cron schedules;
- :mod:`~raydiff.watch.tick`: one tick (list, skip what is analysed, submit, record events)
  and the long-running loop;
- :mod:`~raydiff.watch.webhook`: the listener for Hub webhooks, which asks the loop for a
  tick of the repo a push names.
"""

from raydiff.watch.config import Retry, Tuned, WatchList, load, parse
from raydiff.watch.tick import TickReport, next_tick, run_forever, tick
from raydiff.watch.webhook import Listener, Triggers

__all__ = ["Listener", "Retry", "TickReport", "Triggers", "Tuned", "WatchList", "load", "next_tick", "parse",
           "run_forever", "tick"]
