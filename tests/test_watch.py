"""`raydiff watch`: the watch file, the schedule, ticks against a local Hub, and the CLI end to end.

Listing goes through the real ``huggingface_hub`` client to ``tests/fake_hub.py`` on
127.0.0.1. The tick tests run in-process, each tick's analyses by the real ``submit`` on
the shared Ray cluster, with an injected clock (so back-off can be driven exactly) and
failures made at the network edge (the fake Hub answering 503, a truncated file on it); the
end-to-end test runs the real command in its own process, Ray included.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import write_checkpoint
from fake_hub import WORKER_TOKEN, FakeHub, files_of
from raydiff.errors import InvalidWatchList
from raydiff.watch.schedule import Cron, Every, format_duration, parse_duration
from raydiff.query.views import query
from raydiff.watch import Retry, load, next_tick, run_forever, tick

TOKEN = WORKER_TOKEN  # the shared cluster's workers hold it (conftest.py): they read private repos with it
UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


# ------------------------------------------------------------------ the watch file


def _write(tmp_path, text, name="watch.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


FULL = """
name = "tulu"
store = "{store}"
base = "org/base@main"
cron = "*/15 * * * *"
[options]
atol = 0
rank = "sketch"
rename = ["model.language_model.=model."]
workers = 2
strict = true
[retry]
first = "30s"
max = "2h"
[[tuned]]
repo = "org/tuned-*"
branches = ["main", "release/*"]
tags = ["v*"]
[[tuned]]
repo = "org/other"
"""


def test_watch_file_is_read_into_one_validated_model(tmp_path):
    w = load(_write(tmp_path, FULL.format(store=tmp_path / "s")))
    assert (w.name, w.base, str(w.schedule)) == ("tulu", "org/base@main", "cron '*/15 * * * *' (UTC)")
    assert [(t.repo, t.branches, t.tags) for t in w.tuned] == [
        ("org/tuned-*", ("main", "release/*"), ("v*",)), ("org/other", ("main",), ())]
    assert w.options.store == str(tmp_path / "s") and w.options.strict
    assert (w.options.diff.atol, w.options.diff.rank, w.options.diff.rename) == (0.0, "sketch", (("model.language_model.", "model."),))
    assert w.options.cluster.workers == 2
    assert w.retry == Retry(dt.timedelta(seconds=30), dt.timedelta(hours=2))
    assert load(_write(tmp_path, FULL.format(store="x")), store="/elsewhere").options.store == "/elsewhere"
    minimal = load(_write(tmp_path, 'base = "org/b"\nevery = "10m"\n[[tuned]]\nrepo = "org/t"\n', "mini.toml"))
    assert (minimal.name, minimal.schedule, minimal.retry) == ("mini", Every(dt.timedelta(minutes=10)), Retry())


@pytest.mark.parametrize("change, key, words", [
    (("", "colour = 1\n"), "colour", "unknown key; expected one of name, store, base"),
    (('base = "org/base@main"', ""), "base", "missing"),
    (('base = "org/base@main"', 'base = "org/*"'), "base", "neither an existing path nor a Hub id"),
    (('cron = "*/15 * * * *"', 'cron = "*/15 * * *"'), "cron", "needs 5 fields"),
    (('cron = "*/15 * * * *"', 'cron = "61 * * * *"'), "cron", "outside 0-59"),
    (('cron = "*/15 * * * *"', 'cron = "0 0 31 2 *"'), "cron", "never matches"),
    (('cron = "*/15 * * * *"', 'cron = "*/15 * * * *"\nevery = "1h"'), "every", "exactly one of"),
    (('cron = "*/15 * * * *"', 'every = "ten minutes"'), "every", "not a duration"),
    (('rank = "sketch"', 'rank = "svd"'), "options.rank", "must be one of exact, sketch, off, got 'svd'"),
    (('workers = 2', 'workers = "2"'), "options.workers", "must be an integer"),
    (('atol = 0', 'atol = -1'), "options.atol", "must be a finite number >= 0, got -1.0"),
    (('atol = 0', 'top_k = 0'), "options.top_k", "must be between 1 and 4096, got 0"),
    (('workers = 2', 'gpus = 1'), "options.gpus", "unknown key"),
    (('rename = ["model.language_model.=model."]', 'rename = ["nothing"]'), "options.rename", "OLD=NEW"),
    (('first = "30s"', 'first = "3h"'), "retry.first", "longer than retry.max"),
    (('repo = "org/other"', 'repo = "org/other@main"'), "tuned[1].repo", "not a Hub repo id"),
    (('repo = "org/other"', 'repo = "*/other"'), "tuned[1].repo", "the org part is literal"),
    (('repo = "org/other"', 'repo = "org/other"\nbranch = "dev"'), "tuned[1].branch", "unknown key"),
    (('tags = ["v*"]', 'tags = "v*"'), "tuned[0].tags", "list of non-empty strings"),
    (('repo = "org/other"', 'repo = "org/other"\nchain = "yes"'), "tuned[1].chain", "must be true or false"),
    (('repo = "org/other"', 'repo = "org/other"\nbranches = []\ntags = ["v1"]\nchain = true'), "tuned[1].chain",
     "a chain follows the revisions of a branch"),
    (("[[tuned]]\nrepo = \"org/other\"\n", ""), None, None),  # still valid: one tuned entry left
])
def test_every_problem_in_the_watch_file_names_the_file_and_the_key(tmp_path, change, key, words):
    old, new = change
    text = FULL.format(store="s")
    assert old in text
    p = _write(tmp_path, text.replace(old, new, 1) if old else new + text)
    if key is None:
        load(p)
        return
    with pytest.raises(InvalidWatchList) as e:
        load(p)
    assert str(e.value).startswith(f"{p}: {key}: "), str(e.value)
    assert words in str(e.value)


def test_unreadable_or_broken_toml_is_one_error(tmp_path):
    with pytest.raises(InvalidWatchList, match="cannot be read"):
        load(tmp_path / "absent.toml")
    with pytest.raises(InvalidWatchList, match=r"watch.toml: not valid TOML"):
        load(_write(tmp_path, "base = \n"))


# ------------------------------------------------------------------ the schedule


@pytest.mark.parametrize("expr, after, expected", [
    ("*/15 * * * *", "2025-03-01 12:07", "2025-03-01 12:15"),
    ("*/15 * * * *", "2025-03-01 12:15", "2025-03-01 12:30"),  # strictly after
    ("5/20 3-4 * * *", "2025-03-01 04:50", "2025-03-02 03:05"),
    ("0 9 * * mon-fri", "2025-03-01 12:00", "2025-03-03 09:00"),  # Saturday → Monday
    ("0 0 1,15 * 7", "2025-03-03 00:00", "2025-03-09 00:00"),  # both day fields set: either (Sunday 9th)
    ("30 2 29 feb *", "2025-03-01 00:00", "2028-02-29 02:30"),
    ("@daily", "2025-12-31 23:59", "2026-01-01 00:00"),
])
def test_cron_next_after(expr, after, expected):
    t = dt.datetime.fromisoformat(after).replace(tzinfo=UTC)
    assert Cron.parse(expr).next_after(t) == dt.datetime.fromisoformat(expected).replace(tzinfo=UTC)


_FIELD = st.one_of(st.just("*"), st.integers(1, 20).map(lambda n: f"*/{n}"))


@settings(max_examples=60, deadline=None)
@given(minute=st.one_of(_FIELD, st.integers(0, 59).map(str)), hour=st.one_of(_FIELD, st.integers(0, 23).map(str)),
       dow=st.one_of(st.just("*"), st.integers(0, 7).map(str)), start=st.integers(0, 10 ** 8))
def test_cron_next_after_is_the_first_matching_minute(minute, hour, dow, start):
    cron = Cron.parse(f"{minute} {hour} * * {dow}")
    t = T0 + dt.timedelta(seconds=start)
    got = cron.next_after(t)
    assert got > t and cron.matches(got)
    probe = t.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    while probe < got:  # nothing scheduled in between (at most a week of minutes)
        assert not cron.matches(probe), probe
        probe += dt.timedelta(minutes=1)


def test_durations():
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    for text in ("90s", "1h30m", "2d", "1d1h1m1s"):
        assert format_duration(parse_duration(text)) == ("1m30s" if text == "90s" else text)
    assert parse_duration("2d") == dt.timedelta(days=2)
    for bad in ("", "10", "1x", "0s", "m10"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_back_off_doubles_up_to_its_cap():
    r = Retry(dt.timedelta(minutes=1), dt.timedelta(minutes=10))
    assert [r.delay(n).total_seconds() / 60 for n in range(7)] == [0, 1, 2, 4, 8, 10, 10]


# ------------------------------------------------------------------ ticks against a local Hub


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def hub(monkeypatch, tmp_path, ray_cluster):
    """A local fake Hub the real ``huggingface_hub`` client talks to (its endpoint and cache set
    as ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` would set them), with the token the shared
    cluster's workers hold, so the real ``submit`` of each tick can read private repos too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHub(TOKEN) as h:  # what HF_ENDPOINT sets when huggingface_hub is imported
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield h


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Tiny real checkpoints: ``blobs[0]`` and ``blobs[3]`` are bases, the rest finetunes of
    ``blobs[0]`` (``i`` rows moved); ``blobs["bad"]`` is a truncated safetensors file."""
    root = tmp_path_factory.mktemp("blobs")
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(16, generator=g).bfloat16()}
    out: dict = {}
    for i in range(7):
        t = {n: (v.clone() if i != 3 else torch.randn(v.shape, generator=g).bfloat16()) for n, v in base.items()}
        if i not in (0, 3):
            t["model.layers.0.mlp.up_proj.weight"][:i] += 1
        out[i] = files_of(write_checkpoint(root / str(i), t))
    out["bad"] = {"model.safetensors": b"\x40" + b"\0" * 7 + b"{}"}
    return out


def _watch_file(tmp_path, body: str) -> Path:
    return _write(tmp_path, f'base = "org/base"\nstore = "{tmp_path / "store"}"\nevery = "10m"\n'
                            f'[options]\nrank = "off"\nworkers = 1\n[retry]\nfirst = "1m"\nmax = "3m"\n{body}')


def _runs(tmp_path):
    """The complete runs of the store: (name, tuned, tuned commit, base commit), oldest first."""
    return query(str(tmp_path / "store"), "SELECT name, tuned, tuned_revision, base_revision FROM runs "
                                          "WHERE status = 'complete' ORDER BY completed_at")[1]


def _summary(report):
    return [(e.action, e.repo, e.refs, e.outcome, e.attempt) for e in report.events]


def test_a_tick_analyses_each_new_commit_once_and_backs_off_what_fails(tmp_path, hub, blobs):
    hub.publish("org/base", blobs[0])
    old = hub.publish("org/tuned-a", blobs[1], tags=("v1",))
    hub.publish("org/tuned-a", blobs[2], tags=("v2",))  # main and v2 point at one commit
    hub.publish("org/tuned-a", blobs[4], branch="dev")  # not watched
    hub.publish("org/tuned-b", blobs[5], private=True)  # listed, and read by the actors, only with the token
    hub.publish("org/bad", blobs["bad"])
    hub.publish("org/flaky", blobs[6])
    hub.fail("/api/models/org/flaky/refs")
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned-*"\ntags = ["v*"]\n'
                                       '[[tuned]]\nrepo = "org/bad"\n[[tuned]]\nrepo = "org/flaky"\n'))
    clock = _Clock()

    r1 = tick(watch, clock=clock)
    assert _summary(r1) == [
        ("analyse", "org/tuned-a", ("main", "v2"), "started", 1), ("analyse", "org/tuned-a", ("main", "v2"), "complete", 1),
        ("analyse", "org/tuned-a", ("v1",), "started", 1), ("analyse", "org/tuned-a", ("v1",), "complete", 1),
        ("analyse", "org/tuned-b", ("main",), "started", 1), ("analyse", "org/tuned-b", ("main",), "complete", 1),
        ("analyse", "org/bad", ("main",), "started", 1), ("analyse", "org/bad", ("main",), "failed", 1),
        ("list", "org/flaky", None, "failed", 1)]
    base_sha = hub.repos["org/base"].branches["main"]
    # each run is of the pinned commits, named after the branch or tag, and its counts are the
    # rows the finetune moved (i rows of 16 entries, +1 each: every one changed)
    assert _runs(tmp_path) == [
        ("tuned-a@main", "org/tuned-a", hub.repos["org/tuned-a"].branches["main"], base_sha),
        ("tuned-a@v1", "org/tuned-a", old, base_sha),
        ("tuned-b@main", "org/tuned-b", hub.repos["org/tuned-b"].branches["main"], base_sha)]
    _, changed = query(str(tmp_path / "store"), "SELECT name, changed FROM runs WHERE status = 'complete' ORDER BY name")
    assert changed == [("tuned-a@main", 2 * 16), ("tuned-a@v1", 1 * 16), ("tuned-b@main", 5 * 16)]
    failed = [e for e in r1.events if e.outcome == "failed"]
    assert [e.retry_at for e in failed] == [T0 + dt.timedelta(minutes=1)] * 2
    assert "truncated" in failed[0].error and "503" in failed[1].error and TOKEN not in failed[1].error

    # same time again: nothing to do, the two failures wait for their back-off
    r2 = tick(watch, clock=clock)
    assert (r2.events, r2.up_to_date, len(_runs(tmp_path))) == ((), 3, 3)
    assert sorted((w.action, w.repo, w.failures) for w in r2.waiting) == [("analyse", "org/bad", 1), ("list", "org/flaky", 1)]
    assert next_tick(watch, r2, clock()) == T0 + dt.timedelta(minutes=1)  # before the 10 min schedule

    # one minute later the Hub answers again; org/bad fails a second time and waits twice as long
    hub.heal()
    clock.now = T0 + dt.timedelta(minutes=1)
    r3 = tick(watch, clock=clock)
    assert _summary(r3) == [("analyse", "org/bad", ("main",), "started", 2), ("analyse", "org/bad", ("main",), "failed", 2),
                            ("list", "org/flaky", None, "recovered", 2),
                            ("analyse", "org/flaky", ("main",), "started", 1), ("analyse", "org/flaky", ("main",), "complete", 1)]
    assert r3.events[1].retry_at == clock.now + dt.timedelta(minutes=2)
    clock.now += dt.timedelta(minutes=1)
    assert tick(watch, clock=clock).events == ()
    for _ in range(3):  # capped at retry.max = 3m
        clock.now += dt.timedelta(minutes=3)
        r = tick(watch, clock=clock)
        assert r.events[-1].retry_at - r.events[-1].recorded_at == dt.timedelta(minutes=3)

    # the events are in the store, one file each, and in the watch_events view
    cols, rows = query(str(tmp_path / "store"), "SELECT action, repo, outcome, attempt FROM watch_events "
                                                "WHERE repo = 'org/bad' ORDER BY recorded_at, attempt, outcome DESC")
    assert [r[2:] for r in rows] == [("started", 1), ("failed", 1), ("started", 2), ("failed", 2)] + [
        ("started", n) if i % 2 == 0 else ("failed", n) for n in (3, 4, 5) for i in (0, 1)]


def test_a_restart_or_lost_events_never_repeat_an_analysis(tmp_path, hub, blobs):
    first_base = hub.publish("org/base", blobs[0])
    hub.publish("org/tuned", blobs[1])
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n'))
    clock = _Clock()
    assert tick(watch, clock=clock).count("complete") == 1
    for f in (tmp_path / "store" / "watch").rglob("*.parquet"):
        f.unlink()  # "already analysed" comes from the runs, not from the log
    assert tick(watch, clock=clock).up_to_date == 1
    # published while nobody was watching: found by the next tick
    new = hub.publish("org/tuned", blobs[2])
    r = tick(watch, clock=clock)
    assert (r.count("complete"), r.up_to_date, len(_runs(tmp_path))) == (1, 0, 2)
    assert _runs(tmp_path)[-1][2] == new
    # a new base commit makes every watched revision new again (runs are per base commit)
    rebased = hub.publish("org/base", blobs[3])
    assert tick(watch, clock=clock).count("complete") == 1
    assert [r[3] for r in _runs(tmp_path)] == [first_base, first_base, rebased]


def test_a_commit_that_leaves_the_weights_alone_is_skipped_not_analysed(tmp_path, hub, blobs):
    hub.publish("org/base", blobs[0])
    first = hub.publish("org/tuned", blobs[1])
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n'))
    clock = _Clock()
    (done,) = [e for e in tick(watch, clock=clock).events if e.outcome == "complete"]

    readme = hub.publish("org/tuned", {**blobs[1], "README.md": b"# a model card\n"})  # a README-only commit
    r = tick(watch, clock=clock)
    assert _summary(r) == [("analyse", "org/tuned", ("main",), "skipped", 1)]
    (e,) = r.events
    assert (e.revision, e.run_id) == (readme, done.run_id) and first[:12] in e.reason and "tuned@main" in e.reason
    assert len(_runs(tmp_path)) == 1
    # recorded once: later ticks count it up to date, without asking the Hub for file lists
    asked = len(hub.requests())
    r = tick(watch, clock=clock)
    assert (r.events, r.up_to_date) == ((), 1)
    assert not any("/tree/" in path for _, path, _, _ in hub.requests()[asked:])
    _, rows = query(str(tmp_path / "store"), "SELECT revision, outcome, run_name, run_status, reason FROM watch_events "
                                             "WHERE outcome = 'skipped'")
    assert rows == [(readme, "skipped", "tuned@main", "complete", e.reason)]

    # new weights are analysed; so are the same weights against a new base commit, or with
    # other options (the earlier run does not stand for those)
    moved = hub.publish("org/tuned", {**blobs[2], "README.md": b"# a model card\n"})
    assert _summary(tick(watch, clock=clock))[-1] == ("analyse", "org/tuned", ("main",), "complete", 1)
    hub.publish("org/tuned", {**blobs[2], "README.md": b"# v2 of the card\n"})
    other = dataclasses.replace(watch, options=dataclasses.replace(
        watch.options, diff=dataclasses.replace(watch.options.diff, atol=0.5)))
    assert _summary(tick(other, clock=clock))[-1] == ("analyse", "org/tuned", ("main",), "complete", 1)
    assert [r[2] for r in _runs(tmp_path)] == [first, moved, hub.repos["org/tuned"].branches["main"]]


def test_the_hub_down_is_recorded_once_per_tick_and_recovers(tmp_path, hub, blobs):
    hub.publish("org/base", blobs[0])
    hub.publish("org/tuned", blobs[1])
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n'))
    clock = _Clock()
    hub.fail("")
    r = tick(watch, clock=clock)
    assert _summary(r) == [("resolve_base", "org/base", None, "failed", 1)]
    assert "answered HTTP 503" in r.events[0].error
    hub.heal()
    clock.now += dt.timedelta(minutes=1)
    assert _summary(tick(watch, clock=clock))[:2] == [
        ("resolve_base", "org/base", None, "recovered", 2), ("analyse", "org/tuned", ("main",), "started", 1)]


def test_run_forever_ticks_on_schedule_until_stopped(tmp_path, hub, blobs):
    hub.publish("org/base", blobs[0])
    hub.publish("org/tuned", blobs[1])
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n'))
    watch = dataclasses.replace(watch, schedule=Every(dt.timedelta(seconds=1)))
    stop, ticks = threading.Event(), []

    def on_tick(report, due):
        ticks.append((report.count("complete"), report.up_to_date, (due - report.started_at).total_seconds()))
        if len(ticks) == 2:
            stop.set()

    t0 = time.monotonic()
    run_forever(watch, on_tick=on_tick, stop=stop)
    # the first tick analyses (seconds): the next is due 1 s after it began, or at once when
    # it ran longer than that; the second finds nothing new and keeps the schedule
    assert [t[:2] for t in ticks] == [(1, 0), (0, 1)]
    assert 1.0 <= ticks[0][2] < 120 and ticks[1][2] == 1.0
    assert 0.9 < time.monotonic() - t0 < 120
    assert len(_runs(tmp_path)) == 1


def test_a_branch_watched_as_a_chain_grows_a_chain_of_its_analysed_revisions(tmp_path, hub, blobs):
    hub.publish("org/base", blobs[0])
    first = hub.publish("org/tuned", blobs[1])
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\nchain = true\n'))
    assert watch.tuned[0].chain
    clock = _Clock()
    step = [("analyse", "org/tuned", ("main",), "started", 1), ("analyse", "org/tuned", ("main",), "complete", 1)]
    # the revision's own analysis (atol 1e-5), then step 1 of the chain (against the base, atol 0)
    assert _summary(tick(watch, clock=clock)) == step + step
    second = hub.publish("org/tuned", blobs[2])
    r = tick(watch, clock=clock)
    assert _summary(r) == step + step
    assert (r.events[2].base, r.events[2].base_revision) == ("org/tuned", first)  # the step: against the last
    hub.publish("org/tuned", {**blobs[2], "README.md": b"# card\n"})  # skipped: adds no step
    assert [e.outcome for e in tick(watch, clock=clock).events] == ["skipped"]
    back = hub.publish("org/tuned", blobs[1])  # the weights of the first revision again
    assert _summary(tick(watch, clock=clock)) == step + step
    assert tick(watch, clock=clock).events == ()

    store = str(tmp_path / "store")
    _, chains = query(store, "SELECT chain, step, tuned, tuned_revision FROM chains")
    assert chains == [("org/tuned@main", 1, "org/tuned", first), ("org/tuned@main", 2, "org/tuned", second),
                      ("org/tuned@main", 3, "org/tuned", back)]
    # blobs[i] moved the first i rows (16 entries each) by +1: row 1 moves in step 2, back in step 3
    _, rows = query(store, "SELECT step, numel, changed_vs_base, changed_since_prev, changed_ever, cancelled "
                           "FROM chain_steps('org/tuned@main')")
    assert rows == [(1, 400, 16, 16, 16, 0), (2, 400, 32, 16, 32, 0), (3, 400, 16, 16, 32, 16)]
    _, (total,) = query(store, "SELECT numel, never_updated, cancelled, subnetwork FROM chain_summary('org/tuned@main') "
                               "WHERE module IS NULL")
    assert total == (400, 1 - 32 / 400, 16 / 400, 16 / 400)


# ------------------------------------------------------------------ the command, end to end


def _pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(16, generator=g).bfloat16()}
    write_checkpoint(tmp_path / "hub" / "base", base, shards=2)
    for k in (1, 2, 3, 4):
        t = {n: v.clone() for n, v in base.items()}
        t["model.layers.0.mlp.up_proj.weight"][:k] += 1
        write_checkpoint(tmp_path / "hub" / f"t{k}", t)
    (tmp_path / "hub" / "broken").mkdir()
    (tmp_path / "hub" / "broken" / "model.safetensors").write_bytes(b"\x40" + b"\0" * 7 + b"{}")


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float) -> list[str]:
    """stdout lines of ``proc`` up to the first starting with ``prefix`` (read by a thread, so
    no line waits in a buffer while we wait on the pipe)."""
    lines: list[str] = []
    seen = threading.Event()

    def reader() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                seen.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    if not seen.wait(timeout):
        proc.kill()
        raise AssertionError(f"no {prefix!r} line in {timeout}s: {lines} {proc.stderr.read()}")
    return lines


def test_watch_command_end_to_end(tmp_path):
    """Long-running watch, stopped by SIGTERM; `--once` after the restart changes nothing; a
    revision published between two ticks gives exactly one new complete run."""
    _pair(tmp_path)
    store = tmp_path / "store"
    wf = _write(tmp_path, f'base = "org/base@main"\nstore = "{store}"\nevery = "1h"\n'
                          '[options]\nrank = "off"\nworkers = 1\n[retry]\nfirst = "1h"\n'
                          '[[tuned]]\nrepo = "org/tuned-*"\ntags = ["v*"]\n[[tuned]]\nrepo = "org/broken"\n')
    with FakeHub(TOKEN) as hub:
        hub.publish("org/base", files_of(tmp_path / "hub" / "base"))
        v1 = hub.publish("org/tuned-a", files_of(tmp_path / "hub" / "t1"), tags=("v1",))
        hub.publish("org/tuned-a", files_of(tmp_path / "hub" / "t2"))
        hub.publish("org/tuned-b", files_of(tmp_path / "hub" / "t3"), private=True)
        hub.publish("org/broken", files_of(tmp_path / "hub" / "broken"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_TOKEN=TOKEN,
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        cmd = [sys.executable, "-m", "raydiff.cli.main", "watch", str(wf)]
        outputs = []

        # 1. the long-running form: first tick at once, then sleep for an hour; SIGTERM stops it
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = _read_until(proc, "tick ", timeout=120)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and err.rstrip().endswith("watch: stopped"), err
        outputs += lines + [err]
        assert lines[-1].startswith("tick ") and "3 analysed, 1 failed, 0 up to date" in lines[-1]
        assert f"org/tuned-a@v1 {v1[:12]}: complete run " in "\n".join(lines)
        failed = [ln for ln in lines if ln.startswith("org/broken@main") and "failed" in ln]
        assert len(failed) == 1 and "truncated" in failed[0]

        def once():
            p = subprocess.run(cmd + ["--once"], env=env, capture_output=True, text=True, timeout=180)
            assert p.returncode == 0, p.stderr
            outputs.extend([p.stdout, p.stderr])
            return p.stdout.strip().splitlines()

        def complete_runs():
            return query(str(store), "SELECT run_id, name, tuned, tuned_revision FROM runs WHERE status = 'complete' ORDER BY run_id")[1]

        # 2. a restart with nothing new: nothing analysed, the broken revision keeps backing off
        runs_before = complete_runs()
        assert len(runs_before) == 3
        lines = once()
        assert len(lines) == 1 and "0 analysed, 0 failed, 3 up to date, 1 backing off until" in lines[0], lines
        assert complete_runs() == runs_before

        # 3. a revision published between two ticks: exactly one new complete run, for it
        new = hub.publish("org/tuned-b", files_of(tmp_path / "hub" / "t4"))
        lines = once()
        assert "1 analysed, 0 failed, 2 up to date, 1 backing off until" in lines[-1], lines  # old main: not watched
        added = set(complete_runs()) - set(runs_before)
        assert [(n, t, r) for _, n, t, r in added] == [("tuned-b@main", "org/tuned-b", new)]

        # the store says what happened, and no token went anywhere but the Hub
        cols, rows = query(str(store), "SELECT action, repo, outcome, run_status FROM watch_events "
                                       "WHERE outcome <> 'started' ORDER BY recorded_at")
        assert rows == [("analyse", "org/tuned-a", "complete", "complete")] * 2 + [
            ("analyse", "org/tuned-b", "complete", "complete"), ("analyse", "org/broken", "failed", None),
            ("analyse", "org/tuned-b", "complete", "complete")]
        stored = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())
        assert TOKEN.encode() not in stored and all(TOKEN not in o for o in outputs)
        assert not any(had_token for _, _, had_token, _ in hub.requests("cdn"))
        assert any(had_token for _, _, had_token, _ in hub.requests("hub"))
