"""When ``raydiff watch`` ticks: every fixed interval (``every = "10m"``) or on a cron expression.

Cron expressions have the five standard fields ``minute hour day-of-month month day-of-week``
with ``*``, ``a-b``, lists ``a,b``, steps ``*/n`` and ``a-b/n``, month and weekday names
(``jan``, ``mon``), ``0`` or ``7`` for Sunday, and the ``@hourly``/``@daily``/``@weekly``/
``@monthly``/``@yearly`` shorthands. Like Vixie cron, when both day fields are restricted a
day matches if either does. Times are UTC (as a Kubernetes CronJob without ``timeZone``).

Example:
    >>> import datetime as dt
    >>> t = dt.datetime(2025, 1, 1, 10, 7, tzinfo=dt.timezone.utc)
    >>> Cron.parse("*/15 * * * *").next_after(t).strftime("%H:%M")
    '10:15'
    >>> Every(parse_duration("1h30m")).next_after(t).strftime("%H:%M")
    '11:37'
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass

_DURATION_PART = re.compile(r"(\d+)([dhms])")
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = {d.lower(): (i + 1) % 7 for i, d in enumerate(calendar.day_abbr)}  # mon=1 … sun=0
_SHORTHANDS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
               "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
               "@annually": "0 0 1 1 *"}
#: How far ahead :meth:`Cron.next_after` looks (a 29 February only schedule fits in it).
_HORIZON = dt.timedelta(days=366 * 8)


def parse_duration(text: str) -> dt.timedelta:
    """``"90s"``, ``"10m"``, ``"1h30m"``, ``"2d"`` → a positive :class:`~datetime.timedelta`.

    Raises:
        ValueError: not one or more ``<integer><d|h|m|s>`` parts, or zero.
    """
    s = text.strip().lower() if isinstance(text, str) else ""
    parts = _DURATION_PART.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"{text!r} is not a duration like \"90s\", \"10m\", \"1h30m\" or \"2d\"")
    seconds = sum(int(n) * _SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return dt.timedelta(seconds=seconds)


def format_duration(d: dt.timedelta) -> str:
    """The inverse of :func:`parse_duration`: ``timedelta(minutes=90)`` → ``"1h30m"``."""
    rest, out = int(d.total_seconds()), ""
    for unit, size in _SECONDS.items():
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out or "0s"


def _minute_ceil(t: dt.datetime) -> dt.datetime:
    """The first whole minute strictly after ``t``."""
    return t.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Every:
    """Tick every ``interval``, counted from the start of the previous tick."""

    interval: dt.timedelta

    def next_after(self, t: dt.datetime) -> dt.datetime:
        return t + self.interval

    def __str__(self) -> str:
        return f"every {format_duration(self.interval)}"


@dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression (UTC)."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day-of-month field is `*`
    any_weekday: bool  # day-of-week field is `*`

    @classmethod
    def parse(cls, expr: str) -> Cron:
        """Parse ``"*/15 * * * *"`` and friends.

        Raises:
            ValueError: wrong number of fields, a value out of range, or a day that never comes.
        """
        text = _SHORTHANDS.get(expr.strip().lower(), expr) if isinstance(expr, str) else ""
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(f"{expr!r} is not a cron expression: it needs 5 fields "
                             "(minute hour day-of-month month day-of-week), e.g. \"*/15 * * * *\"")
        minute, hour, dom, month, dow = fields
        weekdays = _field(dow, "day-of-week", 0, 7, _DAYS)
        cron = cls(expr=expr.strip(), minutes=_field(minute, "minute", 0, 59), hours=_field(hour, "hour", 0, 23),
                   days=_field(dom, "day-of-month", 1, 31), months=_field(month, "month", 1, 12, _MONTHS),
                   weekdays=frozenset(d % 7 for d in weekdays),
                   any_day=dom.startswith("*"), any_weekday=dow.startswith("*"))
        if cron.next_after(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)) is None:
            raise ValueError(f"{expr!r} never matches (no month has that day)")
        return cron

    def _day_matches(self, t: dt.datetime) -> bool:
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow  # both restricted: either one (Vixie cron)

    def matches(self, t: dt.datetime) -> bool:
        """Whether the minute of ``t`` is a scheduled one."""
        return (t.minute in self.minutes and t.hour in self.hours and t.month in self.months
                and self._day_matches(t))

    def next_after(self, t: dt.datetime) -> dt.datetime | None:
        """The first scheduled minute strictly after ``t`` (``None`` if none within 8 years)."""
        t = _minute_ceil(t)
        limit = t + _HORIZON
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + dt.timedelta(days=32)).replace(day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + dt.timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + dt.timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += dt.timedelta(minutes=1)
            else:
                return t
        return None

    def __str__(self) -> str:
        return f"cron {self.expr!r} (UTC)"


Schedule = Every | Cron


def _value(text: str, what: str, names: dict[str, int] | None) -> int:
    if names and text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise ValueError(f"{what} field: {text!r} is not a number")
    return int(text)


def _field(text: str, what: str, lo: int, hi: int, names: dict[str, int] | None = None) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{what} field: step {step_text!r} is not a positive number")
            step = int(step_text)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a_text, _, b_text = rng.partition("-")
            a, b = _value(a_text, what, names), _value(b_text, what, names)
        else:
            a = _value(rng, what, names)
            b = hi if step_text else a  # `5/15`: from 5 to the end, every 15
        if not lo <= a <= b <= hi:
            raise ValueError(f"{what} field: {part!r} is outside {lo}-{hi} or reversed")
        out.update(range(a, b + 1, step))
    return frozenset(out)
