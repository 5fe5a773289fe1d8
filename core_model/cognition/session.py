"""The cognitive session: every piece of inference-time state, outside the nn.Module.

Goals and foci (agency), concept bindings (PRSC), episodic memory, the stability tracker's
state, the repetition window, the latest oscillator phases, the conversation so far and the
counters (episode, turn, generations, global token step). ``to_dict`` gives plain Python types
only (dicts, lists, str, int, float, bool, None: msgpack- and JSON-friendly); ``from_dict``
restores it so a restored session continues exactly as the original would. Derived caches (calibration hidden
state, offset tables) are not stored: they are recomputed from the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ResoLLMConfig
from .agency import AgencyState
from .errors import CognitionError, SessionStateError
from .memory import TemporalSedenionMemory
from .prsc import ConceptStore
from .resonance import RepetitionDetector
from .stability import StabilityState, TemperatureController, stability_score

SESSION_FORMAT = 1


class CognitiveSession:
    def __init__(self, config: ResoLLMConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = int(seed)
        self.tokenizer = None  # attached by the engine; not serialised
        self._derived: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything: goals, foci, concepts, memory, trackers, history, counters. Values
        derived from the weights alone (``derived``) are kept: each is checked against its key."""
        c = self.config
        self.agency = AgencyState()
        self.concepts = ConceptStore(c.vocab_size, c.num_phases, c.prsc.max_bindings, c.prsc.coherence_threshold)
        self.memory = TemporalSedenionMemory(c.temporal_smf.memory_decay_rate, c.temporal_smf.max_moments,
                                             c.temporal_smf.episodic_tagging)
        self.stability = StabilityState()
        self.repetition = RepetitionDetector(c.stochastic_resonance.repetition_window)
        self.phases: list[float] | None = None
        self.history: list[dict[str, str]] = []  # chat turns {"role", "text"}
        self.episode = 0
        self.turn = 0  # generations in this episode
        self.generations = 0  # generations over the session (not reset by new_episode): the default seeds
        self.step = 0  # tokens generated over the session

    def apply_config(self, config: ResoLLMConfig) -> None:
        """Use ``config`` (same network) from now on, keeping the state: the memory's decay rate,
        capacity (the weakest moments are pruned beyond it) and tagging, the concept store's
        limits and the repetition window follow the new settings."""
        smf, prsc = config.temporal_smf, config.prsc
        if len(self.concepts) > prsc.max_bindings:
            raise CognitionError(f"the session holds {len(self.concepts)} concepts, more than the new "
                                 f"prsc.max_bindings={prsc.max_bindings}; unbind some first")
        self.config = config
        self.memory.configure(smf.memory_decay_rate, smf.max_moments, smf.episodic_tagging)
        self.concepts.max_bindings, self.concepts.coherence_threshold = prsc.max_bindings, prsc.coherence_threshold
        window = config.stochastic_resonance.repetition_window
        if window != self.repetition.window:
            self.repetition = RepetitionDetector(window, self.repetition.n, tokens=list(self.repetition.tokens))

    def new_episode(self) -> int:
        self.episode += 1
        self.turn = 0
        self.history = []
        return self.episode

    # --- views --------------------------------------------------------------------------
    def stability_score(self) -> float:
        return stability_score(self.stability, self.config.stability.lyapunov_threshold)

    def suggested_temperature(self, current: float) -> float:
        """The temperature the controller would move ``current`` to after the latest generation's
        measurements; ``current`` itself when ``stability.auto_temperature_adjust`` is off (a
        generation then samples at the requested temperature as is)."""
        if not self.config.stability.auto_temperature_adjust:
            return current
        ctrl = TemperatureController(self.config.stability, current)
        unstable = self.stability.label in ("chaotic", "divergent") or self.stability.predicted_unstable
        return ctrl.suggest(current, self.stability.entropy_norm, unstable, self.stability.label == "periodic")

    def derived(self, key: str) -> Any:
        return self._derived.get(key)

    def set_derived(self, key: str, value: Any) -> None:
        self._derived[key] = value

    # --- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SESSION_FORMAT,
            "seed": self.seed,
            "model": {"vocab_size": self.config.vocab_size, "dim": self.config.dim,
                      "num_phases": self.config.num_phases},
            "agency": self.agency.to_dict(),
            "concepts": self.concepts.to_dict(),
            "memory": self.memory.to_dict(),
            "stability": self.stability.to_dict(),
            "repetition": list(self.repetition.tokens),
            "phases": None if self.phases is None else [float(v) for v in self.phases],
            "history": [dict(t) for t in self.history],
            "episode": self.episode,
            "turn": self.turn,
            "generations": self.generations,
            "step": self.step,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], config: ResoLLMConfig) -> "CognitiveSession":
        """The session ``to_dict`` gave, with ``config``'s settings; a dict that is not one (a
        key missing, a value of the wrong type or shape) raises :class:`SessionStateError`."""
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise SessionStateError(f"not a session dict of format {SESSION_FORMAT}")
        want = {"vocab_size": config.vocab_size, "dim": config.dim, "num_phases": config.num_phases}
        got = data.get("model")
        if got != want:
            raise SessionStateError(f"session was saved for a model with {got}, this model has {want}")
        try:
            s = cls(config, int(data["seed"]))
            s.agency = AgencyState.from_dict(data["agency"])
            s.concepts.load(data["concepts"])
            s.memory = TemporalSedenionMemory.from_dict(data["memory"])
            s.stability = StabilityState.from_dict(data["stability"])
            s.repetition = RepetitionDetector(config.stochastic_resonance.repetition_window,
                                              tokens=[int(t) for t in data["repetition"]])
            s.phases = None if data["phases"] is None else [float(v) for v in data["phases"]]
            s.history = [{"role": str(t["role"]), "text": str(t["text"])} for t in data["history"]]
            s.episode, s.turn, s.step = int(data["episode"]), int(data["turn"]), int(data["step"])
            s.generations = int(data.get("generations", s.turn))  # dicts saved before the counter: the turn
            s.apply_config(config)  # the settings are the config's, the state is the dict's
        except (KeyError, TypeError, ValueError, AttributeError, CognitionError) as exc:
            raise SessionStateError(f"malformed session dict: {exc!r}") from exc
        for goal in s.agency.goals:
            if len(goal.vector) != config.dim:
                raise SessionStateError(f"goal {goal.description!r} has a {len(goal.vector)}-dim vector, "
                                        f"the model {config.dim}")
        return s

    def phase_vector(self) -> np.ndarray | None:
        return None if self.phases is None else np.asarray(self.phases)
