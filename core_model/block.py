"""One ResoFormer block: resonant attention, coherence gate, FFN, then a Kuramoto step.

    h             = LN(x)
    q,k,v,omega,w = h @ W_in                  one matrix for everything read from h
    z, r          = prefix mean field of theta and its order parameter     (kuramoto.py)
    g             = CoherenceGate(w, r)        or 1 when gating is off      (gating.py)
    x             = x + g * Attn(q, k, v, theta)                           (attention.py)
    x             = x + g * FFN(LN(x))                                     (feedforward.py)
    theta         = theta + dt*(omega + K |z| sin(arg z - theta) + ext)   or unchanged when off
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import ResonantAttention
from .cache import LayerCache
from .config import ResoLLMConfig
from .feedforward import ResonantFFN
from .fused import phase_kernel
from .gating import CoherenceGate
from .phase_fields import phase_fields
from .kuramoto import PHASOR_SHIFTS, KuramotoCoupling, order_parameter, phasor_pairs, prefix_mean_field


@dataclass
class BlockTrace:
    order: torch.Tensor | None  # (B, T, 1) local order parameter of this block's input phases
    gate: torch.Tensor | None  # (B, T, 1): sigma(.), the gate g = 2 * sigma(.) lies in (0, 2)


class ResoFormerBlock(nn.Module):
    """``evolve_phases=False`` for the last block: nothing after it reads its phases, so it takes
    no Kuramoto step (the model's output phases are the last block's input phases)."""

    def __init__(self, config: ResoLLMConfig, evolve_phases: bool = True) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.dim, bias=config.bias)
        self.attn = ResonantAttention(config)
        self.ln_ffn = nn.LayerNorm(config.dim, bias=config.bias)
        self.ffn = ResonantFFN(config.dim, config.ffn_mult * config.dim, config.bias, config.dropout,
                               config.stochastic_resonance.weak_fraction)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.needs_field = (config.use_kuramoto and evolve_phases) or config.use_coherence_gating
        self.gate = CoherenceGate(config.gate_threshold) if config.use_coherence_gating else None
        self.kuramoto = (KuramotoCoupling(config.kuramoto_dt, config.kuramoto_coupling_init)
                         if config.use_kuramoto and evolve_phases else None)
        # Widths of the input projection's read-outs: [qkv | omega | gate logit]
        self.in_widths = [self.attn.qkv_width, config.num_phases if self.kuramoto else 0, 1 if self.gate else 0]
        self.in_proj = nn.Linear(config.dim, sum(self.in_widths), bias=config.bias)
        self.register_buffer("phasor_shifts", torch.tensor(PHASOR_SHIFTS), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        theta: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        valid: torch.Tensor | None,
        counts: torch.Tensor | None,
        external: torch.Tensor | None,
        cache: LayerCache | None,
        cache_start: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, BlockTrace]:
        """x (B, T, D); theta (B, T, F) or None; counts (B, T, 1, 1): the n of each prefix mean field."""
        if (cache is not None and valid is None and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled() and cache.k.is_contiguous() and not torch.is_autocast_enabled("cpu")
                and (kernel := phase_kernel()) is not None):
            return self._decode_step(kernel, x, theta, rope, attn_mask, counts, external, cache, cache_start)
        proj = self.in_proj(self.ln_attn(x))
        qkv, omega, gate_logit = proj.split(self.in_widths, dim=-1)
        if (cache is None and valid is None and external is None and theta is not None
                and (self.needs_field or self.attn.resonant) and x.dtype == theta.dtype == qkv.dtype == torch.float32
                and x.device.type == "cpu" and phase_kernel() is not None):
            return self._sequence_step(x, theta, qkv, omega, gate_logit, rope, attn_mask)
        u = u_perp = z = order = None
        if theta is not None:  # (cos, sin) and (-sin, cos) of theta, shared by every phase consumer
            shifts = self.phasor_shifts if self.phasor_shifts.dtype == theta.dtype else self.phasor_shifts.to(theta.dtype)
            u, u_perp = phasor_pairs(theta, shifts)
        if self.needs_field:
            past = cache.phase_sum if cache is not None else None
            z, running = prefix_mean_field(u, counts, past, valid)
            if cache is not None:
                cache.phase_sum = running
            order = order_parameter(z, keepdim=True)  # (B, T, 1)
        a = self.resid_dropout(self.attn(qkv, u, rope, attn_mask, cache, cache_start))
        gate = self.gate(gate_logit, order) if self.gate is not None else None  # sigma(.), g = 2 * gate
        x = x + a if gate is None else torch.addcmul(x, gate, a, value=2.0)
        f = self.ffn(self.ln_ffn(x))
        x = x + f if gate is None else torch.addcmul(x, gate, f, value=2.0)
        if self.kuramoto is not None:
            theta = self.kuramoto(theta, omega, z, external, u_perp)
        return x, theta, BlockTrace(order, gate)

    def _sequence_step(self, x, theta, qkv, omega, gate_logit, rope, attn_mask):
        """``forward`` without a cache, padding or external field (training, uncached forwards):
        the phase machinery and its backward in two compiled calls (``core_model.phase_fields``)."""
        attn, kuramoto, gate = self.attn, self.kuramoto, self.gate
        theta_new, g, order, q_feat, k_feat = phase_fields(
            theta, omega if kuramoto is not None else None, gate_logit if gate is not None else None,
            kuramoto.coupling if kuramoto is not None else None, gate.order_weight if gate is not None else None,
            attn.resonance if attn.resonant else None, gate.threshold if gate is not None else 0.0,
            kuramoto.dt if kuramoto is not None else 0.0, math.sqrt(attn.head_dim) / attn.num_phases,
            attn.num_heads, self.needs_field)
        a = self.resid_dropout(attn(qkv, None, rope, attn_mask, feats=(q_feat, k_feat) if attn.resonant else None))
        x = x + a if g is None else torch.addcmul(x, g, a, value=2.0)
        f = self.ffn(self.ln_ffn(x))
        x = x + f if g is None else torch.addcmul(x, g, f, value=2.0)
        return x, (theta_new if kuramoto is not None else theta), BlockTrace(order, g)

    def _decode_step(self, kernel, x, theta, rope, attn_mask, counts, external, cache, cache_start):
        """``forward`` with a cache, no padding and no gradients (decoding steps, prefills, the
        Lyapunov twin's window forwards): everything between the input projection and the attention
        kernel in one compiled call (``core_model.fused``)."""
        args = self.__dict__.get("_decode_args")
        if args is None:  # the constant arguments, looked up once (parameters are kept by reference)
            attn, kuramoto, gate, w = self.attn, self.kuramoto, self.gate, self.in_widths
            args = self.__dict__["_decode_args"] = (
                attn.num_heads, attn.sem_dim, attn.head_dim,
                w[0] if kuramoto is not None else -1, w[0] + w[1] if gate is not None else -1,
                attn.resonance if attn.resonant else None, math.sqrt(attn.head_dim) / attn.num_phases,
                kuramoto.coupling if kuramoto is not None else None, kuramoto.dt if kuramoto is not None else 0.0,
                gate.order_weight if gate is not None else None, gate.threshold if gate is not None else 0.0,
                self.needs_field and theta is not None, gate is not None, kuramoto is not None)
        H, d_s, d, omega_col, gate_col, resonance, w_scale, K, dt, a, tau, field, gated, evolve = args
        proj = self.in_proj(self.ln_attn(x))
        if external is not None and evolve:
            external = external.to(theta.dtype).expand(x.shape[0], theta.shape[-1], 2)  # (F, 2), (1 or B, F, 2)
        else:
            external = None
        past = None
        if field:
            past = cache.phase_sum if cache.phase_sum is not None else theta.new_zeros(
                x.shape[0], 1, theta.shape[-1], 2)
        q, new_sum, order, gate, theta_new = kernel.block_step(
            proj, H, d_s, d, rope[0] if rope is not None else None, rope[1] if rope is not None else None,
            cache.k, cache.v, cache_start, theta, omega_col, gate_col, past, counts if field else None,
            external, resonance, w_scale, K, dt, a, tau)
        if field:
            cache.phase_sum = new_sum
        a = self.resid_dropout(self.attn.attend_cached(q, cache, cache_start + x.shape[1], attn_mask))
        if gated:
            x = torch.addcmul(x, gate, a, value=2.0)
            x = torch.addcmul(x, gate, self.ffn(self.ln_ffn(x)), value=2.0)
        else:
            x = x + a
            x = x + self.ffn(self.ln_ffn(x))
        return x, (theta_new if evolve else theta), BlockTrace(order if field else None, gate if gated else None)

    # Named views of the input projection's rows (for tests and analysis)
    def in_rows(self, part: str) -> torch.Tensor:
        """Rows of ``in_proj.weight`` for ``part`` in {'qkv', 'omega', 'gate'}."""
        start = {"qkv": 0, "omega": self.in_widths[0], "gate": self.in_widths[0] + self.in_widths[1]}[part]
        width = self.in_widths[["qkv", "omega", "gate"].index(part)]
        return self.in_proj.weight[start:start + width]
