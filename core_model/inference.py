"""The inference engine of the seed document: ``ResoLLMInference`` and ``GenerationResult``.

    engine = ResoLLMInference(model, tokenizer, config)
    result = engine.generate("Once upon a time", max_length=100)      # max_length: new tokens
    result = engine.generate_with_goal(prompt, goal_description, max_length=200)
    engine.interactive_session(show_metrics=True)                      # stdin/stdout by default

State (goals, foci, concepts, memory, trackers) lives in ``model.session``
(:class:`core_model.cognition.CognitiveSession`); the engine and the model's own methods
(``model.create_goal``, ``model.update_memory``, ...) share it. The decoding loop is
:class:`core_model.cognition.decoding.CognitiveDecoder`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from .cognition.api import check_built_components, generation_lock
from .cognition.decoding import CognitiveDecoder
from .cognition.interactive import run_interactive
from .cognition.stability import UNMONITORED
from .config import ResoLLMConfig
from .generation import SamplingParams


@dataclass
class GenerationResult:
    """Everything one generation produced; ``to_dict()`` is JSON-ready."""

    text: str  # the generated continuation (prompt excluded)
    tokens_generated: int
    stability: str  # "stable" | "periodic" | "chaotic" | "divergent"; "unmonitored" with stability off
    lyapunov: float  # finite-time Lyapunov exponent at the end (per token; 0.0 when unmonitored)
    entropy_trace: list[float]  # entropy of the sampling distribution per step (nats; greedy: of softmax(logits))
    lyapunov_trace: list[float]  # running finite-time exponent per step
    temperature_trace: list[float]  # temperature used at each step
    coherence_trace: list[float]  # Kuramoto order parameter at the position each token was sampled from
    # (the prompt's last position for the first token; empty without phases)
    goals_achieved: list[str]  # descriptions of goals achieved during this generation
    attention_summary: list[dict[str, Any]]  # the attention foci at the end, most salient first (agency off: [])
    warnings: list[str]  # each names its step
    generation_time_ms: float
    prompt: str = ""
    token_ids: list[int] = field(default_factory=list)
    stability_score: float | None = 1.0  # model.get_stability() after this generation (None: unmonitored)
    repetition_trace: list[float] = field(default_factory=list)  # repeated-4-gram share of the window
    noise_steps: int = 0  # steps with stochastic-resonance noise on
    halted: bool = False  # stopped early on instability (opt-in)
    goal_progress: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain values (a diverging model's non-finite floats included)."""
        return asdict(self)

    def to_json(self) -> str:
        """``to_dict()`` as standard JSON: a non-finite float (NaN or infinite entropy from a
        diverging model) becomes ``null``, which every JSON parser reads."""
        return json.dumps(_finite_or_none(self.to_dict()), allow_nan=False)

    def metrics_line(self) -> str:
        coh = f"{self.coherence_trace[-1]:.3f}" if self.coherence_trace else "n/a"
        ent = f"{sum(self.entropy_trace) / len(self.entropy_trace):.3f}" if self.entropy_trace else "n/a"
        temp = f"{self.temperature_trace[-1]:.2f}" if self.temperature_trace else "n/a"
        score = "n/a" if self.stability_score is None else f"{self.stability_score:.2f}"
        return (f"[stability={self.stability} score={score} lyapunov={self.lyapunov:.4f} "
                f"entropy={ent} temperature={temp} coherence={coh} tokens={self.tokens_generated} "
                f"time_ms={self.generation_time_ms:.0f} warnings={len(self.warnings)}]")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


class ResoLLMInference:
    """Generation with inference-time cognition over ``model.session``."""

    def __init__(self, model, tokenizer, config: ResoLLMConfig | None = None, *, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None) -> None:
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model {model.config.vocab_size}")
        with generation_lock(model):  # the session changes below wait for a generation running on the model
            if config is not None and config is not model.session.config:  # the model's own config applies too
                if config.network_signature() != model.config.network_signature():
                    raise ValueError("config describes a different network than the model's "
                                     f"({config.network_signature()} vs {model.config.network_signature()})")
                check_built_components(model, config)  # PRSC / memory on for a model built without them
                model.session.apply_config(config)
            model.attach_tokenizer(tokenizer)
            if seed is not None:
                model.session.seed = int(seed)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or model.config
        self.sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty)

    @property
    def session(self):
        return self.model.session

    # --- generation ---------------------------------------------------------------------
    def generate(self, prompt: str, max_length: int = 100, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, chat: bool = False, stop_at_eos: bool = True,
                 halt_on_instability: bool | None = None) -> GenerationResult:
        """Continue ``prompt`` by up to ``max_length`` tokens.

        ``None`` sampling options use the engine's; ``top_k=0`` and ``top_p=1.0`` switch that
        filter off for this call. ``seed=None`` uses ``session.seed + session.generations`` (the
        generations so far: successive calls differ, in a new episode too; a restored session
        continues identically). ``chat=True`` wraps the prompt in the chat template.
        """
        s = self.sampling
        params = SamplingParams(s.temperature if temperature is None else temperature,
                                s.top_k if top_k is None else (top_k or None),  # 0: no top-k for this call
                                s.top_p if top_p is None else top_p,
                                s.repetition_penalty if repetition_penalty is None else repetition_penalty)
        tok = self.tokenizer
        ids = (tok.chat_prompt_ids(prompt) if chat else tok.encode(prompt)) or [tok.bos_id]
        return self.generate_ids(ids, max_length, params, seed, prompt=prompt, chat=chat, stop_at_eos=stop_at_eos,
                                 halt_on_instability=halt_on_instability)

    def generate_ids(self, ids: list[int], max_length: int, params: SamplingParams | None = None,
                     seed: int | None = None, *, prompt: str = "", chat: bool = False, stop_at_eos: bool = True,
                     halt_on_instability: bool | None = None) -> GenerationResult:
        stops = set()
        if stop_at_eos:
            stops.add(self.tokenizer.eos_id)
            if chat:
                stops.add(self.tokenizer.end_id)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        ids = list(ids) or [self.tokenizer.bos_id]
        with generation_lock(self.model):  # the run and its commit to the session, one at a time
            session = self.session  # the one in place once the lock is held (a load may replace it)
            seed = session.seed + session.generations if seed is None else seed
            active = {g.id: g for g in session.agency.active_goals()}
            trace = CognitiveDecoder(self.model, self.tokenizer).run(ids, max_length, params or self.sampling, seed,
                                                                     frozenset(stops), halt_on_instability)
            session.turn += 1
            session.generations += 1
            session.memory.tick()
            out_ids = [t for t in trace.tokens if not (t in stops)]
            # components switched off measured nothing this time: report that, not the session's
            # state from an earlier generation (the session keeps it)
            monitored, steered = session.config.stability.enabled, session.config.agency.enabled
            return GenerationResult(
                text=self.tokenizer.decode(out_ids),
                tokens_generated=len(trace.tokens),
                stability=session.stability.label if monitored else UNMONITORED,
                lyapunov=float(session.stability.lyapunov) if monitored else 0.0,
                entropy_trace=trace.entropy,
                lyapunov_trace=trace.lyapunov,
                temperature_trace=trace.temperature,
                coherence_trace=trace.coherence,
                goals_achieved=trace.goals_achieved,
                attention_summary=[f.to_dict() for f in session.agency.foci] if steered else [],
                warnings=trace.warnings,
                generation_time_ms=trace.elapsed_ms,
                prompt=prompt,
                token_ids=trace.tokens,
                stability_score=session.stability_score() if monitored else None,
                repetition_trace=trace.repetition,
                noise_steps=trace.noise_steps,
                halted=trace.halted,
                goal_progress={g.description: round(g.progress, 4) for g in active.values()},
            )

    def generate_with_goal(self, prompt: str, goal_description: str, max_length: int = 100,
                           goal_type: str = "informative", **kwargs: Any) -> GenerationResult:
        """Generate with a goal for this response; the goal is abandoned afterwards if not achieved."""
        goal = self.model.create_goal(goal_description, goal_type)
        try:
            return self.generate(prompt, max_length, **kwargs)
        finally:
            if goal.status == "active":
                goal.status = "abandoned"

    # --- interactive ----------------------------------------------------------------------
    def interactive_session(self, show_metrics: bool = True, *, input_stream: TextIO | None = None,
                            output_stream: TextIO | None = None, max_length: int = 128) -> None:
        """Chat on stdin/stdout (or the given streams). Commands: ``exit``, ``goal <description>``,
        ``status``, ``metrics``; anything else is a message."""
        run_interactive(self, show_metrics, input_stream or sys.stdin, output_stream or sys.stdout, max_length)


__all__ = ["ResoLLMInference", "GenerationResult"]
