"""ResoLLMInference / GenerationResult: every field real, JSON-ready; cognition off = plain decoding."""

from __future__ import annotations

import json
import math

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


def test_the_prompt_keeps_half_the_window_and_max_length_is_capped_with_a_warning():
    tok = create_default_tokenizer()
    engine = ResoLLMInference(tiny(), tok, temperature=0.8)  # max_seq_len 256
    r = engine.generate("word " * 20, max_length=300, seed=0, stop_at_eos=False)  # more than the window
    prompt = len(tok.encode("word " * 20))
    assert prompt < 128 and r.tokens_generated == 256 - prompt  # the whole prompt stayed
    assert any("at most" in w and "new tokens fit" in w for w in r.warnings)
    assert not any("truncated" in w for w in r.warnings)
    r = engine.generate("word " * 60, max_length=300, seed=0, stop_at_eos=False)  # 300 bytes, 256 fit
    assert any("truncated to its last 128 tokens" in w for w in r.warnings) and r.tokens_generated == 128
    with pytest.raises(ValueError, match="max_length"):
        engine.generate_ids([1, 2, 3], 0)
    assert engine.generate_ids([], 3, seed=0).tokens_generated == 3  # an empty prompt starts from bos


def test_the_entropy_is_that_of_the_filtered_distribution():
    """With top_k=1 the sampled distribution is a point mass: entropy 0, and the controller, which
    reads it, does not cool the temperature as it would for the raw logits' high entropy."""
    tok = create_default_tokenizer()
    r = ResoLLMInference(tiny(), tok, temperature=0.8, top_k=1).generate("Hello", max_length=12, seed=0,
                                                                        stop_at_eos=False)
    assert r.entropy_trace == [0.0] * 12
    assert r.temperature_trace[-1] > 0.8  # a collapsed entropy heats (the raw logits' would cool)
    wide = ResoLLMInference(tiny(), tok, temperature=0.8, top_k=50).generate("Hello", max_length=12, seed=0,
                                                                            stop_at_eos=False)
    assert all(0 < h <= math.log(50) + 1e-9 for h in wide.entropy_trace)


def test_a_failed_generation_leaves_the_session_as_it_was(monkeypatch):
    from core_model.cognition import decoding

    tok = create_default_tokenizer()
    model = tiny()
    engine = ResoLLMInference(model, tok, temperature=0.8)
    model.create_goal("describe the gardens and their rivers")
    engine.generate("Tell me", max_length=20, seed=0, stop_at_eos=False)
    before = json.dumps(model.cognition_state(), sort_keys=True)
    calls = {"n": 0}
    real = decoding.CognitiveDecoder._update_goals

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:  # after a goal update and a few steps of the repetition window
            raise RuntimeError("boom")
        return real(self, *args)

    monkeypatch.setattr(decoding.CognitiveDecoder, "_update_goals", failing)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate("Go on", max_length=40, seed=5, stop_at_eos=False)
    assert json.dumps(model.cognition_state(), sort_keys=True) == before
    monkeypatch.setattr(decoding.CognitiveDecoder, "_update_goals", real)
    retry = engine.generate("Go on", max_length=40, seed=5, stop_at_eos=False)
    clean = tiny()
    clean.load_cognition_state(json.loads(before))
    assert ResoLLMInference(clean, tok, temperature=0.8).generate(
        "Go on", max_length=40, seed=5, stop_at_eos=False).token_ids == retry.token_ids


def test_generations_on_one_model_from_two_threads_take_turns():
    import threading

    tok = create_default_tokenizer()
    results = {}

    def alone(i: int):
        model = tiny()
        return ResoLLMInference(model, tok, temperature=0.8).generate(f"prompt {i}", max_length=30, seed=i,
                                                                      stop_at_eos=False)

    expected = {i: alone(i) for i in range(2)}
    model = tiny()
    engine = ResoLLMInference(model, tok, temperature=0.8)

    def run(i: int):
        results[i] = engine.generate(f"prompt {i}", max_length=30, seed=i, stop_at_eos=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(2):  # the same tokens and foci as alone (the foci read the shared attention probe)
        assert results[i].token_ids == expected[i].token_ids
        assert [f["intensity"] for f in results[i].attention_summary] == \
            [f["intensity"] for f in expected[i].attention_summary]
    assert model.session.turn == 2


def test_cognition_calls_from_another_thread_wait_for_a_generation(monkeypatch):
    """recall_memory / encode_text from another thread while a greedy generation has its
    stochastic-resonance noise on: the generation's tokens are those of a run alone (its noise and
    noise generator stay its own), the encodings those taken with no generation running, and the
    calls that change the session wait until the generation has ended."""
    import threading

    import numpy as np

    from core_model.cognition import decoding
    from core_model.cognition.api import encode_text

    tok = create_default_tokenizer()
    sr = StochasticResonanceConfig(enabled=True, noise_amplitude=2.0, repetition_threshold=0.0)
    model = tiny(stochastic_resonance=sr)
    engine = ResoLLMInference(model, tok, temperature=0.0, seed=3)
    model.update_memory("The train leaves.", 1.0)
    state = model.cognition_state()
    clean = encode_text(model, "hello world")
    alone = engine.generate("ab ab ab ab", max_length=60)
    assert alone.noise_steps > 10
    model.load_cognition_state(state)

    stop, encodings, waiting, finished = threading.Event(), [], [], []

    def other() -> None:
        while not stop.is_set():
            model.recall_memory("train")
            encodings.append(encode_text(model, "hello world"))

    changes = [model.reset_cognition, lambda: model.load_cognition_state(state),
               lambda: model.create_goal("describe the trains")]
    real_update = decoding.StochasticResonance.update

    def update(self, repetition: float) -> bool:
        on = real_update(self, repetition)
        if on and not waiting:  # the noise is on in the FFNs now: the other threads start
            waiting.append(threading.Thread(target=other))
            waiting.extend(threading.Thread(target=change) for change in changes)
            for t in waiting:
                t.start()
            for t in waiting:
                t.join(0.3)  # before the fix they ran (and finished) here
            finished.extend(t for t in waiting if not t.is_alive())
        return on

    monkeypatch.setattr(decoding.StochasticResonance, "update", update)
    try:
        during = engine.generate("ab ab ab ab", max_length=60)
    finally:
        stop.set()
        for t in waiting:
            t.join(60)
    assert waiting and during.token_ids == alone.token_ids and during.noise_steps == alone.noise_steps
    assert encodings and all(np.allclose(e, clean, rtol=0, atol=1e-6) for e in encodings)
    assert not finished  # the calls that change the session ran after the generation


@pytest.mark.parametrize("component, module", [("prsc", "concept_proj"), ("temporal_smf", "memory_proj")])
def test_an_engine_config_cannot_switch_on_a_component_the_model_was_built_without(component, module):
    """The model has no projection for it, so it could not use the component: refused up front,
    naming it (the model's own settings and a config that keeps it off are accepted)."""
    import dataclasses

    from core_model.cognition import CognitionError
    from core_model.config import ConfigError

    tok = create_default_tokenizer()
    off = {"prsc": PRSCConfig(enabled=False), "temporal_smf": TemporalSMFConfig(enabled=False)}[component]
    model = tiny(**{component: off})
    on = model.config.replace(**{component: dataclasses.replace(off, enabled=True)})
    with pytest.raises(ConfigError, match=rf"^{component}\.enabled: the model was built without .*no {module}"):
        ResoLLMInference(model, tok, on)
    assert model.session.config is model.config  # nothing applied
    ResoLLMInference(model, tok, model.config.replace(stability=StabilityConfig(lyapunov=False)))
    model.session.apply_config(on)  # set on the session directly: using it says why it cannot work
    with pytest.raises(CognitionError, match=f"the model was built without .*no {module}"):
        model.bind_concept("logic") if component == "prsc" else model.update_memory("hello")
