"""The phase machinery of one block over an uncached, unpadded sequence, forward and backward
in two compiled calls (``csrc/phase_fields.cpp``; equations there and in kuramoto.py, gating.py
and attention.py, which remain the reference and the fallback).

In a training step at nanoGPT's CPU size the eager phase machinery (phasors, prefix mean field,
order parameter, gate, Kuramoto step, attention phase features and their backward) is about
fifty small kernels per block (a step of the full model dispatched 880 ATen operators against
471 for the vanilla one; 683 with this), each too small to hide its dispatch cost; here it is
two calls per block.
Blocks use it for float32 CPU forwards without a cache, padding or external field when the
compiled kernel is available (``core_model.fused``); tests compare values and gradients with
the eager path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .fused import phase_kernel


class PhaseFields(torch.autograd.Function):
    """``(theta, omega, logit, K, a, resonance) -> (theta', gate, order, qf, kf)``; a part that is
    switched off takes None and gives an empty tensor. First derivatives only (double backward,
    e.g. a gradient penalty, needs the eager path: ``RESO_FUSED=0``)."""

    @staticmethod
    def forward(ctx, theta, omega, logit, K, a, resonance, consts):  # noqa: D102
        tau, dt, w_scale, H, field = consts
        kernel = phase_kernel()
        theta_new, gate, order, qf, kf, z = kernel.phase_fields_fwd(
            theta, omega, logit, K, a, tau, dt, resonance, w_scale, H, field)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(theta, z, gate, order, K, a, resonance)
        ctx.consts, ctx.kuramoto = consts, omega is not None
        return theta_new, gate, order, qf, kf

    @staticmethod
    @once_differentiable  # the backward is compiled: no second derivative (an error, not a silent zero)
    def backward(ctx, g_theta, g_gate, g_order, g_qf, g_kf):  # noqa: D102
        theta, z, gate, order, K, a, resonance = ctx.saved_tensors
        tau, dt, w_scale, H, _ = ctx.consts
        g = phase_kernel().phase_fields_bwd(theta, z, gate, order, g_theta, g_gate, g_order, g_qf, g_kf, K, a, tau,
                                            dt, resonance, w_scale, H, ctx.kuramoto)
        g_th, g_om, g_lg, g_K, g_a, g_res = g
        return (g_th, g_om if ctx.kuramoto else None, g_lg if gate.numel() else None,
                g_K if K is not None else None, g_a if a is not None else None,
                g_res if resonance is not None else None, None)


def phase_fields(theta: torch.Tensor, omega: torch.Tensor | None, logit: torch.Tensor | None,
                 K: torch.Tensor | None, a: torch.Tensor | None, resonance: torch.Tensor | None,
                 tau: float, dt: float, w_scale: float, num_heads: int, field: bool):
    """theta (B, T, F); omega (B, T, F) and logit (B, T, 1) may be views of the projection.
    Returns theta' (or None), gate sigma(.) (or None), order (B, T, 1) (or None), and the query
    and key phase features (B, H, T, 2F) each (or None)."""
    outs = PhaseFields.apply(theta, omega, logit, K, a, resonance, (tau, dt, w_scale, num_heads, field))
    return tuple(t if t.numel() else None for t in outs)
