"""Shared fixtures: one real local Ray cluster for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real 2-CPU local Ray cluster shared by every test that submits work."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
