"""Feed-forward network with a stochastic-resonance hook.

    FFN(x) = W_2 GELU(u),   u = W_1 x
    with stochastic resonance:  u <- u + A * sigma_u * xi * [ |u| < c * sigma_u ],   xi ~ N(0, 1)

where ``sigma_u`` is the per-token standard deviation of ``u``: noise reaches only the weak
(sub-threshold) pre-activations so they can cross the nonlinearity. The amplitude ``A`` is
zero unless the generation engine raises it (when the output starts repeating itself), or
training asks for it. Noise comes from an explicit ``torch.Generator`` so runs are repeatable.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


_quiet = threading.local()


@contextmanager
def noise_suppressed() -> Iterator[None]:
    """No stochastic-resonance noise in this thread's forwards (the Lyapunov twin's window forwards
    run beside a main trajectory that may have it on)."""
    before = getattr(_quiet, "on", False)
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = before


class ResonantFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, dropout: float, weak_fraction: float = 0.5) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.weak_fraction = weak_fraction
        self.noise_amplitude = 0.0  # set by the generation engine; 0 means off
        self.noise_generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.fc(x)
        if self.noise_amplitude > 0 and not getattr(_quiet, "on", False):
            sigma = u.std(dim=-1, keepdim=True)
            weak = (u.abs() < self.weak_fraction * sigma).to(u.dtype)
            xi = torch.randn(u.shape, generator=self.noise_generator, device=u.device, dtype=u.dtype)
            u = u + self.noise_amplitude * sigma * xi * weak
        return self.dropout(self.proj(F.gelu(u)))
