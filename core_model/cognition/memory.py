"""Temporal sedenion memory: episodic moments on the 16 sedenion axes, with a logical clock.

A moment ``m`` holds a unit sedenion state ``s_m`` (the text's hidden states projected to the
16 named axes), the logical time ``t_m`` it was stored at, an importance ``w_m > 0`` and its
episode/turn tags. With the clock at ``t``

    weight_m(t) = w_m * exp(-rate * (t - t_m))                     (decay; importance never cancels)
    S(t)        = sum_m weight_m(t) s_m / | sum_m weight_m(t) s_m |   (consolidated state)
    sim(q, m)   = Re(q* s_m) / (|q| |s_m|)                          (sedenion inner product)
    score       = sim(q, m) * weight_m(t)                           (recall ranking)

Beyond ``max_moments`` the moment with the smallest current weight is pruned. ``S`` is what
conditions generation (see ``api.memory_offset``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import sedenion


@dataclass
class Moment:
    state: list[float]  # 16 floats, unit norm
    time: int  # logical clock when stored
    importance: float
    episode: int
    turn: int
    text: str

    def weight(self, now: int, rate: float) -> float:
        return self.importance * math.exp(-rate * max(0, now - self.time))


@dataclass
class Recollection:
    """A recalled moment with its tags: what, when (clock, episode, turn), how strongly."""

    text: str
    time: int
    age: int
    episode: int
    turn: int
    weight: float
    similarity: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked(state: Any, importance: float, text: str | None = None) -> np.ndarray:
    """``state`` as 16 finite float64 components with an importance > 0, or ValueError (a
    diverging model's hidden states are refused, never stored)."""
    state = np.asarray(state, dtype=np.float64).reshape(-1)
    where = "" if text is None else f" ({text!r:.40})"
    if state.shape != (16,):
        raise ValueError(f"a memory state has 16 components, got {state.size}{where}")
    if not np.isfinite(state).all():
        raise ValueError(f"a memory state must be finite, got NaN or infinite components{where}")
    if not importance > 0:
        raise ValueError(f"importance must be > 0, got {importance}{where}")
    return state


class TemporalSedenionMemory:
    """Moments, a logical clock, decay, pruning and recall (see module docstring)."""

    def __init__(self, decay_rate: float = 0.01, max_moments: int = 1000, episodic_tagging: bool = True) -> None:
        self.clock = 0
        self.moments: list[Moment] = []
        self.configure(decay_rate, max_moments, episodic_tagging)

    def configure(self, decay_rate: float, max_moments: int, episodic_tagging: bool) -> None:
        """New settings for the moments held (beyond ``max_moments`` the weakest are pruned)."""
        if decay_rate < 0 or max_moments < 1:
            raise ValueError("decay_rate must be >= 0 and max_moments >= 1")
        self.decay_rate, self.max_moments, self.episodic_tagging = decay_rate, max_moments, episodic_tagging
        self._prune()

    def __len__(self) -> int:
        return len(self.moments)

    # --- time -------------------------------------------------------------------------
    def tick(self, steps: int = 1) -> int:
        """Advance the logical clock (one tick per stored moment and per generation turn)."""
        if steps < 0:
            raise ValueError("the clock only moves forward")
        self.clock += steps
        return self.clock

    def weights(self) -> np.ndarray:
        return np.array([m.weight(self.clock, self.decay_rate) for m in self.moments])

    # --- writing ----------------------------------------------------------------------
    def store(self, state: np.ndarray, text: str, importance: float = 1.0, episode: int = 0, turn: int = 0) -> Moment:
        """Store a moment at the current clock, then advance the clock by one."""
        state = _checked(state, importance)
        n = float(sedenion.norm(state))
        unit = state / n if n > 0 else state
        if not self.episodic_tagging:
            episode, turn = 0, 0
        moment = Moment(unit.tolist(), self.clock, float(importance), int(episode), int(turn), text)
        self.moments.append(moment)
        self.tick()
        self._prune()
        return moment

    def _prune(self) -> None:
        while len(self.moments) > self.max_moments:
            weakest = int(np.argmin(self.weights()))
            self.moments.pop(weakest)

    def fold(self, state: np.ndarray, weight: float) -> None:
        """Blend an external sedenion state (another agent's) into the newest moment's state."""
        if not self.moments or weight <= 0:
            return
        m = self.moments[-1]
        mixed = (1 - weight) * np.asarray(m.state) + weight * np.asarray(state, dtype=np.float64)
        if not np.isfinite(mixed).all():
            raise ValueError("a folded sedenion state must be finite, got NaN or infinite components")
        n = float(sedenion.norm(mixed))
        m.state = (mixed / n if n > 0 else mixed).tolist()

    # --- reading ----------------------------------------------------------------------
    def consolidated(self) -> np.ndarray:
        """The normalised weighted sum ``S(t)`` of all moments (zeros when empty)."""
        if not self.moments:
            return np.zeros(16)
        states = np.array([m.state for m in self.moments])  # (M, 16)
        total = (self.weights()[:, None] * states).sum(0)
        n = float(sedenion.norm(total))
        return total / n if n > 0 else total

    def recall(self, query_state: np.ndarray, k: int = 5) -> list[Recollection]:
        """The ``k`` moments with the highest ``similarity * weight``, best first."""
        if not self.moments:
            return []
        q = np.asarray(query_state, dtype=np.float64)
        states = np.array([m.state for m in self.moments])
        qn = float(sedenion.norm(q)) or 1.0
        sims = sedenion.inner(np.broadcast_to(q, states.shape), states) / (qn * np.maximum(sedenion.norm(states), 1e-12))
        weights = self.weights()
        scores = sims * weights
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            Recollection(self.moments[i].text, self.moments[i].time, self.clock - self.moments[i].time,
                         self.moments[i].episode, self.moments[i].turn, float(weights[i]), float(sims[i]),
                         float(scores[i]))
            for i in order
        ]

    # --- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"clock": self.clock, "decay_rate": self.decay_rate, "max_moments": self.max_moments,
                "episodic_tagging": self.episodic_tagging, "moments": [asdict(m) for m in self.moments]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TemporalSedenionMemory":
        mem = cls(float(data["decay_rate"]), int(data["max_moments"]), bool(data["episodic_tagging"]))
        mem.clock = int(data["clock"])
        mem.moments = [Moment([float(v) for v in m["state"]], int(m["time"]), float(m["importance"]),
                              int(m["episode"]), int(m["turn"]), str(m["text"])) for m in data["moments"]]
        for m in mem.moments:  # refused here, not later in the middle of a generation
            _checked(m.state, m.importance, m.text)
        return mem
