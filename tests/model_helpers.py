"""Small real models shared by the tests (random weights; the architecture is the real one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from core_model.config import ResoLLMConfig
from core_model.model import ResoLLMModel


def tiny(seed: int = 0, **kw) -> ResoLLMModel:
    """dim 64, 2 layers, 4 heads, 4 phases: every component on unless ``kw`` says otherwise."""
    torch.manual_seed(seed)
    return ResoLLMModel(ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256, **kw)).eval()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one torch thread (steadier on a shared 2-core machine), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
