"""The model-level cognition API of the seed document, as a mixin of ``ResoLLMModel``.

The methods delegate to one :class:`CognitiveSession` held as a plain attribute
(``model.session``: created lazily, not an ``nn.Module``, not in ``state_dict``). Text is
encoded with the model itself: final hidden states averaged over the text and centred by the
mean hidden state on a neutral calibration text (``encode_text``). Memory states are that
vector projected to the 16 sedenion axes by ``memory_proj`` read backwards (its transpose), so
the same matrix writes memory into the network (``memory_offset``) and reads text into memory.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np
import torch

from ..config import ConfigError, ResoLLMConfig
from ..derived import version_key
from ..generation import eval_mode
from .agency import AttentionFocus, Goal, content_words
from .errors import CognitionError
from .memory import Moment, Recollection
from .prsc import ConceptBinding
from .session import CognitiveSession

if TYPE_CHECKING:
    from ..tokenizer import ResoTokenizer

_R = TypeVar("_R")

CALIBRATION_TEXT = (
    "The morning was quiet. People walked to work, talked about the weather and read the news. "
    "Some of them thought about numbers, some about music, and others about their plans for the day."
)


# --- one model, one user at a time ------------------------------------------------------------
_locks: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def generation_lock(model) -> threading.RLock:
    """The model's generation lock: generations on one model take turns (they share its session,
    its attention probe and the stochastic-resonance noise they switch on in its FFNs), and so do
    the cognition API's forwards (``hidden_states``) and its changes to the session. Reentrant:
    a generation encodes with it held. Kept outside the module, so the model still pickles and
    copies."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


def _serialised(method: Callable[..., _R]) -> Callable[..., _R]:
    """``method`` of the model, run with ``generation_lock(self)`` held (waits for a generation)."""
    @functools.wraps(method)
    def locked(self, *args: Any, **kwargs: Any) -> _R:
        with generation_lock(self):
            return method(self, *args, **kwargs)
    return locked


# --- text encoding with the model ---------------------------------------------------------
@torch.no_grad()
def hidden_states(model, ids: list[int]) -> torch.Tensor:
    """Final hidden states (T, D) of ``ids`` (the last ``max_seq_len`` of them), eval mode. The
    forward waits for a generation running on the model (``generation_lock``): it would otherwise
    pick up that generation's stochastic-resonance noise and draw from its noise generator."""
    if not ids:
        raise CognitionError("cannot encode an empty text")
    ids = ids[-model.config.max_seq_len:]
    with generation_lock(model), eval_mode(model):
        out = model(torch.tensor([ids], device=next(model.parameters()).device))
    return out.hidden[0].float()


def reference_hidden(model) -> np.ndarray:
    """Mean hidden state on the calibration text, cached on the session (a reset keeps it) until
    any parameter is replaced or changes in place (an optimizer step, ``load_state_dict``,
    ``.to()``) or another tokenizer is attached."""
    session = model.session
    tok = session_tokenizer(model)
    weights = version_key(model.parameters())
    cached = session.derived("reference_hidden")
    if cached is not None and cached[0] is tok and cached[1] == weights:
        return cached[2]
    ref = hidden_states(model, tok.encode(CALIBRATION_TEXT)).mean(0).cpu().numpy()
    session.set_derived("reference_hidden", (tok, weights, ref))
    return ref


def encode_text(model, text: str) -> np.ndarray:
    """Centred mean hidden state of ``text``: ``mean_t h_t - h_ref`` (D,)."""
    ids = session_tokenizer(model).encode(text)
    return hidden_states(model, ids).mean(0).cpu().numpy() - reference_hidden(model)


def session_tokenizer(model) -> "ResoTokenizer":
    tok = model.session.tokenizer
    if tok is None:
        from ..tokenizer import DEFAULT_VOCAB_SIZE, create_default_tokenizer

        if model.config.vocab_size != DEFAULT_VOCAB_SIZE:
            raise CognitionError("no tokenizer attached to the session: create ResoLLMInference(model, tokenizer) "
                                 "or call model.attach_tokenizer(tokenizer) first")
        tok = model.session.tokenizer = create_default_tokenizer()
    return tok


# (config field, the module it needs, the component's name): built only when the field is on
_BUILT_COMPONENTS = (("prsc", "concept_proj", "PRSC"), ("temporal_smf", "memory_proj", "temporal sedenion memory"))


def _built_without(field: str, module: str, name: str) -> str:
    return f"the model was built without {name} (no {module}: its config had {field}.enabled=False)"


def check_built_components(model, config: ResoLLMConfig) -> None:
    """Raise :class:`ConfigError` if ``config`` switches on a component whose projection
    ``model`` was built without (PRSC: ``concept_proj``, temporal memory: ``memory_proj``), which
    it then could not use. Switching off a component the model has is fine."""
    for field, module, name in _BUILT_COMPONENTS:
        if getattr(config, field).enabled and getattr(model, module, None) is None:
            raise ConfigError(f"{field}.enabled: {_built_without(field, module, name)}; switch it off in "
                              f"this config, or build the model with it on")


def memory_state(model, text: str) -> np.ndarray:
    """The text on the 16 sedenion axes: ``memory_proj.weight^T (mean h - h_ref)``."""
    proj = getattr(model, "memory_proj", None)
    if proj is None:
        raise CognitionError(f"{_built_without(*_BUILT_COMPONENTS[1])}: it has no memory to read or write")
    v = torch.as_tensor(encode_text(model, text), dtype=proj.weight.dtype, device=proj.weight.device)
    return (proj.weight.detach().T @ v).double().cpu().numpy()


# --- offsets into the network ---------------------------------------------------------------
class ConceptInput:
    """Input offsets of PRSC concepts: ``concept_proj([cos theta_c, sin theta_c])`` at the positions
    where a concept's token sequence ends (``theta_c`` of the composition if several end there)."""

    def __init__(self, model) -> None:
        self.proj = getattr(model, "concept_proj", None)
        self.store = model.session.concepts
        self.enabled = self.proj is not None and model.session.config.prsc.enabled and len(self.store) > 0
        self._rows: dict[tuple[str, ...], torch.Tensor] = {}

    def row(self, names: list[str]) -> torch.Tensor:
        key = tuple(sorted(names))
        if key not in self._rows:
            th = torch.as_tensor(self.store.phases_of(list(key)), dtype=self.proj.weight.dtype,
                                 device=self.proj.weight.device)
            with torch.no_grad():
                self._rows[key] = self.proj(torch.cat([th.cos(), th.sin()]))
        return self._rows[key]

    def offsets(self, context: list[int], start: int) -> torch.Tensor | None:
        """Offsets (T, D) for positions ``start..len(context)-1``, or None when no concept occurs."""
        if not self.enabled:
            return None
        out = None
        for pos in range(start, len(context)):
            names = self.store.ending_at(context, pos + 1)
            if names:
                if out is None:
                    out = torch.zeros(len(context) - start, self.proj.out_features, dtype=self.proj.weight.dtype,
                                      device=self.proj.weight.device)
                out[pos - start] = self.row(names)
        return out


def memory_offset(model) -> torch.Tensor | None:
    """``strength * memory_proj(S)`` (D,) from the consolidated memory state, or None."""
    session = model.session
    proj = getattr(model, "memory_proj", None)
    cfg = session.config.temporal_smf
    if proj is None or not cfg.enabled or len(session.memory) == 0 or cfg.conditioning_strength == 0:
        return None
    s = torch.as_tensor(session.memory.consolidated(), dtype=proj.weight.dtype, device=proj.weight.device)
    with torch.no_grad():
        return cfg.conditioning_strength * proj(s)


# --- the mixin --------------------------------------------------------------------------------
class CognitionMixin:
    """Goals, attention foci, concepts, stability and memory on the model (see module docstring).

    The methods that change the session wait for a generation running on the model (they hold
    ``generation_lock``), so a call from another thread never changes the state under it."""

    @property
    def session(self) -> CognitiveSession:
        s = self.__dict__.get("_cognitive_session")
        if s is None:
            s = CognitiveSession(self.config)
            self.__dict__["_cognitive_session"] = s
        return s

    @session.setter
    def session(self, value: CognitiveSession) -> None:
        if not isinstance(value, CognitiveSession):
            raise TypeError(f"expected a CognitiveSession, got {type(value).__name__}")
        self.__dict__["_cognitive_session"] = value

    @_serialised
    def attach_tokenizer(self, tokenizer: "ResoTokenizer") -> None:
        if tokenizer.vocab_size != self.config.vocab_size:
            raise CognitionError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {self.config.vocab_size}")
        self.session.tokenizer = tokenizer

    @_serialised
    def reset_cognition(self) -> None:
        """Clear goals, foci, concepts, memory and trackers (the weights are untouched)."""
        self.session.reset()

    def cognition_state(self) -> dict[str, Any]:
        return self.session.to_dict()

    @_serialised
    def load_cognition_state(self, data: dict[str, Any]) -> None:
        """Restore the state ``cognition_state()`` returned (goals, memory, concepts, trackers,
        history); the settings (which components are on, their limits) stay the current ones."""
        tok = self.session.tokenizer
        self.session = CognitiveSession.from_dict(data, self.session.config)  # the engine's settings stay
        self.session.tokenizer = tok

    # --- agency -------------------------------------------------------------------------
    @_serialised
    def create_goal(self, description: str, goal_type: str = "exploratory", priority: float = 1.0) -> Goal:
        """A goal encoded with the model; it steers the next generations until achieved."""
        session = self.session
        cfg = session.config.agency
        if not cfg.enabled:
            raise CognitionError("the agency layer is disabled (config.agency.enabled=False)")
        if not description.strip():
            raise CognitionError("a goal needs a description")
        if not 0 < priority <= 1:
            raise CognitionError(f"priority must lie in (0, 1], got {priority}")
        if len(session.agency.active_goals()) >= cfg.max_goals:
            raise CognitionError(f"{cfg.max_goals} goals are already active (agency.max_goals)")
        tok = session_tokenizer(self)
        words = content_words(description)
        seqs: list[list[int]] = []
        boundary: list[bool] = []
        word_of: list[int] = []
        for wi, w in enumerate(words):
            for variant in (w, " " + w):
                ids = tok.encode(variant)
                needs_boundary = variant == w
                if ids and not tok.decode(ids[:1]).strip():  # a lone space token: drop it
                    ids, needs_boundary = ids[1:], True
                if ids and ids not in seqs:
                    seqs.append(ids)
                    boundary.append(needs_boundary)
                    word_of.append(wi)
        goal = Goal(session.agency.next_goal_id, description, goal_type, float(priority),
                    encode_text(self, description).astype(float).tolist(), words, seqs, boundary, word_of,
                    [False] * len(words))
        session.agency.next_goal_id += 1
        session.agency.goals.append(goal)
        return goal

    def get_active_goals(self) -> list[Goal]:
        return self.session.agency.active_goals()

    def get_goals(self) -> list[Goal]:
        return list(self.session.agency.goals)

    def goal_progress(self, goal: Goal, text: str) -> float:
        """What ``goal``'s progress would be for ``text`` (encoded with the model)."""
        return goal.measure(encode_text(self, text), text)

    def get_attention_foci(self) -> list[AttentionFocus]:
        """The foci of the latest generation (most salient first)."""
        return list(self.session.agency.foci)

    # --- PRSC -----------------------------------------------------------------------------
    @_serialised
    def bind_concept(self, name: str, token_id: int | None = None, token_ids: list[int] | None = None) -> ConceptBinding:
        """Bind ``name`` to one token, several tokens, or (neither given) the tokens of ``name``."""
        session = self.session
        if not session.config.prsc.enabled:
            raise CognitionError("PRSC is disabled (config.prsc.enabled=False)")
        if getattr(self, "concept_proj", None) is None:  # a binding would change nothing
            raise CognitionError(f"{_built_without(*_BUILT_COMPONENTS[0])}: it cannot use concepts")
        ids = list(token_ids or []) + ([token_id] if token_id is not None else [])
        if not ids:
            ids = session_tokenizer(self).encode(name)
        return session.concepts.bind(name, [int(t) for t in ids])

    @_serialised
    def compose_concepts(self, *names: str) -> ConceptBinding:
        return self.session.concepts.compose(*names)

    def concept_coherence(self, *names: str) -> float:
        return self.session.concepts.coherence(*names)

    # --- stability ------------------------------------------------------------------------
    def get_stability(self) -> float:
        """Stability of the latest generation in [0, 1] (``stability_score``): about 0.98 before any
        generation, whose exponent of 0 lies well below the threshold."""
        return self.session.stability_score()

    def get_suggested_temperature(self, current_temp: float) -> float:
        return self.session.suggested_temperature(current_temp)

    # --- memory ---------------------------------------------------------------------------
    @_serialised
    def update_memory(self, text: str, importance: float = 1.0) -> Moment:
        """Encode ``text`` on the 16 axes and store it at the current clock, episode and turn."""
        session = self.session
        if not session.config.temporal_smf.enabled:
            raise CognitionError("temporal sedenion memory is disabled (config.temporal_smf.enabled=False)")
        return session.memory.store(memory_state(self, text), text, importance, session.episode, session.turn)

    def recall_memory(self, query: str, k: int = 5) -> list[Recollection]:
        return self.session.memory.recall(memory_state(self, query), k)

    def when_did_i_learn(self, query: str, k: int = 3) -> list[Recollection]:
        """The moments that best match ``query``, with clock time, age, episode and turn."""
        return self.recall_memory(query, k)


__all__ = ["CognitionMixin", "ConceptInput", "check_built_components", "encode_text", "generation_lock",
           "memory_offset", "memory_state", "reference_hidden"]
