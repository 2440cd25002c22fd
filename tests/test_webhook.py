"""`raydiff watch --webhook`: real HTTP requests to the listener on 127.0.0.1 (an ephemeral
port), the watch loop running for real against the local fake Hub (``tests/fake_hub.py``),
and — for the burst — the real ``submit`` on the shared Ray cluster."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fake_hub import FakeHub
from raydiff.cli.main import app
from raydiff.store import Store
from raydiff.watch import Listener, Triggers, load, run_forever
from raydiff.watch.webhook import MAX_BODY, SECRET_ENV
from test_watch import TOKEN, _read_until, _runs, _watch_file, blobs, hub  # noqa: F401 - fixtures of test_watch.py

SECRET = "s3cret-for-tests"


def _payload(repo="org/tuned", refs=(("refs/heads/main", "a" * 40),), scope="repo.content", kind="model"):
    body = {"event": {"action": "update", "scope": scope},
            "repo": {"type": kind, "name": repo, "id": "6366c000a2abcdf2fd69a080", "private": False,
                     "headSha": "a" * 40},
            "webhook": {"id": "6390e855e30d9209411de93b", "version": 3}}
    if refs is not None:
        body["updatedRefs"] = [{"ref": r, "oldSha": None, "newSha": s} for r, s in refs]
    return json.dumps(body).encode()


def _post(url, body=b"", secret=SECRET, method="POST", path="/webhook"):
    """(status, answer) of one real HTTP request."""
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Webhook-Secret"] = secret
    req = urllib.request.Request(url.rsplit("/", 1)[0] + path, data=body if method != "GET" else None,
                                 headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class _Loop:
    """``run_forever`` with a listener, in a thread, as ``raydiff watch --webhook`` runs them."""

    def __init__(self, watch) -> None:
        self.watch, self.triggers, self.stop = watch, Triggers(), threading.Event()
        self.ticks: list[tuple[dt.datetime, dt.datetime, object]] = []  # (start, end, report)
        self.ticked = threading.Condition()
        self.listener = Listener(watch, self.triggers, "127.0.0.1:0", on_request=lambda *a: None)
        self.thread = threading.Thread(target=run_forever, args=(watch,), daemon=True,
                                       kwargs=dict(on_tick=self._on_tick, stop=self.stop, triggers=self.triggers))

    def _on_tick(self, report, due) -> None:
        with self.ticked:
            self.ticks.append((report.started_at, _now(), report))
            self.ticked.notify_all()

    def wait_ticks(self, n: int, timeout: float = 120) -> list:
        with self.ticked:
            assert self.ticked.wait_for(lambda: len(self.ticks) >= n, timeout), self.ticks
            return list(self.ticks)

    def __enter__(self) -> _Loop:
        self.listener.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)
        self.listener.close()
        assert not self.thread.is_alive()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def quiet_hub(monkeypatch, tmp_path):
    """The fake Hub without the Ray cluster: for ticks that analyse nothing."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHub(TOKEN) as h:
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        yield h


def _store_state(tmp_path):
    store = Store(str(tmp_path / "store"))
    return len(store.watch_events()), sorted(store.catalog().run_ids)


def test_bad_requests_are_answered_and_start_nothing(tmp_path, quiet_hub):
    quiet_hub.publish("org/base", {"README.md": b"base"})
    quiet_hub.publish("org/tuned", {"README.md": b"x"}, branch="dev")  # main is watched: nothing to analyse
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n[[tuned]]\nrepo = "org/fam-*"\ntags = ["v*"]\n'))
    with _Loop(watch) as loop:
        loop.wait_ticks(1)
        url = loop.listener.url
        before = _store_state(tmp_path)
        raw = socket.create_connection(loop.listener.server.server_address[:2])
        raw.sendall(f"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: {SECRET}\r\n\r\n".encode())
        no_length = raw.recv(4096).split(b" ", 2)[1]
        raw.close()
        answers = {
            "get": _post(url, method="GET"),
            "put": _post(url, _payload(), method="PUT"),
            "path": _post(url, _payload(), path="/hook"),
            "no secret": _post(url, _payload(), secret=None),
            "wrong secret": _post(url, _payload(), secret=SECRET + "x"),
            "empty secret": _post(url, _payload(), secret=""),
            "too big": _post(url, b" " * (MAX_BODY + 1)),
            "not json": _post(url, b"{not json"),
            "not an object": _post(url, b"[1, 2]"),
            "no event": _post(url, json.dumps({"repo": {"name": "org/tuned", "type": "model"}}).encode()),
            "bad refs": _post(url, json.dumps({**json.loads(_payload()), "updatedRefs": "main"}).encode()),
            "unknown repo": _post(url, _payload("org/other")),
            "dataset": _post(url, _payload(kind="dataset")),
            "comment": _post(url, _payload(scope="discussion.comment", refs=None)),
            "unwatched branch": _post(url, _payload(refs=[("refs/heads/dev", "b" * 40)])),
            "a pull request": _post(url, _payload(refs=[("refs/pr/3", "b" * 40)])),
            "deleted main": _post(url, _payload(refs=[("refs/heads/main", None)])),
            "untagged fam": _post(url, _payload("org/fam-a", refs=[("refs/tags/rc1", "b" * 40)])),
        }
        codes = {k: (v[0], v[1].get("status")) for k, v in answers.items()}
        assert no_length == b"411"
        assert codes == {
            "get": (405, "rejected"), "put": (405, "rejected"), "path": (404, "rejected"),
            "no secret": (401, "rejected"), "wrong secret": (403, "rejected"), "empty secret": (403, "rejected"),
            "too big": (413, "rejected"), "not json": (400, "rejected"), "not an object": (400, "rejected"),
            "no event": (400, "rejected"), "bad refs": (400, "rejected"), "unknown repo": (404, "rejected"),
            "dataset": (202, "ignored"), "comment": (202, "ignored"), "unwatched branch": (202, "ignored"),
            "a pull request": (202, "ignored"), "deleted main": (202, "ignored"), "untagged fam": (202, "ignored"),
        }, codes
        assert "not watched" in answers["unknown repo"][1]["message"]
        assert _post(url, method="GET", path="/healthz")[0] == 200
        time.sleep(0.5)
        assert (len(loop.ticks), loop.triggers.pending(), _store_state(tmp_path)) == (1, [], before)

        # a good one ticks that repo at once (here: nothing new on main, so nothing to analyse)
        t0 = _now()
        assert _post(url, _payload())[1]["status"] == "queued"
        (start, end, report), = loop.wait_ticks(2)[1:]
        assert report.only == "org/tuned" and report.events == () and (end - t0).total_seconds() < 5
        print(f"webhook → tick started {(start - t0).total_seconds():.3f} s, done {(end - t0).total_seconds():.3f} s")


def test_a_burst_of_identical_webhooks_starts_one_analysis(tmp_path, hub, blobs, monkeypatch):  # noqa: F811
    monkeypatch.setenv(SECRET_ENV, SECRET)
    hub.publish("org/base", blobs[0])
    hub.publish("org/tuned", blobs[1])
    watch = load(_watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n[[tuned]]\nrepo = "org/quiet"\n'))
    hub.publish("org/quiet", blobs[2])
    with _Loop(watch) as loop:
        loop.wait_ticks(1)  # the first tick at start: both repos analysed
        assert len(_runs(tmp_path)) == 2
        new = hub.publish("org/tuned", blobs[4])
        n, answers, barrier = 8, [], threading.Barrier(8)

        def post():
            barrier.wait()
            answers.append(_post(loop.listener.url, _payload(refs=[("refs/heads/main", new)])))

        threads = [threading.Thread(target=post) for _ in range(n)]
        t0 = _now()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ticks = loop.wait_ticks(2)
        time.sleep(0.5)  # no second tick comes
        ticks = loop.wait_ticks(2)
        assert len(ticks) == 2, [t[2].only for t in ticks]
        assert sorted(a[1]["status"] for a in answers) == ["duplicate"] * (n - 1) + ["queued"]
        assert {a[0] for a in answers} == {202}
        start, end, report = ticks[1]
        assert report.only == "org/tuned" and [e.outcome for e in report.events] == ["started", "complete"]
        assert report.events[0].revision == new
        assert ticks[0][1] <= start  # ticks never overlap
        print(f"burst of {n}: webhook → tick started {(start - t0).total_seconds():.3f} s, "
              f"analysed in {(end - start).total_seconds():.1f} s")
    runs = _runs(tmp_path)
    assert len(runs) == 3 and [r[2] for r in runs].count(new) == 1
    started = [e for e in Store(str(tmp_path / "store")).watch_events() if e.outcome == "started" and e.revision == new]
    assert len(started) == 1


# ------------------------------------------------------------------ the command


def test_watch_webhook_needs_a_secret_and_the_long_running_form(tmp_path, monkeypatch):
    wf = _watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n')
    monkeypatch.delenv(SECRET_ENV, raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["watch", str(wf), "--webhook", "127.0.0.1:0"])
    assert r.exit_code == 1 and f"Error: --webhook needs the webhook's shared secret in ${SECRET_ENV}" in r.output
    monkeypatch.setenv(SECRET_ENV, SECRET)
    r = runner.invoke(app, ["watch", str(wf), "--webhook", "127.0.0.1:0", "--once"])
    assert r.exit_code == 1 and "Error: --webhook listens for as long as the watch runs; drop --once" in r.output
    r = runner.invoke(app, ["watch", str(wf), "--webhook", "localhost"])
    assert r.exit_code == 1 and "Error: --webhook must be HOST:PORT" in r.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = runner.invoke(app, ["watch", str(wf), "--webhook", f"127.0.0.1:{port}"])
    assert r.exit_code == 1 and f"Error: --webhook 127.0.0.1:{port}: cannot listen" in r.output


def test_watch_webhook_command_end_to_end(tmp_path):
    """The real command: it says where it listens, ticks the repo a webhook names, stops on SIGTERM."""
    with FakeHub(TOKEN) as h:
        h.publish("org/base", {"README.md": b"base"})
        h.publish("org/tuned", {"README.md": b"x"}, branch="dev")
        wf = _watch_file(tmp_path, '[[tuned]]\nrepo = "org/tuned"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
        env.update(HF_ENDPOINT=h.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_TOKEN=TOKEN, **{SECRET_ENV: SECRET})
        proc = subprocess.Popen([sys.executable, "-m", "raydiff.cli.main", "watch", str(wf), "--webhook", "127.0.0.1:0"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).parent.parent)
        try:
            _read_until(proc, "tick ", timeout=60)
            line = ""
            while "listening for Hub webhooks on " not in line:
                line = proc.stderr.readline()
                assert line, "no listening line"
            url = line.rsplit(" ", 1)[1].strip()
            assert _post(url, _payload(refs=[("refs/heads/main", "c" * 40)]))[0] == 202
            ticked = _read_until(proc, "tick ", timeout=60)[-1]
            assert "(webhook: org/tuned): 0 analysed, 0 failed, 0 up to date" in ticked
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0 and "webhook 202 queued: org/tuned: cccccccccccc" in err, err
        assert err.rstrip().endswith("watch: stopped"), err
