"""Predictive stability: entropy, a finite-time Lyapunov estimate, cycle detection, control.

Per decoding step ``t`` the engine reports ``H_t``, the entropy of the sampling distribution
(nats, normalised ``h_t = H_t / ln V``), and after every twin window (see lyapunov.py: ``W``
tokens read by a twin whose first input was perturbed, one window every ``lyapunov_every``
steps) a local exponent, the slope of ``ln d_j`` over the window, where
``d_j = |h'_j - h_j| / |h_j|`` is the relative distance of the twin's and the trajectory's final
hidden states at the window's ``j``-th position.

The finite-time Lyapunov exponent is the mean of the local exponents measured within the last
``window`` steps (at least the latest). It is 0 until the first window is read (step 24 at the
defaults: 16 tokens, read 8 steps later).

Classes (first that applies): ``divergent`` (non-finite values, or ``lambda > 10 * threshold``),
``periodic`` (the last ``window`` tokens repeat with a period ``p <= window / 2``),
``chaotic`` (``lambda > threshold``), else ``stable``. Instability is predicted when the
linear trend of ``lambda`` crosses the threshold within ``predictive_horizon`` steps.

Stability score: ``s = sigmoid(-4 (lambda - thr) / thr)``, halved when periodic, 0 when divergent.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import StabilityConfig

STABLE, PERIODIC, CHAOTIC, DIVERGENT = "stable", "periodic", "chaotic", "divergent"
UNMONITORED = "unmonitored"  # a generation's label when stability monitoring is off
CLASSES = (STABLE, PERIODIC, CHAOTIC, DIVERGENT)


def detect_period(tokens: list[int], window: int) -> int | None:
    """Smallest ``p <= window // 2`` with ``tokens[i] == tokens[i - p]`` over the last ``window`` tokens.

    So the last ``window + p`` tokens hold at least three full cycles of length ``p``.
    """
    n = len(tokens)
    if n <= window:
        return None
    last, longest = tokens[-1], min(window // 2, n - window)
    if last not in tokens[n - 1 - longest:n - 1]:  # no period without the last token repeating
        return None
    for p in range(1, longest + 1):
        # the last token must repeat first: most periods fail here without slicing the window
        if tokens[-1 - p] == last and tokens[n - window:] == tokens[n - window - p:n - p]:
            return p
    return None


class TemperatureController:
    """Keeps the normalised entropy of the sampling distribution in ``[low, high]``.

        T <- T (1 - step)            if h > high or the dynamics are unstable   (entropy explodes)
        T <- T (1 + step)            if h < low or the output is periodic       (entropy collapses)
        T <- T + step (T_0 - T)      otherwise                                  (relax to the request)

    always clipped to ``[min_temperature, max_temperature]``. ``T_0 = 0`` (greedy) is left alone,
    and so is any requested temperature when ``auto_temperature_adjust`` is off.
    """

    def __init__(self, config: StabilityConfig, base: float) -> None:
        self.config = config
        self.base = base
        adjust = config.auto_temperature_adjust and base != 0
        self.temperature = self._clip(base) if adjust else base

    def _clip(self, t: float) -> float:
        return min(self.config.max_temperature, max(self.config.min_temperature, t))

    def suggest(self, temperature: float, entropy_norm: float | None, unstable: bool, collapsed: bool,
                base: float | None = None) -> float:
        """The next temperature from the current one and the latest measurements (pure)."""
        if temperature == 0:
            return 0.0
        c = self.config
        base = self.base if base is None else base
        if unstable or (entropy_norm is not None and entropy_norm > c.entropy_high):
            t = temperature * (1 - c.temperature_step)
        elif collapsed or (entropy_norm is not None and entropy_norm < c.entropy_low):
            t = temperature * (1 + c.temperature_step)
        else:
            t = temperature + c.temperature_step * (self._clip(base) - temperature)
        return self._clip(t)

    def update(self, entropy_norm: float, unstable: bool, collapsed: bool) -> float:
        if self.config.auto_temperature_adjust:
            self.temperature = self.suggest(self.temperature, entropy_norm, unstable, collapsed)
        return self.temperature


@dataclass
class StabilityState:
    """What the monitor knows after the latest step (kept in the session, serialisable)."""

    label: str = STABLE
    lyapunov: float = 0.0
    entropy_norm: float | None = None
    period: int | None = None
    predicted_unstable: bool = False
    local_exponents: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "lyapunov": self.lyapunov, "entropy_norm": self.entropy_norm,
                "period": self.period, "predicted_unstable": self.predicted_unstable,
                "local_exponents": list(self.local_exponents)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StabilityState":
        return cls(str(d["label"]), float(d["lyapunov"]), None if d["entropy_norm"] is None else float(d["entropy_norm"]),
                   None if d["period"] is None else int(d["period"]), bool(d["predicted_unstable"]),
                   [float(v) for v in d["local_exponents"]])


class PredictiveStability:
    """Per-step tracker: feeds on entropy, twin exponents and tokens; classifies and warns."""

    def __init__(self, config: StabilityConfig, vocab_size: int, state: StabilityState | None = None) -> None:
        self.config = config
        self.log_v = math.log(vocab_size)
        self.state = state or StabilityState()
        # one exponent per twin window (see lyapunov.py), with the step its window ended at; the
        # estimate averages the ones measured within the last ``window`` steps
        self.exponents: deque[float] = deque(self.state.local_exponents, maxlen=max(config.window, 4))
        self.positions: deque[int] = deque(range(len(self.exponents)), maxlen=self.exponents.maxlen)
        self.warnings: list[str] = []
        self._nonfinite = False
        self._slope, self._slope_at = 0.0, (0, 0.0)
        self._observed = 0  # exponents appended so far
        self._estimated_at = -1  # the value of ``_observed`` when the estimate was last computed

    # --- feeding ------------------------------------------------------------------------
    def start(self) -> None:
        """New generation: forget the previous one's exponents and warnings."""
        self.exponents.clear()
        self.positions.clear()
        self.warnings = []
        self._nonfinite = False
        self._observed, self._estimated_at = 0, -1

    def observe_exponent(self, exponent: float, position: int) -> None:
        """A local exponent measured by the twin over a window that ended at step count
        ``position`` (see lyapunov.py); a non-finite one marks the dynamics divergent."""
        if not math.isfinite(exponent):
            self._nonfinite = True
            return
        self.exponents.append(exponent)
        self.positions.append(position)
        self._observed += 1

    def refresh(self, step: int | None = None) -> StabilityState:
        """Recompute the exponent estimate from the exponents observed so far and classify again
        (after the last step: the Lyapunov twin's window read when the generation ends may turn
        a stable label chaotic or divergent; ``step`` names the step in a warning). The period
        stays the one detected at the last step."""
        self.state.lyapunov = self._estimate()
        self.state.local_exponents = list(self.exponents)
        self._estimated_at = self._observed
        self._classify(step if step is not None else 0)
        return self.state

    def observe(self, step: int, entropy: float, tokens: list[int], finite: bool = True) -> StabilityState:
        """Update the state after step ``step`` (0-based) with the sampling entropy and the tokens so far."""
        c, s = self.config, self.state
        if not finite or not math.isfinite(entropy):
            self._nonfinite = True
        s.entropy_norm = entropy / self.log_v if math.isfinite(entropy) else None
        if self._estimated_at != self._observed:  # the estimate changes with a new exponent only
            s.lyapunov = self._estimate()
            s.local_exponents = list(self.exponents)
            self._estimated_at = self._observed
        s.period = detect_period(tokens, c.window)
        self._classify(step)
        forecast = self._forecast()
        predicted = forecast > c.lyapunov_threshold and s.label == STABLE
        if predicted and not s.predicted_unstable:
            self.warnings.append(f"step {step}: instability predicted within {c.predictive_horizon} steps "
                                 f"(lyapunov forecast {forecast:.4f} > {c.lyapunov_threshold})")
        s.predicted_unstable = predicted
        return s

    def _classify(self, step: int) -> None:
        """The label from the non-finite flag, the exponent estimate and the period; a change to
        a label other than stable is a warning naming ``step``."""
        c, s = self.config, self.state
        previous = s.label
        if self._nonfinite or s.lyapunov > 10 * c.lyapunov_threshold:
            s.label = DIVERGENT
        elif s.period is not None:
            s.label = PERIODIC
        elif s.lyapunov > c.lyapunov_threshold:
            s.label = CHAOTIC
        else:
            s.label = STABLE
        if s.label != previous and s.label != STABLE:
            detail = f" (period {s.period})" if s.label == PERIODIC else f" (lyapunov {s.lyapunov:.4f})"
            self.warnings.append(f"step {step}: generation became {s.label}{detail}")

    def _estimate(self) -> float:
        """Mean of the exponents measured within the last ``window`` steps (at least the latest)."""
        if not self.exponents:
            return 0.0
        since = self.positions[-1] - self.config.window
        recent = [e for e, p in zip(self.exponents, self.positions) if p > since]
        return float(np.mean(recent))

    def _forecast(self) -> float:
        """Linear trend of the local exponents, extrapolated ``predictive_horizon`` steps ahead.

        Two exponents make a trend: at the default of one twin window every 64 steps, asking for
        more would leave generations shorter than about 200 tokens without any prediction."""
        n = len(self.exponents)
        if n < 2:  # no trend yet: the forecast is the estimate itself
            return self.state.lyapunov
        if self._slope_at != (n, self.exponents[-1]):  # least-squares slope, recomputed per new exponent
            x = np.fromiter(self.positions, dtype=np.float64, count=n)
            y = np.fromiter(self.exponents, dtype=np.float64, count=n)
            xc = x - x.mean()
            self._slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))  # change of the exponent per step
            self._slope_at = (n, self.exponents[-1])
        return float(self.state.lyapunov + self._slope * self.config.predictive_horizon)

    # --- reading ------------------------------------------------------------------------
    @property
    def unstable(self) -> bool:
        return self.state.label in (CHAOTIC, DIVERGENT) or self.state.predicted_unstable

    def score(self) -> float:
        return stability_score(self.state, self.config.lyapunov_threshold)


def stability_score(state: StabilityState, threshold: float) -> float:
    """``sigmoid(-4 (lambda - thr) / thr)``, halved when periodic, 0 when divergent; in [0, 1]."""
    if state.label == DIVERGENT:
        return 0.0
    z = -4.0 * (state.lyapunov - threshold) / max(threshold, 1e-9)
    s = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))
    return s * (0.5 if state.label == PERIODIC else 1.0)
