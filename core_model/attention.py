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
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import LayerCache
from .config import PHI, ResoLLMConfig
from .derived import derived


def rope_inv_freq(rot_dim: int, base: float) -> torch.Tensor:
    """Rotary frequencies ``base^(-2i/rot_dim)``, shape (rot_dim/2,)."""
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32):
    """cos/sin tables for rotary embeddings: positions (B, T) -> (B, 1, T, rot_dim/2) each."""
    ang = (positions.unsqueeze(-1) * inv_freq).unsqueeze(1)  # (B, 1, T, rot_dim/2)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_table(max_len: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """cos and sin for every position below ``max_len``: (2, max_len, rot_dim/2), float32.
    Indexing it with positions gives exactly what ``rope_tables`` computes (same float32 ops)."""
    ang = torch.arange(max_len, dtype=torch.float32).unsqueeze(-1) * inv_freq
    return torch.stack([ang.cos(), ang.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ResonantAttention(nn.Module):
    """Attention over q, k, v that the block projects (one matrix for q, k, v and the other
    read-outs of the normalised input); this module adds RoPE, the phase features and the cache."""

    def __init__(self, config: ResoLLMConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.resonant = config.use_resonant_attention
        self.num_phases = config.num_phases
        self.sem_dim = self.head_dim - config.phase_dims_per_head
        self.dropout = config.dropout
        H = self.num_heads
        self.qkv_width = H * (2 * self.sem_dim + self.head_dim)
        self.out_proj = nn.Linear(H * self.head_dim, config.dim, bias=config.bias)
        if self.resonant:
            ladder = config.resonance_lambda0 * PHI ** -torch.arange(H, dtype=torch.float32)
            self.resonance = nn.Parameter(ladder)  # lambda_h
        # Set by an observer (the attention-foci probe) to its thread's id: keep the latest
        # finished queries of forwards in that thread (not those of the Lyapunov twin's worker)
        self.record_query: int | None = None
        self.last_query: torch.Tensor | None = None

    def phase_weight(self) -> torch.Tensor:
        """w_h = lambda_h * sqrt(d) / F, shape (1, H, 1, 1) (kept between calls in decoding)."""
        return derived(self, "_phase_weight", [self.resonance], lambda: (
            self.resonance * (math.sqrt(self.head_dim) / self.num_phases)).view(1, -1, 1, 1))

    def phase_features(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key phase features (B, H, T, 2F) and (B, 1, T, 2F) from u (B, T, F, 2)."""
        # (cos, sin) pairs interleaved: the order is irrelevant as q and k share it
        k_feat = u.flatten(-2).unsqueeze(1)
        return self.phase_weight() * k_feat, k_feat  # w_h * u by broadcasting

    def split_heads(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """q, k (B, H, T, d_s) and v (B, H, T, d) from the projected qkv (B, T, qkv_width), with
        RoPE applied to q and k together (one set of kernels for both)."""
        B, T, _ = qkv.shape
        H, d_s = self.num_heads, self.sem_dim
        qk, v = qkv.split([2 * H * d_s, H * self.head_dim], dim=-1)
        qk = qk.view(B, T, 2 * H, d_s).transpose(1, 2)  # (B, 2H, T, d_s)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split(H, dim=1)
        return q, k, v.view(B, T, H, self.head_dim).transpose(1, 2)

    def forward(
        self,
        qkv: torch.Tensor,
        u: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        cache_start: int = 0,
        feats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """qkv (B, T, qkv_width); u = (cos theta, sin theta) (B, T, F, 2); attn_mask bool
        (B, 1, T, T_k) or None for plain causal; ``feats``: the query and key phase features
        (B, H, T, 2F) when already computed (``core_model.phase_fields``). Returns (B, T, D)."""
        B, T, _ = qkv.shape
        H = self.num_heads
        q, k, v = self.split_heads(qkv, rope)
        if feats is not None:
            q, k = torch.cat([q, feats[0]], dim=-1), torch.cat([k, feats[1]], dim=-1)
        elif self.resonant:
            q_feat, k_feat = self.phase_features(u)
            q = torch.cat([q, q_feat], dim=-1)
            k = torch.cat([k, k_feat.expand(B, H, T, -1)], dim=-1)
        if cache is not None:
            end = cache_start + T
            cache.k[:, :, cache_start:end] = k
            cache.v[:, :, cache_start:end] = v
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
        return self._attend(q, k, v, attn_mask)

    def attend_cached(self, q: torch.Tensor, cache: LayerCache, end: int,
                      attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of finished queries q (B, H, T, d) over the first ``end`` cached keys (the
        fused step writes q, k and v itself); returns (B, T, D)."""
        return self._attend(q, cache.k[:, :, :end], cache.v[:, :, :end], attn_mask)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA of q (B, H, T, d) over k, v (B, H, T_k, d) and the output projection. With no
        mask it is plain causal: the T queries are the last T of the keys (a cache holds the rest)."""
        B, H, T, d = q.shape
        if self.record_query is not None and self.record_query == threading.get_ident():
            self.__dict__["last_query"] = q  # a plain attribute: skip Module.__setattr__ (4 us a step)
        T_k, causal = k.shape[2], False
        if attn_mask is None and T > 1:
            if T_k == T:
                causal = True
            else:
                attn_mask = torch.ones(T, T_k, dtype=torch.bool, device=q.device).tril(T_k - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * d))

    def explicit_scores(self, qkv: torch.Tensor, theta: torch.Tensor, rope=None) -> torch.Tensor:
        """Reference path for tests: the explicit ``s*QK^T + lambda*R`` logits (B, H, T, T)."""
        q, k, _ = self.split_heads(qkv, rope)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if self.resonant:
            R = torch.cos(theta.unsqueeze(2) - theta.unsqueeze(1)).mean(-1)  # (B, T, T)
            scores = scores + self.resonance.view(1, -1, 1, 1) * R.unsqueeze(1)
        return scores
