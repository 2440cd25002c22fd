"""Hub references through the real ``huggingface_hub`` client against a local Hub.

``tests/fake_hub.py`` serves, on 127.0.0.1, the endpoints the client calls (model info,
refs, tree, resolve with LFS redirects to a "CDN" port). Each test runs raydiff in a
subprocess whose environment sets ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HOME`` and
``HF_TOKEN``, as a user would; nothing touches the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import torch

from builders import write_checkpoint
from fake_hub import FakeHub, files_of
from raydiff.views import query

TOKEN = "hf_RightTokenNeverLoggedAnywhere012"
WRONG = "hf_WrongTokenNeverLoggedAnywhere345"

_RESOLVE = r"""
import json, os, sys
from pathlib import Path
from raydiff.errors import RaydiffError
from raydiff.refs import identify, resolve

out = []
for step in json.loads(sys.argv[1]):
    if step == "TOUCH":  # re-date every cached file: a Hub checkpoint's identity must not move
        for p in Path(os.environ["HF_HUB_CACHE"]).rglob("*"):
            if p.is_file():
                os.utime(p, (1, 1))
    elif step.startswith("HF_TOKEN="):
        os.environ["HF_TOKEN"] = step.split("=", 1)[1]
    elif step == "NO_TOKEN":
        del os.environ["HF_TOKEN"]
    else:
        try:
            ck, ident = resolve(step), identify(step)
            out.append({"ref": ck.ref, "revision": ck.revision, "fingerprint": ck.fingerprint,
                        "identify": [ident.ref, ident.revision, ident.fingerprint],
                        "files": sorted(os.listdir(ck.root))})
        except RaydiffError as e:
            out.append(f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


def _checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(40, 30, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(30, generator=g).bfloat16()}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.weight"][:5] += 1
    write_checkpoint(tmp_path / "base", base, shards=2, config={"model_type": "llama"})
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle: never fetched")
    write_checkpoint(tmp_path / "tuned", tuned)
    return files_of(tmp_path / "base"), files_of(tmp_path / "tuned")


def _env(tmp_path, hub, token):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf-home"),
               HF_TOKEN=token, HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def test_hub_refs_resolve_to_one_identity_per_commit_and_errors_say_what_to_do(tmp_path):
    base, tuned = _checkpoints(tmp_path)
    with FakeHub(TOKEN) as hub:
        v1 = hub.publish("org/base", base, tags=("v1",))
        v2 = hub.publish("org/base", tuned, branch="dev")
        hub.publish("org/priv", tuned, private=True)
        hub.publish("org/gated", tuned, gated=True)
        hub.publish("org/down", tuned)
        hub.fail("/api/models/org/down")
        # a 12 MB shard whose first download breaks off near its end: resumed with a Range request
        big = files_of(write_checkpoint(tmp_path / "big", {"w": torch.zeros(6 << 20, dtype=torch.bfloat16)}))
        hub.publish("org/flaky-net", big)
        hub.drop_once.add(hashlib.sha256(big["model.safetensors"]).hexdigest())
        steps = ["org/base", "org/base@v1", f"org/base@{v1}", "TOUCH", "org/base@main", "org/base@dev",
                 "org/priv", "NO_TOKEN", "org/priv", f"HF_TOKEN={TOKEN}", "org/priv", f"HF_TOKEN={WRONG}",
                 "org/gated", "org/base@nope", "org/down", "org/flaky-net"]
        p = subprocess.run([sys.executable, "-c", _RESOLVE, json.dumps(steps)], env=_env(tmp_path, hub, WRONG),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)

        # main, v1 and the sha name one commit: one identity, whatever the cache files' dates
        first = out[0]
        assert (first["ref"], first["revision"]) == ("org/base", v1)
        assert first["identify"] == [first["ref"], first["revision"], first["fingerprint"]]
        assert out[1] == out[2] == out[3] == first
        assert first["files"] == ["config.json", "model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors", "model.safetensors.index.json"]  # no pickle
        assert out[4]["revision"] == v2 and out[4]["fingerprint"] != first["fingerprint"]

        assert out[5:] == [
            "CheckpointNotFound: org/priv: no such Hub repo, or it is private and the token in use (HF_TOKEN or "
            "`hf auth login`) cannot read it; check the name, or use a token with read access to the repo",
            "CheckpointNotFound: org/priv: no such Hub repo, or it is private and no token is set; check the name, "
            "or log in (`hf auth login`) or set HF_TOKEN to a token with read access to the repo",
            out[7] if isinstance(out[7], dict) else "resolves with the right token",
            f"CheckpointNotFound: org/gated: the repo is gated; accept its conditions at {hub.url}/org/gated with your "
            "Hub account, then log in with that account (`hf auth login`) or set HF_TOKEN to one of its tokens",
            "CheckpointNotFound: org/base@nope: the repo has no revision 'nope'",
            f"HubError: org/down: the Hub at {hub.url} cannot be reached or failed, and it is not in the local cache; "
            "check the network (and HF_ENDPOINT), then try again",
            out[11] if isinstance(out[11], dict) else "resolves after a dropped download",
        ]
        assert out[7]["ref"] == "org/priv" and out[11]["ref"] == "org/flaky-net"

        # the dropped download resumed with a Range request; the token stayed on the Hub
        assert any(r and r.startswith("bytes=") for _, _, _, r in hub.requests("cdn"))
        assert not any(had for _, _, had, _ in hub.requests("cdn"))
        assert any(had for _, _, had, _ in hub.requests("hub"))
        assert TOKEN not in p.stdout + p.stderr and WRONG not in p.stdout + p.stderr


def test_submit_hub_refs_records_commits_and_same_commit_same_run(tmp_path):
    base, tuned = _checkpoints(tmp_path)
    with FakeHub(TOKEN) as hub:
        v1 = hub.publish("org/base", base, tags=("v1",))
        sha = hub.publish("org/tuned", tuned, private=True)
        env = _env(tmp_path, hub, TOKEN)
        store = tmp_path / "store"
        cmd = [sys.executable, "-m", "raydiff.cli.main", "submit", "org/base@v1", "org/tuned", "--store", str(store),
               "--rank", "off", "--workers", "1"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        run_id = p.stdout.strip()
        # the same commits named by sha and by branch: the same run, already complete (no Ray needed)
        cmd[4:6] = [f"org/base@{v1}", "org/tuned@main"]
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and again.stdout.strip() == run_id, again.stderr
        assert "already complete" in again.stderr
        _, rows = query(str(store), "SELECT base, base_revision, tuned, tuned_revision, name, changed, status FROM runs")
        assert rows == [("org/base", v1, "org/tuned", sha, "tuned", 5 * 30, "complete")]
        stored = b"".join(f.read_bytes() for f in store.rglob("*") if f.is_file())
        assert TOKEN.encode() not in stored
        assert all(TOKEN not in s for s in (p.stdout, p.stderr, again.stdout, again.stderr))


def test_messages_are_scrubbed_of_tokens(monkeypatch):
    from raydiff.hub import redact

    monkeypatch.setenv("HF_TOKEN", "short-but-in-use")
    assert redact(f"GET /x with Bearer {TOKEN} for short-but-in-use, using hf_transfer") == (
        "GET /x with Bearer *** for ***, using hf_transfer")
    assert redact(f"see {WRONG}.") == "see ***."
