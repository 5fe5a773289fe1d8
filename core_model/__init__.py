"""Reso-LLM v2: the resonant network, tokenizer, generation and training loop (pure torch)."""

from .config import (
    AgencyConfig,
    ConfigError,
    EntanglementConfig,
    PRSCConfig,
    ResoLLMConfig,
    StabilityConfig,
    StochasticResonanceConfig,
    TemporalSMFConfig,
    large_config,
    medium_config,
    multi_agent_config,
    small_config,
)
from .model import ModelOutput, ResoLLMModel
from .tokenizer import ResoTokenizer, create_default_tokenizer, train_bpe_tokenizer

__all__ = [
    "AgencyConfig", "ConfigError", "EntanglementConfig", "PRSCConfig", "ResoLLMConfig", "StabilityConfig",
    "StochasticResonanceConfig", "TemporalSMFConfig", "large_config", "medium_config", "multi_agent_config",
    "small_config", "ModelOutput", "ResoLLMModel", "ResoTokenizer", "create_default_tokenizer",
    "train_bpe_tokenizer",
]
