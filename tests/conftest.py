"""Test-wide environment (see STACK.md): no network attempts, Ray without token auth for the
local test clusters, fast Ray Train health checks. Set before any test imports Ray or datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def ipc_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A short directory for ipc:// endpoints (Unix socket paths are limited to ~107 bytes),
    removed with pytest's other temporary directories."""
    return str(tmp_path_factory.mktemp("ipc"))
