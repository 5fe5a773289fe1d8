"""Causal Kuramoto phase dynamics from block to block.

Each position ``i`` and oscillator ``k`` feels the mean field of its prefix,

    z_{i,k} = (1 / n_i) * sum_{j <= i} exp(1j * theta_{j,k})          (n_i = valid positions <= i)
    theta_{i,k} <- theta_{i,k} + dt * ( omega_{i,k}
                                        + K * |z_{i,k}| * sin(arg z_{i,k} - theta_{i,k})
                                        + |Z^ext_k| * sin(arg Z^ext_k - theta_{i,k}) )

with natural frequencies ``omega = W h`` read from the hidden state, a learned coupling ``K`` per
block and an optional external field ``Z^ext`` from other agents' phases (already scaled by
their coupling strength). ``|z| sin(arg z - theta) = Im(z * exp(-1j*theta))``, so with ``K > 0``
phases are pulled towards their prefix's mean phase and the order parameter ``|z|`` rises
towards 1. Prefix sums make it O(T); in decoding the running sum lives in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class PhaseField:
    """The prefix mean field of one block's phases: real and imaginary parts, (B, T, F)."""

    re: torch.Tensor
    im: torch.Tensor

    @property
    def order(self) -> torch.Tensor:
        """Local order parameter ``r_i = mean_k |z_{i,k}|``, shape (B, T)."""
        return torch.sqrt(self.re**2 + self.im**2).mean(dim=-1)


def prefix_mean_field(
    theta: torch.Tensor,
    valid: torch.Tensor | None = None,
    past_sum: tuple[torch.Tensor, torch.Tensor] | None = None,
    past_count: torch.Tensor | None = None,
) -> tuple[PhaseField, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Prefix mean field of ``theta`` (B, T, F), continuing a cached running sum.

    Returns the field, the new running sum ``(re, im)`` of shape (B, F) and the new count (B,).
    """
    c, s = theta.cos(), theta.sin()
    if valid is not None:
        w = valid.to(theta.dtype).unsqueeze(-1)  # (B, T, 1)
        c, s = c * w, s * w
        counts = valid.to(theta.dtype).cumsum(dim=1)  # (B, T)
    else:
        counts = torch.arange(1, theta.shape[1] + 1, device=theta.device, dtype=theta.dtype).expand(theta.shape[0], -1)
    cre, cim = c.cumsum(dim=1), s.cumsum(dim=1)  # (B, T, F)
    if past_sum is not None:
        cre = cre + past_sum[0].unsqueeze(1)
        cim = cim + past_sum[1].unsqueeze(1)
        counts = counts + past_count.unsqueeze(1)
    n = counts.clamp(min=1).unsqueeze(-1)
    field = PhaseField(cre / n, cim / n)
    return field, (cre[:, -1], cim[:, -1]), counts[:, -1]


class KuramotoCoupling(nn.Module):
    """One block's Kuramoto step (see module docstring)."""

    def __init__(self, dim: int, num_phases: int, dt: float, coupling_init: float) -> None:
        super().__init__()
        self.dt = dt
        self.omega = nn.Linear(dim, num_phases, bias=False)
        self.coupling = nn.Parameter(torch.tensor(float(coupling_init)))

    def forward(
        self,
        theta: torch.Tensor,
        hidden: torch.Tensor,
        field: PhaseField,
        external: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """theta (B, T, F), hidden (B, T, D), field of theta; external (B, F, 2) or (F, 2) or None."""
        c, s = theta.cos(), theta.sin()
        pull = field.im * c - field.re * s  # |z| sin(arg z - theta)
        dtheta = self.omega(hidden) + self.coupling * pull
        if external is not None:
            ext = external.to(theta.dtype)
            if ext.dim() == 2:
                ext = ext.unsqueeze(0)
            dtheta = dtheta + ext[..., 1].unsqueeze(1) * c - ext[..., 0].unsqueeze(1) * s
        return theta + self.dt * dtheta


def global_order_parameter(theta: torch.Tensor) -> torch.Tensor:
    """``|mean_i exp(1j*theta_i)|`` over positions, averaged over oscillators: (B,) for (B, T, F)."""
    return torch.sqrt(theta.cos().mean(1) ** 2 + theta.sin().mean(1) ** 2).mean(-1)
