"""Edges of inference-time cognition found in review: a restored session keeps the engine's
settings, a temperature asked for with auto-adjust off is used as is, components switched off
report nothing stale, a failed chat response leaves the session as it was, goal words in any
script, and module modes restored one by one."""

from __future__ import annotations

import dataclasses
import io
import unicodedata

import pytest
from typer.testing import CliRunner

from core_model.cognition.agency import content_words, word_coverage
from core_model.config import ResoLLMConfig
from core_model.generation import eval_mode
from core_model.inference import ResoLLMInference
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread, tiny  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOK = create_default_tokenizer()


def switched(config: ResoLLMConfig, **components: bool) -> ResoLLMConfig:
    """``config`` with the named components (stability, agency, ...) switched on or off."""
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), enabled=on)
                                          for name, on in components.items()})


def test_a_restored_session_keeps_the_engines_settings():
    model = tiny()
    ResoLLMInference(model, TOK, switched(model.config, agency=False, stochastic_resonance=True), seed=1)
    state = model.cognition_state()
    model.load_cognition_state(state)
    assert not model.session.config.agency.enabled and model.session.config.stochastic_resonance.enabled
    model.reset_cognition()
    assert not model.session.config.agency.enabled


def test_with_auto_adjust_off_the_requested_temperature_is_used_as_is():
    model = tiny()
    cfg = model.config
    stability = dataclasses.replace(cfg.stability, auto_temperature_adjust=False)
    engine = ResoLLMInference(model, TOK, dataclasses.replace(cfg, stability=stability), seed=1)
    for t in (stability.min_temperature / 2, stability.max_temperature * 1.5):
        r = engine.generate("Hello there", max_length=6, temperature=t)
        assert r.temperature_trace == [t] * r.tokens_generated
    auto = ResoLLMInference(model, TOK, cfg, seed=1)  # with it on, the first step is clipped to the bounds
    r = auto.generate("Hello there", max_length=3, temperature=cfg.stability.max_temperature * 1.5)
    assert r.temperature_trace[0] == cfg.stability.max_temperature


def test_with_auto_adjust_off_the_suggested_temperature_is_the_requested_one():
    model = tiny()
    cfg = model.config
    off = dataclasses.replace(cfg, stability=dataclasses.replace(cfg.stability, auto_temperature_adjust=False))
    ResoLLMInference(model, TOK, off, seed=1).generate("Hello there", max_length=12, temperature=1.0)
    for t in (0.1, 0.7, 2.0):
        assert model.get_suggested_temperature(t) == t
    model.session.apply_config(cfg)  # auto-adjust on, the same measurements: clipped to the bounds
    assert model.get_suggested_temperature(2.0) == cfg.stability.max_temperature


def test_components_switched_off_report_nothing_from_an_earlier_generation():
    model = tiny()
    engine = ResoLLMInference(model, TOK, seed=1)
    first = engine.generate("iiii iiii iiii", max_length=40, temperature=0.0)
    assert first.stability != "unmonitored" and first.attention_summary
    model.session.apply_config(switched(model.config, stability=False, agency=False))
    second = engine.generate("A completely different prompt", max_length=5)
    assert second.stability == "unmonitored" and second.lyapunov == 0.0 and second.stability_score is None
    assert "score=n/a" in second.metrics_line()
    assert second.attention_summary == [] and second.lyapunov_trace == []
    assert model.session.stability.label == first.stability  # the session keeps what was measured


@pytest.mark.parametrize("error", [RuntimeError, IndexError])
def test_a_failed_chat_response_leaves_the_session_as_it_was(error):
    model = tiny()
    engine = ResoLLMInference(model, TOK, seed=1)
    engine.generate("warm up", max_length=3)
    before = model.cognition_state()

    def fail(*args, **kwargs):
        raise error("the model broke")

    engine.generate_ids = fail
    out = io.StringIO()
    lines = io.StringIO("goal talk about cats\nhello\n")
    if error is RuntimeError:  # a failed response: reported, the loop carries on
        engine.interactive_session(False, input_stream=lines, output_stream=out, max_length=5)
        assert "the goals set for it wait for the next response" in out.getvalue()
    else:  # anything else is raised, after the same rollback
        with pytest.raises(IndexError):
            engine.interactive_session(False, input_stream=lines, output_stream=out, max_length=5)
    after = model.cognition_state()
    assert after["history"] == before["history"] and after["memory"] == before["memory"]
    assert [g["status"] for g in after["agency"]["goals"]] == ["abandoned"]  # the session ended first


def test_goal_words_in_any_script():
    assert content_words("Explique la décision naïve über Größe café") == [
        "explique", "décision", "naïve", "über", "größe", "café"]
    assert content_words("हिन्दी भाषा में समझाइए") == ["हिन्दी", "भाषा", "समझाइए"]  # vowel signs are marks
    assert content_words("日本語について話す") == ["日本語について話す"]  # no spaces: one word
    decomposed = unicodedata.normalize("NFD", "la décision")  # e + a combining acute accent
    assert word_coverage(["cision"], "la décision") == word_coverage(["cision"], decomposed) == 0.0
    assert word_coverage(["décision"], decomposed) == 1.0
    assert word_coverage(["café", "größe"], "Un café? Die Größe!") == 1.0


def test_generating_restores_each_modules_mode():
    model = tiny().train()
    model.blocks[0].eval()  # a frozen block in a model being trained
    modes = {name: m.training for name, m in model.named_modules()}
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == modes
    ResoLLMInference(model, TOK, seed=1).generate("hi", max_length=2)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_reso_chat_refuses_top_p_zero_with_a_usage_error(tmp_path):
    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["chat", "--preset", "small", "--top-p", "0"], input="exit\n")
    assert result.exit_code == 2 and "top-p" in result.output.lower()
    assert not isinstance(result.exception, ValueError)


def test_a_goal_vector_of_the_wrong_size_is_refused_on_restore():
    model = tiny()
    ResoLLMInference(model, TOK, seed=1)
    model.create_goal("explain mathematics")
    model.create_goal("and logic too")
    state = model.cognition_state()
    state["agency"]["goals"][1]["vector"] = state["agency"]["goals"][1]["vector"][:-1]
    from core_model.cognition import SessionStateError

    with pytest.raises(SessionStateError, match="and logic too"):
        model.load_cognition_state(state)
    state = model.cognition_state()
    model.update_memory("a moment", importance=1.0)
    state = model.cognition_state()
    state["memory"]["moments"][0]["state"] = [0.0] * 15
    with pytest.raises(SessionStateError, match="16 components, got 15"):
        model.load_cognition_state(state)



def test_to_json_is_standard_json_when_entropy_is_not_finite():
    import json
    import math

    from core_model.inference import GenerationResult

    r = GenerationResult(text="x", tokens_generated=2, stability="divergent", lyapunov=math.inf,
                         entropy_trace=[1.0, math.nan], lyapunov_trace=[0.0, -math.inf], temperature_trace=[0.8, 0.8],
                         coherence_trace=[], goals_achieved=[], attention_summary=[{"intensity": math.nan}],
                         warnings=[], generation_time_ms=1.0)

    def no_constants(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    d = json.loads(r.to_json(), parse_constant=no_constants)
    assert d["entropy_trace"] == [1.0, None] and d["lyapunov"] is None
    assert d["lyapunov_trace"] == [0.0, None] and d["attention_summary"] == [{"intensity": None}]
    assert math.isnan(r.to_dict()["entropy_trace"][1])  # to_dict keeps the values
