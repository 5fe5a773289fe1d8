"""Coherence gating: a per-token gate on each block's update.

    g_i = 2 * sigmoid( w . h_i + a * (r_i - tau) ),     x <- x + g_i * update_i

driven by the hidden state ``h_i`` and the local Kuramoto order parameter ``r_i`` (threshold
``tau ~ 1/phi``): coherent positions (``r_i > tau``) pass more of the update. ``g`` lies in
(0, 2) and is 1 when both terms vanish, so the gate starts close to the ungated block.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class CoherenceGate(nn.Module):
    def __init__(self, dim: int, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.proj = nn.Linear(dim, 1, bias=False)
        self.order_weight = nn.Parameter(torch.tensor(1.0))  # a

    def forward(self, hidden: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), order (B, T) -> gate (B, T, 1)."""
        logit = self.proj(hidden) + self.order_weight * (order - self.threshold).unsqueeze(-1).to(hidden.dtype)
        return 2 * torch.sigmoid(logit)
