"""Causal Kuramoto phase dynamics from block to block.

Each position ``i`` and oscillator ``k`` feels the mean field of its prefix,

    u_{j,k}  = (cos theta_{j,k}, sin theta_{j,k})                       (the phasor, as two reals)
    z_{i,k}  = (1 / n_i) * sum_{j <= i} u_{j,k}                         (n_i = valid positions <= i)
    theta_{i,k} <- theta_{i,k} + dt * ( omega_{i,k}
                                        + K * |z_{i,k}| * sin(arg z_{i,k} - theta_{i,k})
                                        + |Z^ext_k| * sin(arg Z^ext_k - theta_{i,k}) )

with natural frequencies ``omega = W h`` read from the normalised hidden state (``W`` is part of the
block's input projection), a learned coupling ``K`` per block and an optional external field
``Z^ext`` from other agents' phases (already scaled by their coupling strength). Since
``|z| sin(arg z - theta) = Im z * cos theta - Re z * sin theta``, with ``K > 0`` phases are
pulled towards their prefix's mean phase and the order parameter ``|z|`` rises towards 1.
Prefix sums make it O(T); in decoding the running sum lives in the cache, so each new token
costs O(F). Phasors are real (..., F, 2) tensors: fewer kernel calls than complex ones on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# cos(theta - s) for these shifts s gives (cos, sin, -sin, cos): the phasor and its quarter turn
PHASOR_SHIFTS = (0.0, math.pi / 2, -math.pi / 2, 0.0)


def phasor_pairs(theta: torch.Tensor, shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = (cos theta, sin theta)`` and ``u_perp = (-sin theta, cos theta)``: (..., F) -> 2 x (..., F, 2).

    One kernel computes both (``shifts`` is :data:`PHASOR_SHIFTS` as a tensor on theta's device).
    """
    if shifts is None:
        shifts = torch.tensor(PHASOR_SHIFTS, device=theta.device, dtype=theta.dtype)
    both = torch.cos(theta.unsqueeze(-1) - shifts)  # (..., F, 4)
    return both.unflatten(-1, (2, 2)).unbind(-2)


def phasors(theta: torch.Tensor) -> torch.Tensor:
    """``(cos theta, sin theta)`` stacked last: (..., F) -> (..., F, 2)."""
    return phasor_pairs(theta)[0]


def prefix_mean_field(
    u: torch.Tensor,
    counts: torch.Tensor,
    past_sum: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix mean field ``z`` (B, T, F, 2) of the phasors ``u`` (B, T, F, 2), continuing
    ``past_sum`` (B, 1, F, 2). ``counts`` (B, T, 1, 1) holds ``max(n_i, 1)`` (``n_i`` is 0 before a
    row's first real token); ``valid`` (B, T) masks padding. Sums are kept in float32 whatever ``u``'s dtype (a bf16
    sum of hundreds of unit phasors would lose its accuracy). Returns ``(z, running_sum)``, ``z`` in
    ``u``'s dtype, the running sum over every position so far (B, 1, F, 2) in float32."""
    if valid is not None:
        u = u * valid[:, :, None, None].to(u.dtype)
    u32 = u if u.dtype == torch.float32 else u.float()
    total = u32.cumsum(dim=1) if u.shape[1] > 1 else u32
    if past_sum is not None:
        total = total + past_sum
    z = total / counts
    return (z if z.dtype == u.dtype else z.to(u.dtype)), (total[:, -1:] if total.shape[1] > 1 else total)


def order_parameter(z: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Local order parameter ``r_i = mean_k |z_{i,k}|``: (B, T, F, 2) -> (B, T) (or (B, T, 1))."""
    return torch.linalg.vector_norm(z, dim=-1).mean(dim=-1, keepdim=keepdim)


def phase_pull(field: torch.Tensor, u_perp: torch.Tensor) -> torch.Tensor:
    """``|Z| sin(arg Z - theta) = Im Z cos theta - Re Z sin theta = Z . u_perp`` for field
    (..., F, 2) and ``u_perp = (-sin theta, cos theta)`` (..., F, 2)."""
    return torch.linalg.vecdot(field, u_perp)


class KuramotoCoupling(nn.Module):
    """One block's Kuramoto step (see module docstring); holds the learned coupling ``K``."""

    def __init__(self, dt: float, coupling_init: float) -> None:
        super().__init__()
        self.dt = dt
        self.coupling = nn.Parameter(torch.tensor(float(coupling_init)))  # K

    def forward(
        self,
        theta: torch.Tensor,
        omega: torch.Tensor,
        z: torch.Tensor,
        external: torch.Tensor | None = None,
        u_perp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """theta and omega (B, T, F); z (B, T, F, 2) the prefix mean field of theta; external
        (B, F, 2) or (F, 2) as (real, imag), or None; ``u_perp = (-sin theta, cos theta)`` when
        already computed."""
        if u_perp is None:
            u_perp = phasor_pairs(theta)[1]
        dtheta = torch.addcmul(omega, self.coupling, phase_pull(z, u_perp))
        if external is not None:
            ext = external.to(theta.dtype)
            ext = ext.unsqueeze(-3) if ext.dim() == 3 else ext  # (B, 1, F, 2): same field at every position
            dtheta = dtheta + phase_pull(ext, u_perp)
        return torch.add(theta, dtheta, alpha=self.dt)


def global_order_parameter(theta: torch.Tensor) -> torch.Tensor:
    """``|mean_i exp(1j*theta_i)|`` over positions, averaged over oscillators: (B,) for (B, T, F)."""
    return torch.linalg.vector_norm(phasors(theta).mean(1), dim=-1).mean(-1)
