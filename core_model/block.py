"""One ResoFormer block: resonant attention, coherence gate, FFN, then a Kuramoto step.

    r     = order parameter of the prefix mean field of theta            (kuramoto.py)
    g     = CoherenceGate(x, r)                or 1 when gating is off    (gating.py)
    x     = x + g * Attn(LN(x), theta)                                    (attention.py)
    x     = x + g * FFN(LN(x))                                            (feedforward.py)
    theta = theta + dt*(omega(x) + K |z| sin(arg z - theta) + ext)       or unchanged when off
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import ResonantAttention
from .cache import LayerCache
from .config import ResoLLMConfig
from .feedforward import ResonantFFN
from .gating import CoherenceGate
from .kuramoto import KuramotoCoupling, prefix_mean_field


@dataclass
class BlockTrace:
    order: torch.Tensor | None  # (B, T) local order parameter of this block's input phases
    gate: torch.Tensor | None  # (B, T, 1)


class ResoFormerBlock(nn.Module):
    def __init__(self, config: ResoLLMConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.dim, bias=config.bias)
        self.attn = ResonantAttention(config)
        self.ln_ffn = nn.LayerNorm(config.dim, bias=config.bias)
        self.ffn = ResonantFFN(config.dim, config.ffn_mult * config.dim, config.bias, config.dropout,
                               config.stochastic_resonance.weak_fraction)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.needs_field = config.use_kuramoto or config.use_coherence_gating
        self.gate = CoherenceGate(config.dim, config.gate_threshold) if config.use_coherence_gating else None
        self.kuramoto = (
            KuramotoCoupling(config.dim, config.num_phases, config.kuramoto_dt, config.kuramoto_coupling_init)
            if config.use_kuramoto else None
        )

    def forward(
        self,
        x: torch.Tensor,
        theta: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        valid: torch.Tensor | None,
        external: torch.Tensor | None,
        cache: LayerCache | None,
        cache_start: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, BlockTrace]:
        field = None
        if self.needs_field:
            past = (cache.phase_sum, cache.phase_count) if cache is not None and cache.phase_sum is not None else (None, None)
            field, new_sum, new_count = prefix_mean_field(theta, valid, *past)
            if cache is not None:
                cache.phase_sum, cache.phase_count = new_sum, new_count
        gate = self.gate(x, field.order) if self.gate is not None else None
        a = self.resid_dropout(self.attn(self.ln_attn(x), theta, rope, attn_mask, cache, cache_start))
        x = x + (gate * a if gate is not None else a)
        f = self.ffn(self.ln_ffn(x))
        x = x + (gate * f if gate is not None else f)
        if self.kuramoto is not None:
            theta = self.kuramoto(theta, x, field, external)
        return x, theta, BlockTrace(field.order if field is not None else None, gate)
