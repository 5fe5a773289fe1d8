"""ResoLLMInference / GenerationResult: every field real, JSON-ready; cognition off = plain decoding."""

from __future__ import annotations

import json

import pytest
import torch

from core_model.config import (
    AgencyConfig, PRSCConfig, ResoLLMConfig, StabilityConfig, StochasticResonanceConfig, TemporalSMFConfig,
)
from core_model.inference import GenerationResult, ResoLLMInference
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread, tiny  # noqa: F401  (fixture)

SEED_FIELDS = ("text", "tokens_generated", "stability", "lyapunov", "entropy_trace", "lyapunov_trace",
               "temperature_trace", "coherence_trace", "goals_achieved", "attention_summary", "warnings",
               "generation_time_ms")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def all_off() -> dict:
    return dict(agency=AgencyConfig(enabled=False), prsc=PRSCConfig(enabled=False),
                temporal_smf=TemporalSMFConfig(enabled=False), stability=StabilityConfig(enabled=False),
                stochastic_resonance=StochasticResonanceConfig(enabled=False))


def test_result_has_every_seed_field_filled_and_serialises():
    tok = create_default_tokenizer()
    model = tiny()
    r = ResoLLMInference(model, tok, model.config).generate("Hello", max_length=25, seed=0, stop_at_eos=False)
    assert isinstance(r, GenerationResult)
    for name in SEED_FIELDS:
        assert hasattr(r, name)
    n = r.tokens_generated
    assert n == 25 == len(r.token_ids)
    for trace in (r.entropy_trace, r.lyapunov_trace, r.temperature_trace, r.coherence_trace, r.repetition_trace):
        assert len(trace) == n
    assert all(0 <= c <= 1 for c in r.coherence_trace)  # Kuramoto order parameter
    assert r.stability in ("stable", "periodic", "chaotic", "divergent")
    assert r.generation_time_ms > 0 and r.text == tok.decode(r.token_ids)
    assert r.attention_summary and {"type", "target", "intensity", "novelty", "relevance", "duration"} <= set(
        r.attention_summary[0])
    d = json.loads(json.dumps(r.to_dict()))
    assert d["tokens_generated"] == 25 and d["entropy_trace"] == r.entropy_trace
    assert r.metrics_line().startswith("[stability=")


def test_with_all_cognition_off_the_engine_decodes_like_plain_generate():
    tok = create_default_tokenizer()
    model = tiny(**all_off())
    ids = tok.encode("Once upon a time")
    plain = model.generate([ids], max_new_tokens=30, temperature=0.8, top_k=40, seed=5)[0]
    r = ResoLLMInference(model, tok, temperature=0.8, top_k=40).generate("Once upon a time", max_length=30, seed=5,
                                                                         stop_at_eos=False)
    assert r.token_ids == plain
    assert r.lyapunov_trace == [] and r.attention_summary == [] and set(r.temperature_trace) == {0.8}


def test_the_twin_does_not_change_the_main_trajectory():
    tok = create_default_tokenizer()
    cfg = all_off()
    cfg["stability"] = StabilityConfig(enabled=True, lyapunov=True, auto_temperature_adjust=False, lyapunov_every=2)
    model = tiny(**cfg)
    ids = tok.encode("Once upon a time")
    plain = model.generate([ids], max_new_tokens=30, temperature=0.0, seed=0)[0]
    r = ResoLLMInference(model, tok, temperature=0.0).generate("Once upon a time", max_length=30, seed=0,
                                                               stop_at_eos=False)
    assert r.token_ids == plain and len(set(r.lyapunov_trace)) > 3


def test_chat_stops_at_end_of_turn_and_errors():
    tok = create_default_tokenizer()
    model = tiny()
    engine = ResoLLMInference(model, tok)
    with pytest.raises(ValueError, match="max_length"):
        engine.generate("x", max_length=0)
    with pytest.raises(ValueError, match="different network"):
        ResoLLMInference(model, tok, ResoLLMConfig(dim=128, num_layers=2, num_heads=4, num_phases=4))
    long = engine.generate("word " * 300, max_length=10, seed=0)  # longer than max_seq_len
    assert long.tokens_generated <= 10 and any("truncated" in w for w in long.warnings)
    # the chat template's end token stops a chat turn: bias the model towards it to see it happen
    with torch.no_grad():
        h = model(torch.tensor([tok.encode(tok.chat_prompt("hi"))])).hidden[0].mean(0)
        model.head.weight[tok.end_id] = 3 * h / h.norm()
    r = engine.generate("hi", max_length=50, seed=0, chat=True)
    assert r.tokens_generated < 50 and r.token_ids[-1] in (tok.end_id, tok.eos_id)


def test_a_call_can_switch_off_the_engines_filters():
    tok = create_default_tokenizer()
    model = tiny(**all_off())
    greedy_like = ResoLLMInference(model, tok, temperature=1.0, top_k=1, top_p=0.5)
    free = ResoLLMInference(model, tok, temperature=1.0)
    a = greedy_like.generate("Hello", max_length=20, seed=3, stop_at_eos=False, top_k=0, top_p=1.0)
    b = free.generate("Hello", max_length=20, seed=3, stop_at_eos=False)
    c = greedy_like.generate("Hello", max_length=20, seed=3, stop_at_eos=False)
    assert a.token_ids == b.token_ids  # both filters off for that one call
    assert c.token_ids != b.token_ids and greedy_like.sampling.top_k == 1  # the engine's settings stay
