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
    """``w . h_i`` is one column of the block's input projection (it reads the normalised hidden
    state together with q, k, v); this module holds ``a`` and applies the order-parameter term."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.order_weight = nn.Parameter(torch.tensor(1.0))  # a

    def forward(self, hidden_logit: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """hidden_logit ``w . h`` (B, T, 1), order (B, T, 1) -> ``g / 2`` (B, T, 1); the block applies
        the factor 2 inside its residual ``addcmul`` (one kernel instead of two)."""
        return torch.sigmoid(torch.addcmul(hidden_logit, order - self.threshold, self.order_weight))
