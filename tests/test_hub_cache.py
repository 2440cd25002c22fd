"""Hub references resolve from a local Hugging Face cache, offline, through the real client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from builders import write_checkpoint

SHA_BASE = "a" * 40
SHA_TUNED = "b" * 40


def _cache_repo(cache, repo_id, sha, tensors):
    root = cache / f"models--{repo_id.replace('/', '--')}"
    write_checkpoint(root / "snapshots" / sha, tensors, shards=2)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)


def test_submit_hub_refs_from_offline_cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=g).bfloat16(), "b": torch.randn(30, generator=g).bfloat16()}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["w"][:5] += 1
    cache = tmp_path / "hf"
    _cache_repo(cache, "org/base", SHA_BASE, base)
    _cache_repo(cache, "org/tuned", SHA_TUNED, tuned)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_TOKEN="hf_secret_never_logged")
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "raydiff.cli.main", "submit", "org/base", "org/tuned@main", "--store", str(store),
           "--rank", "off", "--workers", "1"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    run_id = p.stdout.strip()
    q = [sys.executable, "-m", "raydiff.cli.main", "sql", "--store", str(store), "--format", "json",
         "SELECT base, base_revision, tuned, tuned_revision, changed, status FROM runs"]
    rows = json.loads(subprocess.run(q, env=env, capture_output=True, text=True, check=True).stdout)
    assert rows == [{"base": "org/base", "base_revision": SHA_BASE, "tuned": "org/tuned",
                     "tuned_revision": SHA_TUNED, "changed": 5 * 30, "status": "complete"}]
    assert len(run_id) == 20
    stored = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())
    assert b"hf_secret_never_logged" not in stored and "hf_secret" not in p.stderr
    # a repo missing from the cache, offline: a clear one-line error
    cmd[4] = "org/absent"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "Error: org/absent: not in the local Hugging Face cache and the Hub cannot be reached "
        "(HF_HUB_OFFLINE is set or there is no network); download it first or unset HF_HUB_OFFLINE"]
