"""The watch list: a TOML file read into one validated :class:`WatchList`.

Every problem names the file and the key (:class:`~raydiff.errors.InvalidWatchList`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, before it joined the standard library
    import tomli as tomllib  # type: ignore[no-redef]

from raydiff.errors import InvalidOption, InvalidWatchList
from raydiff.inputs.hub import is_pattern
from raydiff.inputs.refs import parse_hub_id
from raydiff.options import ClusterOptions, DiffOptions, SubmitOptions, default_store, parse_rename
from raydiff.watch.schedule import Cron, Every, Schedule, parse_duration


@dataclass(frozen=True)
class Tuned:
    """One ``[[tuned]]`` entry: a repo (or an ``org/name`` glob) and the refs to follow.

    Attributes:
        repo: ``org/name``, or a pattern such as ``org/name-*`` (the ``org`` part literal).
        branches: branch names or globs whose head commits are analysed (default ``main``).
        tags: tag names or globs whose commits are analysed (default none).
        chain: each new revision of a watched branch is also analysed against the branch's
            previous analysed revision, and joins the chain ``<repo>@<branch>``
            (:func:`raydiff.run.chain.extend_chain`; default off).
    """

    repo: str
    branches: tuple[str, ...] = ("main",)
    tags: tuple[str, ...] = ()
    chain: bool = False


@dataclass(frozen=True)
class Retry:
    """Back-off after failures: ``min(first · 2**(n-1), max)`` after the n-th in a row."""

    first: dt.timedelta = dt.timedelta(minutes=1)
    max: dt.timedelta = dt.timedelta(hours=1)

    def delay(self, failures: int) -> dt.timedelta:
        if failures <= 0:
            return dt.timedelta(0)
        return min(self.first * 2 ** min(failures - 1, 40), self.max)


@dataclass(frozen=True)
class WatchList:
    """A validated watch list.

    Attributes:
        path: the file it was read from (for messages).
        name: its name in ``watch_events`` (``name`` key, default the file's stem).
        base: the base reference (Hub ``org/name[@revision]`` or local path).
        tuned: the repos to watch.
        schedule: :class:`~raydiff.schedule.Every` or :class:`~raydiff.schedule.Cron`.
        options: the analysis options (store, diff and cluster options of ``submit``).
        retry: back-off after failures.
    """

    path: str
    name: str
    base: str
    tuned: tuple[Tuned, ...]
    schedule: Schedule
    options: SubmitOptions = field(default_factory=SubmitOptions)
    retry: Retry = field(default_factory=Retry)


# -- the watch file -----------------------------------------------------------------------

_TOP_KEYS = ("name", "store", "base", "every", "cron", "options", "retry", "tuned")
_TUNED_KEYS = ("repo", "branches", "tags", "chain")
_RETRY_KEYS = ("first", "max")
_DIFF_KEYS = {"atol": float, "rel_eta": float, "rank": str, "top_k": int, "sketch_rank": int, "subspace_k": int,
              "hash": bool,
              "chunk_elems": int, "rename": list}
_CLUSTER_KEYS = {"address": str, "workers": int, "gpus_per_actor": float, "hub_fetch": str, "backend": str}
_OPTION_KEYS = {**_DIFF_KEYS, **_CLUSTER_KEYS, "strict": bool}


class _Reader:
    """Checks keys and types of the parsed TOML, naming the file and key in every error."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> InvalidWatchList:
        return InvalidWatchList(f"{self.path}: {key}: {problem}" if key else f"{self.path}: {problem}")

    def keys(self, table: dict, allowed: Iterable[str], where: str) -> None:
        allowed = tuple(allowed)
        for k in table:
            if k not in allowed:
                raise self.fail(f"{where}{k}", f"unknown key; expected one of {', '.join(allowed)}")

    def typed(self, value: Any, kind: type, key: str) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {_KIND_NAMES[kind]}, got {value!r}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of non-empty strings, got {value!r}")
        return tuple(value)

    def duration(self, value: Any, key: str) -> dt.timedelta:
        try:
            d = parse_duration(self.typed(value, str, key))
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        if d < dt.timedelta(seconds=1):
            raise self.fail(key, "must be at least 1s")
        return d


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


def load(path: str | os.PathLike[str], store: str | None = None) -> WatchList:
    """Read and validate a watch file.

    Args:
        path: the TOML file.
        store: overrides its ``store`` key (default: the key, else ``$RAYDIFF_STORE`` or
            ``./raydiff-store``).

    Returns:
        The watch list.

    Raises:
        InvalidWatchList: unreadable file, TOML syntax error, unknown key, wrong type or
            value; the message names the file and the key.

    Example (``watch.toml``)::

        base = "org/base@main"
        every = "10m"
        [[tuned]]
        repo = "org/tuned-*"
        tags = ["v*"]
    """
    p = os.fspath(path)
    r = _Reader(p)
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise r.fail("", f"not valid TOML ({e})") from None
    except OSError as e:
        raise r.fail("", f"cannot be read ({e.strerror or e})") from None
    return parse(doc, p, store)


def parse(doc: dict[str, Any], path: str = "watch.toml", store: str | None = None) -> WatchList:
    """Validate a parsed watch file (see :func:`load`)."""
    r = _Reader(path)
    r.keys(doc, _TOP_KEYS, "")
    if "base" not in doc:
        raise r.fail("base", "missing; name the base checkpoint, e.g. base = \"org/base@main\"")
    base = r.typed(doc["base"], str, "base")
    if is_pattern(base) or not (parse_hub_id(base) or os.path.exists(base)):
        raise r.fail("base", f"{base!r} is neither an existing path nor a Hub id org/name[@revision]")
    name = r.typed(doc.get("name", Path(path).stem), str, "name") or Path(path).stem

    if ("every" in doc) == ("cron" in doc):
        raise r.fail("every", "give exactly one of every = \"10m\" or cron = \"*/15 * * * *\"")
    if "every" in doc:
        schedule: Schedule = Every(r.duration(doc["every"], "every"))
    else:
        try:
            schedule = Cron.parse(r.typed(doc["cron"], str, "cron"))
        except ValueError as e:
            raise r.fail("cron", str(e)) from None

    tuned_doc = doc.get("tuned")
    if not isinstance(tuned_doc, list) or not tuned_doc or not all(isinstance(t, dict) for t in tuned_doc):
        raise r.fail("tuned", "missing or not a list of [[tuned]] tables; add at least one with repo = \"org/name\"")
    tuned = tuple(_tuned(r, t, f"tuned[{i}]") for i, t in enumerate(tuned_doc))

    retry_doc = r.typed(doc.get("retry", {}), dict, "retry")
    r.keys(retry_doc, _RETRY_KEYS, "retry.")
    retry = Retry(**{k: r.duration(v, f"retry.{k}") for k, v in retry_doc.items()})
    if retry.first > retry.max:
        raise r.fail("retry.first", f"is longer than retry.max ({retry.max})")

    opts = r.typed(doc.get("options", {}), dict, "options")
    r.keys(opts, _OPTION_KEYS, "options.")
    values = {k: r.typed(v, _OPTION_KEYS[k], f"options.{k}") for k, v in opts.items()}
    try:
        options = SubmitOptions(
            store=store or r.typed(doc.get("store", default_store()), str, "store"),
            strict=values.pop("strict", False),
            diff=DiffOptions(rename=parse_rename(values.pop("rename", [])),
                             **{k: v for k, v in values.items() if k in _DIFF_KEYS}),
            cluster=ClusterOptions(**{k: v for k, v in values.items() if k in _CLUSTER_KEYS}),
        )
    except InvalidOption as e:  # `top_k must be …`: the file's key is `options.top_k`
        raise r.fail(f"options.{e.option}", e.for_option("").lstrip(": ")) from None
    return WatchList(path=path, name=name, base=base, tuned=tuned, schedule=schedule, options=options, retry=retry)


def _tuned(r: _Reader, t: dict, where: str) -> Tuned:
    r.keys(t, _TUNED_KEYS, f"{where}.")
    if "repo" not in t:
        raise r.fail(f"{where}.repo", "missing; give the repo id org/name or a pattern org/name-*")
    repo = r.typed(t["repo"], str, f"{where}.repo")
    org, slash, rest = repo.partition("/")
    if not slash or not rest or "@" in repo or is_pattern(org) or (not is_pattern(repo) and parse_hub_id(repo) is None):
        raise r.fail(f"{where}.repo", f"{repo!r} is not a Hub repo id org/name or a pattern org/name-* "
                     "(the org part is literal; branches and tags go in `branches` and `tags`)")
    branches = r.strings(t.get("branches", ["main"]), f"{where}.branches")
    tags = r.strings(t.get("tags", []), f"{where}.tags")
    if not branches and not tags:
        raise r.fail(where, "follows no branch and no tag; set branches = [\"main\"] or tags = [\"v*\"]")
    chain = r.typed(t.get("chain", False), bool, f"{where}.chain")
    if chain and not branches:
        raise r.fail(f"{where}.chain", "a chain follows the revisions of a branch, and this entry follows none; "
                     "set branches = [\"main\"]")
    return Tuned(repo, branches, tags, chain)
