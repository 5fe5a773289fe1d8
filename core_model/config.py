"""Configuration dataclasses (the names and fields of the seed document) and presets.

Every network component has a switch; ``vanilla=True`` turns every resonant part off, giving a
plain GPT of the same size (the baseline of every comparison). Invalid values raise
:class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import DEFAULT_VOCAB_SIZE

PHI = (1 + math.sqrt(5)) / 2


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


@dataclass
class AgencyConfig:
    """Goals and attention foci (inference-time)."""

    enabled: bool = True
    max_foci: int = 5
    max_goals: int = 10
    novelty_weight: float = 0.4
    relevance_weight: float = 0.4
    intensity_weight: float = 0.2
    goal_bias: float = 1.5  # logit bias towards goal tokens, scaled up when progress stalls
    achievement_threshold: float = 0.6
    update_every: int = 8  # decoding steps between goal-progress updates (they steer decoding)
    foci_every: int = 64  # decoding steps between attention-foci updates (and one at the end)

    def validate(self, prefix: str = "agency") -> None:
        _check(self.max_foci >= 1, f"{prefix}.max_foci", f"must be >= 1, got {self.max_foci}")
        _check(self.max_goals >= 1, f"{prefix}.max_goals", f"must be >= 1, got {self.max_goals}")
        for name in ("novelty_weight", "relevance_weight", "intensity_weight", "goal_bias"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        _check(0 < self.achievement_threshold <= 1, f"{prefix}.achievement_threshold", "must lie in (0, 1]")
        _check(self.update_every >= 1, f"{prefix}.update_every", "must be >= 1")
        _check(self.foci_every >= 1, f"{prefix}.foci_every", "must be >= 1")


@dataclass
class PRSCConfig:
    """Prime Resonance Semantic Coherence: concept bindings to prime phase states."""

    enabled: bool = True
    coherence_threshold: float = 0.7
    max_bindings: int = 1000

    def validate(self, prefix: str = "prsc") -> None:
        _check(0 <= self.coherence_threshold <= 1, f"{prefix}.coherence_threshold", "must lie in [0, 1]")
        _check(self.max_bindings >= 1, f"{prefix}.max_bindings", "must be >= 1")


@dataclass
class TemporalSMFConfig:
    """Temporal sedenion memory field: 16-D episodic memory with decay."""

    enabled: bool = True
    memory_decay_rate: float = 0.01
    max_moments: int = 1000
    episodic_tagging: bool = True
    conditioning_strength: float = 0.1

    def validate(self, prefix: str = "temporal_smf") -> None:
        _check(self.memory_decay_rate >= 0, f"{prefix}.memory_decay_rate", "must be >= 0")
        _check(self.max_moments >= 1, f"{prefix}.max_moments", "must be >= 1")
        _check(self.conditioning_strength >= 0, f"{prefix}.conditioning_strength", "must be >= 0")


@dataclass
class StabilityConfig:
    """Predictive stability: entropy, Lyapunov estimate, temperature control."""

    enabled: bool = True
    lyapunov_threshold: float = 0.1
    auto_temperature_adjust: bool = True
    predictive_horizon: int = 5
    min_temperature: float = 0.3
    max_temperature: float = 1.5
    window: int = 16
    halt_on_instability: bool = False
    min_tokens_before_halt: int = 16
    lyapunov: bool = True  # run a perturbed twin trajectory for the Lyapunov estimate
    lyapunov_every: int = 64  # a twin window starts every N steps (the first right after the prompt)
    lyapunov_window: int = 16  # tokens a twin window reads (one forward): its exponent is their slope
    perturbation: float = 1e-3  # relative size of the perturbation of a window's first input
    entropy_low: float = 0.15  # normalised entropy below which the temperature is raised
    entropy_high: float = 0.85  # ... above which it is lowered
    temperature_step: float = 0.1  # multiplicative step of the temperature controller

    def validate(self, prefix: str = "stability") -> None:
        _check(self.predictive_horizon >= 1, f"{prefix}.predictive_horizon", "must be >= 1")
        _check(0 < self.min_temperature <= self.max_temperature, f"{prefix}.min_temperature",
               f"must satisfy 0 < min_temperature <= max_temperature ({self.max_temperature})")
        _check(self.window >= 2, f"{prefix}.window", "must be >= 2")
        _check(self.min_tokens_before_halt >= 0, f"{prefix}.min_tokens_before_halt", "must be >= 0")
        _check(self.perturbation > 0, f"{prefix}.perturbation", "must be > 0")
        _check(self.lyapunov_every >= 1, f"{prefix}.lyapunov_every", "must be >= 1")
        _check(self.lyapunov_window >= 3, f"{prefix}.lyapunov_window", "must be >= 3 (a slope over positions 2 .. W)")
        _check(0 <= self.entropy_low < self.entropy_high <= 1, f"{prefix}.entropy_low",
               "must satisfy 0 <= entropy_low < entropy_high <= 1")
        _check(0 < self.temperature_step < 1, f"{prefix}.temperature_step", "must lie in (0, 1)")


@dataclass
class EntanglementConfig:
    """Multi-agent state sharing over the bus (off for single-agent use)."""

    enabled: bool = False
    node_id: str = "agent_0"
    coupling: float = 0.5
    share_phases: bool = True
    share_memory: bool = True
    memory_fold_weight: float = 0.1

    def validate(self, prefix: str = "entanglement") -> None:
        _check(bool(self.node_id), f"{prefix}.node_id", "must be a non-empty string")
        _check(self.coupling >= 0, f"{prefix}.coupling", f"must be >= 0, got {self.coupling}")
        _check(0 <= self.memory_fold_weight <= 1, f"{prefix}.memory_fold_weight", "must lie in [0, 1]")


@dataclass
class StochasticResonanceConfig:
    """Noise on weak FFN pre-activations when generation repeats itself (off by default)."""

    enabled: bool = False
    noise_amplitude: float = 0.1
    repetition_window: int = 32
    repetition_threshold: float = 0.3
    weak_fraction: float = 0.5  # |pre-activation| below this many std counts as weak
    in_training: bool = False

    def validate(self, prefix: str = "stochastic_resonance") -> None:
        _check(self.noise_amplitude >= 0, f"{prefix}.noise_amplitude", "must be >= 0")
        _check(self.repetition_window >= 4, f"{prefix}.repetition_window", "must be >= 4")
        _check(0 <= self.repetition_threshold <= 1, f"{prefix}.repetition_threshold", "must lie in [0, 1]")
        _check(self.weak_fraction > 0, f"{prefix}.weak_fraction", "must be > 0")


_SUBCONFIGS: dict[str, type] = {
    "agency": AgencyConfig,
    "prsc": PRSCConfig,
    "temporal_smf": TemporalSMFConfig,
    "stability": StabilityConfig,
    "entanglement": EntanglementConfig,
    "stochastic_resonance": StochasticResonanceConfig,
}


@dataclass
class ResoLLMConfig:
    """The whole model: network shape, resonant components and inference-time features.

    ``vocab_size`` defaults to the default tokenizer's; set it from the tokenizer you use
    (``config.vocab_size = tokenizer.vocab_size``) — checkpoints refuse a mismatch.
    """

    vocab_size: int = DEFAULT_VOCAB_SIZE
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 512
    ffn_mult: int = 4
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    rope: bool = True
    rope_base: float = 10000.0

    # Resonant network components (each switchable; ``vanilla`` turns all off)
    vanilla: bool = False
    prime_embedding: bool = True  # blend of semantic and phase embedding
    kuramoto: bool = True  # causal Kuramoto phase dynamics block to block
    resonant_attention: bool = True  # lambda_h * R_ij inside SDPA
    coherence_gating: bool = True  # per-token gate on each block's update
    num_phases: int = 8  # F oscillators per token
    kuramoto_dt: float = 0.5
    kuramoto_coupling_init: float = 1.0
    resonance_lambda0: float = 1.0
    gate_threshold: float = 1 / PHI

    agency: AgencyConfig = field(default_factory=AgencyConfig)
    prsc: PRSCConfig = field(default_factory=PRSCConfig)
    temporal_smf: TemporalSMFConfig = field(default_factory=TemporalSMFConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    entanglement: EntanglementConfig = field(default_factory=EntanglementConfig)
    stochastic_resonance: StochasticResonanceConfig = field(default_factory=StochasticResonanceConfig)

    def __post_init__(self) -> None:
        for name, cls in _SUBCONFIGS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, name))
        self.validate()

    # --- derived switches -------------------------------------------------------------
    @property
    def use_prime_embedding(self) -> bool:
        return self.prime_embedding and not self.vanilla

    @property
    def use_kuramoto(self) -> bool:
        return self.kuramoto and not self.vanilla

    @property
    def use_resonant_attention(self) -> bool:
        return self.resonant_attention and not self.vanilla

    @property
    def use_coherence_gating(self) -> bool:
        return self.coherence_gating and not self.vanilla

    @property
    def uses_phases(self) -> bool:
        """Whether the network carries token phases at all."""
        return self.use_prime_embedding or self.use_kuramoto or self.use_resonant_attention or self.use_coherence_gating

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def phase_dims_per_head(self) -> int:
        """Head dims given to ``[cos, sin]`` phase features (0 when resonant attention is off)."""
        return 2 * self.num_phases if self.use_resonant_attention else 0

    def validate(self) -> None:
        _check(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        _check(self.dim >= 8, "dim", f"must be >= 8, got {self.dim}")
        _check(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        _check(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        _check(self.dim % self.num_heads == 0, "num_heads", f"must divide dim ({self.dim}), got {self.num_heads}")
        _check(self.max_seq_len >= 1, "max_seq_len", f"must be >= 1, got {self.max_seq_len}")
        _check(self.ffn_mult >= 1, "ffn_mult", "must be >= 1")
        _check(0 <= self.dropout < 1, "dropout", f"must lie in [0, 1), got {self.dropout}")
        _check(self.num_phases >= 1, "num_phases", f"must be >= 1, got {self.num_phases}")
        _check(self.kuramoto_dt > 0, "kuramoto_dt", "must be > 0")
        _check(0 < self.gate_threshold < 1, "gate_threshold", "must lie in (0, 1)")
        if self.use_resonant_attention:
            semantic = self.head_dim - 2 * self.num_phases
            _check(semantic >= 2 and semantic % 2 == 0, "num_phases",
                   f"2*num_phases ({2 * self.num_phases}) must leave an even semantic part of at least 2 "
                   f"dims in each head of {self.head_dim} dims")
        elif self.rope:
            _check(self.head_dim % 2 == 0, "num_heads", f"RoPE needs an even head width, got dim/num_heads = "
                   f"{self.dim}/{self.num_heads} = {self.head_dim}")
        for name in _SUBCONFIGS:
            getattr(self, name).validate(name)

    # --- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResoLLMConfig":
        return _from_dict(cls, data, "config")

    def replace(self, **changes: Any) -> "ResoLLMConfig":
        return dataclasses.replace(self, **changes)

    def network_signature(self) -> dict[str, Any]:
        """The fields that determine parameter shapes (what a checkpoint must match)."""
        keys = ("vocab_size", "dim", "num_layers", "num_heads", "ffn_mult", "bias", "tie_embeddings",
                "num_phases")
        sig = {k: getattr(self, k) for k in keys}
        sig.update(prime_embedding=self.use_prime_embedding, kuramoto=self.use_kuramoto,
                   resonant_attention=self.use_resonant_attention, coherence_gating=self.use_coherence_gating)
        return sig


def _check_type(value: Any, spec: dataclasses.Field, name: str) -> None:
    """Values read from files must have the type of the field's default (ints may stand for floats)."""
    default = spec.default
    if default is dataclasses.MISSING:
        return
    expected = type(default)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{name}: expected {expected.__name__}, got {type(value).__name__} ({value!r})")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}: unknown field(s) {unknown}")
    kwargs = {}
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in _SUBCONFIGS and cls is ResoLLMConfig:
            value = _from_dict(_SUBCONFIGS[key], value, f"{prefix}.{key}")
        else:
            _check_type(value, defaults[key], f"{prefix}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc


def small_config(**overrides: Any) -> ResoLLMConfig:
    """4 layers x 256 dims, 4 heads: development and tests."""
    return ResoLLMConfig(dim=256, num_layers=4, num_heads=4, num_phases=8, **overrides)


def medium_config(**overrides: Any) -> ResoLLMConfig:
    """8 layers x 512 dims, 8 heads."""
    return ResoLLMConfig(dim=512, num_layers=8, num_heads=8, num_phases=8, max_seq_len=1024, **overrides)


def large_config(**overrides: Any) -> ResoLLMConfig:
    """24 layers x 1024 dims, 16 heads."""
    return ResoLLMConfig(dim=1024, num_layers=24, num_heads=16, num_phases=16, max_seq_len=2048, **overrides)


def multi_agent_config(node_id: str, **overrides: Any) -> ResoLLMConfig:
    """The small preset with entanglement on for agent ``node_id``."""
    ent = EntanglementConfig(enabled=True, node_id=node_id)
    return small_config(entanglement=ent, **overrides)


PRESETS = {"small": small_config, "medium": medium_config, "large": large_config}
