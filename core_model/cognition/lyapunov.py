"""The perturbed twin trajectory behind the finite-time Lyapunov estimate.

The prompt is run once with batch size 2; row 2 gets ``eps * rms(E) * xi`` (``xi`` standard
normal, fixed by the seed) added to its input embedding. The cache is then split: the main
trajectory decodes alone (batch 1, no extra cost per step) and the twin keeps its own cache.
After ``N`` steps the twin catches up on the ``N`` tokens the main trajectory produced, in one
forward (about the cost of one decoding step on a CPU: on a small model a catch-up every 8 steps
costs ~14% of the decoding time), and the relative distance of the two final hidden states at the
same position feeds ``PredictiveStability``. ``N`` starts at ``min(8, lyapunov_every)`` and
doubles after each catch-up up to ``lyapunov_every`` (default 64): the first exponent is known
after 24 steps, and a long generation pays one catch-up of 64 tokens per 64 (~3% on a small
model: the twin reads every token once, at prefill speed).

When ``d`` has grown 10x past its first value, the twin's cache is pulled back towards the main
one (Benettin renormalisation ``c' <- c + s (c' - c)``, ``s = d_0 / d``; ``ln s`` is accounted
for). Stochastic-resonance noise is not replayed in the twin: an interval during which it was on
gives no exponent, only a new reference distance.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import StabilityConfig
from .stability import PredictiveStability

FIRST_INTERVAL = 8  # steps before the first catch-up; intervals then double up to lyapunov_every


def _pull(main, twin, scale: float) -> None:
    """``twin <- main + scale (twin - main)`` for every floating tensor of every cached layer."""
    L = main.length
    for lm, lt in zip(main.layers, twin.layers):
        for f in dataclasses.fields(lt):
            a, b = getattr(lm, f.name), getattr(lt, f.name)
            pairs = zip(a, b) if isinstance(b, tuple) else [(a, b)]
            for x, y in pairs:
                if not isinstance(y, torch.Tensor) or not (y.is_floating_point() or y.is_complex()):
                    continue
                if y.dim() == 4:  # (B, H, T_max, d): only the filled part
                    y[:, :, :L] = x[:, :, :L] + scale * (y[:, :, :L] - x[:, :, :L])
                else:
                    y.copy_(x + scale * (y - x))


class LyapunovTwin:
    def __init__(self, model, config: StabilityConfig, tracker: PredictiveStability) -> None:
        self.model = model
        self.config = config
        self.tracker = tracker
        self.cache = None
        self.pending: list[int] = []
        self.offsets: list[torch.Tensor | None] = []
        self.noisy = False
        self.log_d0: float | None = None
        self.interval = min(FIRST_INTERVAL, config.lyapunov_every)  # steps until the next catch-up

    def prefill_offsets(self, offsets: torch.Tensor | None, T: int, seed: int) -> torch.Tensor:
        """(2, T, D) input offsets: row 1 as given (or zero), row 2 perturbed."""
        p = next(self.model.parameters())
        D = self.model.config.dim
        gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
        xi = torch.randn(T, D, generator=gen).to(device=p.device, dtype=p.dtype)
        eps = self.config.perturbation * float(self.model.embed.semantic.weight.detach().pow(2).mean().sqrt())
        base = offsets[:1] if offsets is not None else torch.zeros(1, T, D, device=p.device, dtype=p.dtype)
        return torch.cat([base, base + eps * xi[None]])

    def split(self, cache):
        """Keep row 2 of the prefilled cache as the twin; return row 1 for the main trajectory."""
        device = cache.layers[0].k.device
        self.cache = cache.select(torch.tensor([1], device=device))
        return cache.select(torch.tensor([0], device=device))

    def step(self, token: int, offset: torch.Tensor | None, main_cache, main_hidden: torch.Tensor, noise: bool) -> None:
        """The main trajectory just read ``token`` (with input ``offset`` (1, 1, D), under SR noise
        or not) and produced ``main_hidden`` (1, T, D): the last row is the state compared; every
        ``N`` such tokens the twin catches up and a distance is measured."""
        self.pending.append(token)
        self.offsets.append(offset)
        self.noisy |= noise
        if len(self.pending) >= self.interval:
            self._catch_up(main_cache, main_hidden)
            self.interval = min(2 * self.interval, self.config.lyapunov_every)

    @torch.no_grad()
    def _catch_up(self, main_cache, main_hidden: torch.Tensor) -> None:
        model = self.model
        device = main_hidden.device
        n = len(self.pending)
        ids = torch.tensor([self.pending], device=device)
        off = None
        if any(o is not None for o in self.offsets):
            zero = torch.zeros(1, 1, model.config.dim, device=device, dtype=main_hidden.dtype)
            off = torch.cat([o if o is not None else zero for o in self.offsets], dim=1)
        amplitudes = [b.ffn.noise_amplitude for b in model.blocks]
        for b in model.blocks:
            b.ffn.noise_amplitude = 0.0
        try:
            h = model(ids, cache=self.cache, input_offsets=off, last_only=True).hidden[0, -1].float()
        finally:
            for b, a in zip(model.blocks, amplitudes):
                b.ffn.noise_amplitude = a
        h0 = main_hidden[0, -1].float()
        d = float((h - h0).norm() / h0.norm().clamp(min=1e-12))
        log_d = math.log(max(d, 1e-12)) if math.isfinite(d) else float("nan")
        if self.noisy:
            self.tracker.resync(log_d)
        else:
            rescale = 0.0
            if self.log_d0 is None and math.isfinite(log_d):
                self.log_d0 = log_d
            elif self.log_d0 is not None and math.isfinite(log_d) and log_d - self.log_d0 > math.log(10.0):
                s = math.exp(self.log_d0 - log_d)
                _pull(main_cache, self.cache, s)
                rescale = math.log(s)
            self.tracker.observe_distance(log_d, rescale, steps=n)
        self.pending.clear()
        self.offsets.clear()
        self.noisy = False
