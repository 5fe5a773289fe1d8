"""Resonant attention, phi-weighted, inside ``scaled_dot_product_attention``.

Each head of width ``d`` is split: ``d_s = d - 2F`` semantic dims (with RoPE) and ``2F`` phase
dims. With ``s = 1/sqrt(d)`` (SDPA's scale) the head computes

    softmax( s * q_s . k_s  +  lambda_h * R_ij ),     R_ij = (1/F) sum_k cos(theta_ik - theta_jk)

by appending ``w_h*[cos theta_i, sin theta_i]`` to the query and ``[cos theta_j, sin theta_j]``
to the key, ``w_h = lambda_h / (s F)``: ``cos a cos b + sin a sin b = cos(a - b)``. No T x T
matrix is built and the phase features of keys live in the KV cache. ``lambda_h`` starts on a
golden-ratio ladder ``lambda_0 * phi^-h`` so some heads lean on phase and others on meaning.
Switched off, every head is fully semantic: plain causal attention with RoPE.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import LayerCache
from .config import PHI, ResoLLMConfig


def rope_tables(positions: torch.Tensor, rot_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings: positions (B, T) -> (B, 1, T, rot_dim/2) each."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.float32) / rot_dim))
    ang = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, T, rot_dim/2)
    return ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, d)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ResonantAttention(nn.Module):
    def __init__(self, config: ResoLLMConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.resonant = config.use_resonant_attention
        self.num_phases = config.num_phases
        self.sem_dim = self.head_dim - config.phase_dims_per_head
        self.rope, self.rope_base = config.rope, config.rope_base
        self.dropout = config.dropout
        H, d_s = self.num_heads, self.sem_dim
        self.q_proj = nn.Linear(config.dim, H * d_s, bias=config.bias)
        self.k_proj = nn.Linear(config.dim, H * d_s, bias=config.bias)
        self.v_proj = nn.Linear(config.dim, H * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(H * self.head_dim, config.dim, bias=config.bias)
        if self.resonant:
            ladder = config.resonance_lambda0 * PHI ** -torch.arange(H, dtype=torch.float32)
            self.resonance = nn.Parameter(ladder)  # lambda_h

    def phase_weight(self) -> torch.Tensor:
        """w_h = lambda_h * sqrt(d) / F, shape (1, H, 1, 1)."""
        return (self.resonance * math.sqrt(self.head_dim) / self.num_phases).view(1, -1, 1, 1)

    def forward(
        self,
        x: torch.Tensor,
        theta: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        """x (B, T, D); theta (B, T, F); attn_mask bool (B, 1, T, T_k) or None for plain causal."""
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.sem_dim).transpose(1, 2)  # (B, H, T, d_s)
        k = self.k_proj(x).view(B, T, H, self.sem_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.resonant:
            feats = torch.cat([theta.cos(), theta.sin()], dim=-1).unsqueeze(1).to(q.dtype)  # (B, 1, T, 2F)
            q = torch.cat([q, self.phase_weight().to(q.dtype) * feats.expand(B, H, T, -1)], dim=-1)
            k = torch.cat([k, feats.expand(B, H, T, -1)], dim=-1)
        if cache is not None:
            end = cache_start + T
            cache.k[:, :, cache_start:end] = k
            cache.v[:, :, cache_start:end] = v
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
        dropout = self.dropout if self.training else 0.0
        if attn_mask is None:
            # Plain causal: with a cache, T new queries sit at the end of the keys.
            if k.shape[2] == T:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
            else:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))

    def explicit_scores(self, x: torch.Tensor, theta: torch.Tensor, rope=None) -> torch.Tensor:
        """Reference path for tests: the explicit ``s*QK^T + lambda*R`` logits (B, H, T, T)."""
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.sem_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, self.sem_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if self.resonant:
            R = torch.cos(theta.unsqueeze(2) - theta.unsqueeze(1)).mean(-1)  # (B, T, T)
            scores = scores + self.resonance.view(1, -1, 1, 1) * R.unsqueeze(1)
        return scores
