"""Shared fixtures: one real local Ray cluster for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real 2-CPU local Ray cluster shared by every test that submits work.

    Its workers hold ``HF_TOKEN`` = :data:`fake_hub.WORKER_TOKEN`, as every node of a real
    cluster holds the token from its Secret: in-process tests that analyse a private repo on
    the local fake Hub start that Hub with this token.

    ``RAYDIFF_TEST_RAY`` (a cluster's address) joins a cluster that outlives the session
    instead: ``tests/mutation/run.py`` keeps one per worker, so that a mutant does not pay
    for a cluster's start.
    """
    import logging

    import ray

    from fake_hub import WORKER_TOKEN

    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False,
                  runtime_env={"env_vars": {"HF_TOKEN": WORKER_TOKEN}})
    held = os.environ.get("RAYDIFF_TEST_RAY")
    if held:  # a cluster kept across test sessions (the mutation runner's): this session's job joins it
        ray.init(address=held, **kwargs)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, **kwargs)
    yield ray
    ray.shutdown()
