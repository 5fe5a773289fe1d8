"""A session-wide local Ray for tests that need one (import ``ray_local`` into the test module)."""

from __future__ import annotations

import os

import pytest

for _key, _value in {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)  # conftest sets these too; Ray workers inherit them at init


@pytest.fixture(scope="session")
def ray_local():
    """Local Ray with 2 CPUs and no dashboard; reused when a test session already started one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
