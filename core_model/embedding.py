"""Prime token embedding: a semantic embedding blended with a learnable phase embedding.

Token ``i`` maps to the ``i``-th prime ``p_i``. Its ``F`` phases start at

    theta_{i,k} = 2*pi * frac(w_k * ln p_i),     w_k = phi^k,  k = 0..F-1

and are learnable. The input vector is the dual embedding of the Resonator:

    x_i = (1 - a) * E[i] + a * P([cos theta_i, sin theta_i]),    a = sigmoid(b)  (per dimension)

with ``E`` the semantic table (tied to the output head), ``P`` a linear projection of the
phase features and ``b`` a learned per-dimension blend. With the blend switched off,
``x_i = E[i]`` exactly (the vanilla embedding) while the phases still feed the other parts.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from .config import PHI, ResoLLMConfig
from .derived import derived
from .primes import log_primes

FUSED_TABLE_MAX = 1 << 24  # elements (64 MiB in float32): beyond that, blend per token instead


def log_prime_phases(vocab_size: int, num_phases: int) -> torch.Tensor:
    """``2*pi*frac(phi^k * ln p_i)`` for every token ``i`` and frequency ``k``: shape (V, F)."""
    lp = log_primes(vocab_size)  # (V,) float64
    freqs = PHI ** np.arange(num_phases, dtype=np.float64)  # (F,)
    x = lp[:, None] * freqs[None, :]
    return torch.from_numpy(2 * math.pi * (x - np.floor(x))).float()


class PrimeTokenEmbedding(nn.Module):
    def __init__(self, config: ResoLLMConfig) -> None:
        super().__init__()
        self.semantic = nn.Embedding(config.vocab_size, config.dim)
        self.blend_enabled = config.use_prime_embedding
        self.has_phases = config.uses_phases
        if self.has_phases:
            self.phase_table = nn.Parameter(log_prime_phases(config.vocab_size, config.num_phases))
        if self.blend_enabled:
            self.phase_proj = nn.Linear(2 * config.num_phases, config.dim, bias=False)
            self.blend_logit = nn.Parameter(torch.full((config.dim,), -2.0))
            # cos(theta - s) for s = 0, pi/2 gives [cos theta, sin theta] in one kernel
            self.register_buffer("cos_sin_shift", torch.tensor([[0.0], [math.pi / 2]]), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(x, theta)``: x (B, T, D) and the token phases (B, T, F) or None."""
        if not self.has_phases:
            return self.semantic(input_ids), None
        theta = self.phase_table[input_ids]  # (B, T, F)
        if not self.blend_enabled:
            return self.semantic(input_ids), theta
        if not torch.is_grad_enabled() and self.semantic.weight.numel() <= FUSED_TABLE_MAX:
            # x_i depends on the token only: in decoding, look up a fused (V, D) table
            return self.fused_table()[input_ids], theta
        return self._blend(self.semantic(input_ids), theta), theta

    def _blend(self, e: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        feats = torch.cos(theta.unsqueeze(-2) - self.cos_sin_shift).flatten(-2)  # (..., 2F): [cos, sin]
        p = self.phase_proj(feats)  # bf16 under autocast, while the embedding lookup stays float32
        return torch.lerp(e, p if p.dtype == e.dtype else p.to(e.dtype), torch.sigmoid(self.blend_logit))  # (1-a) E + a P

    def fused_table(self) -> torch.Tensor:
        """``(1 - a) E + a P(cos, sin of theta)`` for every token (V, D), kept while gradients are
        off and the weights unchanged (``core_model.derived``)."""
        sources = [self.semantic.weight, self.phase_table, self.phase_proj.weight, self.blend_logit]
        return derived(self, "_fused_table", sources, lambda: self._blend(self.semantic.weight, self.phase_table))
