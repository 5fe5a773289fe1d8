"""Stochastic resonance at generation time: detect repetition, then shake the weak FFN features.

Repetition score over the last ``W`` tokens (n-gram size ``n``, default 4):

    rep = #{ n-grams in the window that already occurred earlier in the window } / #{ n-grams }

When ``rep > threshold`` (and stochastic resonance is enabled) every block's FFN gets
``noise_amplitude = A`` (see ``core_model.feedforward``: noise only on pre-activations with
``|u| < c * sigma_u``), drawn from a seeded generator; below the threshold the amplitude is 0.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterable

import torch

from ..config import StochasticResonanceConfig


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of ``tokens`` that occurred earlier in ``tokens`` (0 when too short)."""
    if len(tokens) < n + 1:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    total = len(tokens) - n + 1
    for i in range(total):
        g = tuple(tokens[i:i + n])
        if g in seen:
            repeats += 1
        else:
            seen.add(g)
    return repeats / total


class RepetitionDetector:
    """Sliding window of the last ``window`` tokens with its repetition score.

    The window's n-grams are counted as tokens enter and leave it, so ``score`` is
    ``(#n-grams - #distinct n-grams) / #n-grams`` in O(1), equal to
    ``repeated_ngram_share(list(tokens), n)``.
    """

    def __init__(self, window: int = 32, n: int = 4, tokens: Iterable[int] = ()) -> None:
        self.n = n
        self.window = window
        self.tokens: deque[int] = deque()
        self._grams: Counter[tuple[int, ...]] = Counter()
        for t in tokens:
            self.push(t)

    def push(self, token: int) -> None:
        n, tokens = self.n, self.tokens
        if len(tokens) == self.window:  # the oldest token leaves, and with it the oldest n-gram
            if len(tokens) >= n:
                oldest = tuple(tokens[i] for i in range(n))
                left = self._grams[oldest] - 1
                if left:
                    self._grams[oldest] = left
                else:
                    del self._grams[oldest]
            tokens.popleft()
        tokens.append(int(token))
        if len(tokens) >= n:
            self._grams[tuple(tokens[i] for i in range(len(tokens) - n, len(tokens)))] += 1

    def score(self) -> float:
        if len(self.tokens) < self.n + 1:
            return 0.0
        total = len(self.tokens) - self.n + 1
        return (total - len(self._grams)) / total

    def clear(self) -> None:
        self.tokens.clear()
        self._grams.clear()


class StochasticResonance:
    """Switches FFN noise on and off from the repetition score (see module docstring)."""

    def __init__(self, config: StochasticResonanceConfig, blocks, seed: int) -> None:
        self.config = config
        self.ffns = [b.ffn for b in blocks]
        self.generator: torch.Generator | None = None
        self.seed = seed
        self.active = False

    def update(self, repetition: float) -> bool:
        """Set the noise amplitude for the next forward; returns whether noise is on."""
        on = self.config.enabled and self.config.noise_amplitude > 0 and repetition > self.config.repetition_threshold
        if on != self.active:
            if on and self.generator is None:
                device = next(iter(self.ffns[0].parameters())).device
                self.generator = torch.Generator(device=device)
                self.generator.manual_seed(self.seed)
            for ffn in self.ffns:
                ffn.noise_amplitude = self.config.noise_amplitude if on else 0.0
                ffn.noise_generator = self.generator if on else None
            self.active = on
        return on

    def off(self) -> None:
        for ffn in self.ffns:
            ffn.noise_amplitude = 0.0
            ffn.noise_generator = None
        self.active = False
