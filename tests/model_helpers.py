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


def phase_model(seed: int = 0, max_seq_len: int = 96, **kw) -> ResoLLMModel:
    """3 layers x 64 dims, 4 phases, vocab 263 (train mode), with the learned Kuramoto coupling and
    gate weight moved off their initial values so that both show in every comparison."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=263, dim=64, num_layers=3, num_heads=4, num_phases=4, max_seq_len=max_seq_len)
    cfg.update(kw)
    m = ResoLLMModel(ResoLLMConfig(**cfg))
    with torch.no_grad():
        for b in m.blocks:
            if b.kuramoto is not None:
                b.kuramoto.coupling.fill_(1.7)
            if b.gate is not None:
                b.gate.order_weight.fill_(2.3)
    return m
