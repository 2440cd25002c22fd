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
    """
    import logging

    import ray

    from fake_hub import WORKER_TOKEN

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"HF_TOKEN": WORKER_TOKEN}})
    yield ray
    ray.shutdown()
