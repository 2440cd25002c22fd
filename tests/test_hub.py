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
from raydiff.query.views import query

TOKEN = "hf_RightTokenNeverLoggedAnywhere012"
WRONG = "hf_WrongTokenNeverLoggedAnywhere345"

_RESOLVE = r"""
import json, os, sys
from pathlib import Path
from raydiff.errors import RaydiffError
from raydiff.inputs.refs import identify, resolve

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
                        "root": ck.root, "shards": [s.path.rsplit("/", 1)[1] for s in ck.shards],
                        "config": ck.config, "tensors": {n: t.file for n, t in ck.tensors.items()}})
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
        priv = hub.publish("org/priv", tuned, private=True)
        hub.publish("org/gated", tuned, gated=True)
        hub.publish("org/down", tuned)
        hub.fail("/api/models/org/down")
        pickled = hub.publish("org/pickled", {"model.safetensors": b"\x80\x04" + b"\0" * 64})
        header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
        cut = hub.publish("org/cut", {"model.safetensors": len(header).to_bytes(8, "little") + header + b"\0" * 5})
        steps = ["org/base", "org/base@v1", f"org/base@{v1}", "TOUCH", "org/base@main", "org/base@dev",
                 "org/priv", "NO_TOKEN", "org/priv", f"HF_TOKEN={TOKEN}", "org/priv", f"HF_TOKEN={WRONG}",
                 "org/gated", "org/base@nope", "org/down", "org/pickled", "org/cut"]
        p = subprocess.run([sys.executable, "-c", _RESOLVE, json.dumps(steps)], env=_env(tmp_path, hub, WRONG),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)

        # main, v1 and the sha name one commit: one identity, whatever the cache files' dates
        first = out[0]
        assert (first["ref"], first["revision"]) == ("org/base", v1)
        assert first["identify"] == [first["ref"], first["revision"], first["fingerprint"]]
        assert out[1] == out[2] == out[3] == first
        # planned from the Hub: tensors located at the commit, the pickle beside them ignored
        assert first["root"] == f"hf://org/base@{v1}" and first["config"] == {"model_type": "llama"}
        assert first["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert first["tensors"] == {"model.layers.0.mlp.up_proj.weight": f"hf://org/base@{v1}/model-00001-of-00002.safetensors",
                                    "model.norm.weight": f"hf://org/base@{v1}/model-00002-of-00002.safetensors"}
        assert out[4]["revision"] == v2 and out[4]["fingerprint"] != first["fingerprint"]

        assert out[5:7] == [
            "CheckpointNotFound: org/priv: no such Hub repo, or it is private and the token in use (HF_TOKEN or "
            "`hf auth login`) cannot read it; check the name, or use a token with read access to the repo",
            "CheckpointNotFound: org/priv: no such Hub repo, or it is private and no token is set; check the name, "
            "or log in (`hf auth login`) or set HF_TOKEN to a token with read access to the repo",
        ]
        # with the right token the private repo resolves, to its commit, planned like any other
        assert isinstance(out[7], dict), out[7]
        assert (out[7]["ref"], out[7]["revision"], out[7]["shards"]) == ("org/priv", priv, ["model.safetensors"])
        assert out[7]["tensors"] == {n: f"hf://org/priv@{priv}/model.safetensors" for n in first["tensors"]}
        assert out[8:] == [
            f"CheckpointNotFound: org/gated: the repo is gated; accept its conditions at {hub.url}/org/gated with your "
            "Hub account, then log in with that account (`hf auth login`) or set HF_TOKEN to one of its tokens",
            "CheckpointNotFound: org/base@nope: the repo has no revision 'nope'",
            f"HubError: org/down: the Hub at {hub.url} answered HTTP 503; try again later",
            f"InvalidCheckpoint: hf://org/pickled@{pickled}/model.safetensors: is a pickle (or torch.save zip) under a "
            ".safetensors name, not safetensors; raydiff never unpickles files (loading one can run arbitrary code). "
            "Convert it to safetensors in a trusted environment (e.g. `safetensors.torch.save_file(torch.load(f, "
            "weights_only=True), out)`) and point raydiff at the result",
            f'InvalidCheckpoint: hf://org/cut@{cut}/model.safetensors: tensor "w": data_offsets [0, 8] lie outside the '
            "file's 5 data bytes; the file is truncated or corrupt",
        ]

        # resolving read no tensor byte: only header ranges went to the CDN, no weights are
        # cached, and the pickle was never asked for; the token stayed on the Hub
        cdn = hub.requests("cdn")
        assert cdn and all(m == "GET" for m, _, _, _ in cdn)
        for blob in {path for _, path, _, _ in cdn}:  # the length prefix, then exactly the header
            got = [r for _, path, _, r in cdn if path == blob]
            assert got[0::2] == ["bytes=0-7"] * len(got[0::2]), got  # a refused prefix ends there
            assert all(r.startswith("bytes=8-") for r in got[1::2]), got
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".safetensors")]
        assert not any("pytorch_model.bin" in path for _, path, _, _ in hub.requests("hub"))
        assert not any(had for _, _, had, _ in cdn)
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
    from raydiff.inputs.hub import redact

    monkeypatch.setenv("HF_TOKEN", "short-but-in-use")
    assert redact(f"GET /x with Bearer {TOKEN} for short-but-in-use, using hf_transfer") == (
        "GET /x with Bearer *** for ***, using hf_transfer")
    assert redact(f"see {WRONG}.") == "see ***."


def _byte_ranges(requests, blob_path):
    """``[(first, end)]`` of the Range GETs the CDN served for one blob, in order."""
    out = []
    for method, path, _, rng in requests:
        if path.split("?")[0] == blob_path and method == "GET":
            assert rng and rng.startswith("bytes="), f"a whole-file GET of {blob_path}"
            a, b = rng[6:].split("-")
            out.append((int(a), int(b) + 1))
    return out


def _spans(directory):
    """Shard name → {tensor: (first byte, end)}, read with json alone (not raydiff's parser)."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        out[f.name] = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}
    return out


def test_submit_from_the_hub_reads_headers_then_only_the_compared_bytes(tmp_path):
    from builders import perturb, ref_diff

    g = torch.Generator().manual_seed(1)
    layers = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    base = {n: torch.randn(96, 64, generator=g).bfloat16() for n in layers}
    base["model.embed_tokens.weight"] = torch.randn(50, 64, generator=g).bfloat16()
    base["model.vision.only_in_base.weight"] = torch.randn(300, 64, generator=g).bfloat16()
    tuned = {n: perturb(t, 0.3, 1e-2, seed=i) for i, (n, t) in enumerate(base.items()) if "only_in_base" not in n}
    cfg = {"model_type": "llama", "tie_word_embeddings": False}
    write_checkpoint(tmp_path / "base", base, config=cfg,
                     shards=[layers[:2], [layers[2], "model.embed_tokens.weight"], ["model.vision.only_in_base.weight"]])
    write_checkpoint(tmp_path / "tuned", tuned, shards=2, config=cfg)
    want = {n: ref_diff(base[n], tuned[n]) for n in tuned}
    with FakeHub(TOKEN) as hub:
        hub.publish("org/base", files_of(tmp_path / "base"))
        hub.publish("org/tuned", files_of(tmp_path / "tuned"), private=True)
        blob = {name: f"/cdn/{hashlib.sha256(data).hexdigest()}"
                for name, data in {**{f"base/{k}": v for k, v in files_of(tmp_path / "base").items()},
                                   **{f"tuned/{k}": v for k, v in files_of(tmp_path / "tuned").items()}}.items()}
        # one tuned data range breaks off halfway: the actor asks again
        hub.drop_once.add(blob["tuned/model-00001-of-00002.safetensors"].rsplit("/", 1)[1])
        env = _env(tmp_path, hub, TOKEN)
        cmd = [sys.executable, "-m", "raydiff.cli.main", "submit", "org/base", "org/tuned", "--rank", "off",
               "--workers", "2", "--chunk-elems", "2048", "--store", str(tmp_path / "ranges")]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        cdn = hub.requests("cdn")

        # counts equal numpy's on the same tensors; the unmatched one is listed, not read
        _, rows = query(str(tmp_path / "ranges"), "SELECT tensor, status, changed, changed_bits, rows_touched "
                                                  "FROM tensors ORDER BY tensor")
        assert rows == sorted([(n, "ok", w["changed"], w["changed_bits"], w["rows_touched"]) for n, w in want.items()]
                              + [("model.vision.only_in_base.weight", "only_in_base", None, None, None)])
        assert sum(w["changed"] for w in want.values()) > 0

        # each shard: its 8-byte prefix and its exact header first, then only the compared
        # tensors' bytes, each byte once (the dropped range asked twice), no whole-file GET
        for side in ("base", "tuned"):
            for shard, spans in _spans(tmp_path / side).items():
                got = _byte_ranges(cdn, blob[f"{side}/{shard}"])
                data_start = min((a for a, _ in spans.values()), default=None)
                assert got[:2] == [(0, 8), (8, data_start)], (side, shard, got[:2])
                data = sorted(set(got[2:]))
                want_spans = sorted(s for n, s in spans.items() if "only_in_base" not in n)
                assert [r for r in data if r[0] < r[1]] == data
                merged = []
                for a, b in data:
                    assert not merged or a >= merged[-1][1], f"{shard}: bytes asked twice"
                    if merged and a == merged[-1][1]:
                        merged[-1] = (merged[-1][0], b)
                    else:
                        merged.append((a, b))
                assert merged == _merge(want_spans), (side, shard)
                if side == "tuned" and shard == "model-00001-of-00002.safetensors":
                    assert len(got[2:]) == len(data) + 1  # the dropped range, asked again
                else:
                    assert len(got[2:]) == len(data)
        assert not any(had for _, _, had, _ in cdn)  # the token never left the Hub
        assert not [f for f in (tmp_path / "cache").rglob("*.safetensors")]  # nothing written to disk

        # --hub-fetch cache: actors download only the shards the plan needs into the node's cache
        cmd[-1] = str(tmp_path / "cached")
        before = len(hub.requests("cdn"))
        p = subprocess.run(cmd + ["--hub-fetch", "cache"], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        _, again = query(str(tmp_path / "cached"), "SELECT tensor, status, changed, changed_bits, rows_touched "
                                                   "FROM tensors ORDER BY tensor")
        assert again == rows
        cached = sorted(f.name for f in (tmp_path / "cache").rglob("*.safetensors"))
        assert cached == sorted(["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                 "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
        whole = [path.split("?")[0] for m, path, _, r in hub.requests("cdn")[before:] if m == "GET" and r is None]
        assert sorted(whole) == sorted(v for k, v in blob.items() if k.endswith(".safetensors") and "00003-of" not in k)
        assert TOKEN not in p.stdout + p.stderr


def _merge(spans):
    out = []
    for a, b in spans:
        if out and a == out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
