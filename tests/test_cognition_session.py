"""Session state: lives outside the nn.Module, resets, round-trips through msgpack/JSON and then
continues exactly as the original session does."""

from __future__ import annotations

import json

import msgpack
import pytest
import torch

from core_model.cognition import CognitionError, CognitiveSession, SessionStateError
from core_model.config import PRSCConfig, ResoLLMConfig, StochasticResonanceConfig, TemporalSMFConfig
from core_model.inference import ResoLLMInference
from core_model.model import ResoLLMModel
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**kw) -> ResoLLMConfig:
    return ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256, **kw)


def busy_model(tok) -> tuple[ResoLLMModel, ResoLLMInference]:
    torch.manual_seed(0)
    model = ResoLLMModel(config()).eval()
    engine = ResoLLMInference(model, tok, temperature=0.9, seed=11)
    model.bind_concept("mathematics", token_ids=tok.encode("math"))
    model.bind_concept("logic")
    model.update_memory("The train leaves from platform nine.", importance=2.0)
    model.update_memory("Math is fun.", importance=0.5)
    model.create_goal("explain mathematics and logic clearly")
    engine.generate("Tell me about math", max_length=20)
    return model, engine


def test_state_is_not_in_the_module():
    tok = create_default_tokenizer()
    model, _ = busy_model(tok)
    names = set(model.state_dict())
    assert not any("session" in n for n in names)
    assert isinstance(model.session, CognitiveSession)
    assert "_cognitive_session" not in dict(model.named_modules())


def test_round_trip_gives_identical_continuations():
    tok = create_default_tokenizer()
    model, engine = busy_model(tok)
    state = model.session.to_dict()
    wire = msgpack.unpackb(msgpack.packb(state), strict_map_key=False)
    assert wire == state and json.loads(json.dumps(state)) == state  # plain types only

    clone = ResoLLMModel(config()).eval()
    clone.load_state_dict(model.state_dict())
    clone.load_cognition_state(wire)
    clone_engine = ResoLLMInference(clone, tok, temperature=0.9)
    assert clone.session.to_dict() == state

    a = engine.generate("And then?", max_length=30)  # seed = session seed + generations, restored too
    b = clone_engine.generate("And then?", max_length=30)
    assert a.token_ids == b.token_ids and a.entropy_trace == b.entropy_trace
    assert a.lyapunov_trace == b.lyapunov_trace and a.attention_summary == b.attention_summary
    assert model.session.to_dict() == clone.session.to_dict()


def test_reset_and_mismatch():
    tok = create_default_tokenizer()
    model, engine = busy_model(tok)
    state = model.session.to_dict()
    model.reset_cognition()
    s = model.session
    assert (len(s.concepts), len(s.memory), s.agency.goals, s.turn, s.generations, s.step) == (0, 0, [], 0, 0, 0)
    other = ResoLLMConfig(dim=128, num_layers=2, num_heads=4, num_phases=4)
    with pytest.raises(SessionStateError, match="model"):
        CognitiveSession.from_dict(state, other)
    with pytest.raises(SessionStateError):
        CognitiveSession.from_dict({"format": 1, "model": state["model"], "seed": 0}, model.config)
    with pytest.raises(SessionStateError):
        CognitiveSession.from_dict({"format": 99}, model.config)


def test_an_engine_with_new_settings_applies_them_to_the_state():
    tok = create_default_tokenizer()
    model, _ = busy_model(tok)
    assert len(model.session.memory) >= 2
    recent = list(model.session.repetition.tokens)[-8:]
    cfg = config(temporal_smf=TemporalSMFConfig(max_moments=1, memory_decay_rate=0.5),
                 stochastic_resonance=StochasticResonanceConfig(repetition_window=8),
                 prsc=PRSCConfig(max_bindings=2))
    ResoLLMInference(model, tok, cfg)
    s = model.session
    assert s.config is cfg and len(s.memory) == 1  # pruned to the new capacity, the strongest kept
    assert s.memory.moments[0].text == "The train leaves from platform nine."
    assert s.memory.decay_rate == 0.5 and s.repetition.window == 8 and list(s.repetition.tokens) == recent
    assert s.concepts.max_bindings == 2


def test_a_restored_session_is_checked_like_new_bindings():
    tok = create_default_tokenizer()
    model, _ = busy_model(tok)
    state = model.session.to_dict()
    bad = json.loads(json.dumps(state))
    bad["concepts"]["bindings"][0]["token_ids"] = [10**6]
    with pytest.raises(SessionStateError, match="token ids"):
        CognitiveSession.from_dict(bad, model.config)
    with pytest.raises(SessionStateError, match="max_bindings"):
        CognitiveSession.from_dict(state, config(prsc=PRSCConfig(max_bindings=1)))


def test_new_settings_that_the_state_breaks_are_refused():
    tok = create_default_tokenizer()
    model, _ = busy_model(tok)  # two concepts bound
    with pytest.raises(CognitionError, match="max_bindings"):
        ResoLLMInference(model, tok, config(prsc=PRSCConfig(max_bindings=1)))
    assert model.session.config is model.config and len(model.session.concepts) == 2  # unchanged


def test_the_reference_hidden_state_survives_a_reset_and_follows_the_weights():
    """The calibration text's mean hidden state (which centres every text encoding) is computed
    once per weight version and tokenizer: a reset keeps it, any parameter changing in place,
    not only the head, recomputes it, and so does another tokenizer."""
    from core_model.cognition.api import reference_hidden

    tok = create_default_tokenizer()
    torch.manual_seed(0)
    model = ResoLLMModel(config()).eval()
    ResoLLMInference(model, tok)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    first = reference_hidden(model)
    assert len(forwards) == 1
    model.reset_cognition()
    assert reference_hidden(model) is first and len(forwards) == 1
    with torch.no_grad():
        model.blocks[0].ffn.fc.weight.mul_(1.5)  # a weight far from the head
    moved = reference_hidden(model)
    assert len(forwards) == 2 and not (moved == first).all()
    model.attach_tokenizer(create_default_tokenizer())
    again = reference_hidden(model)
    assert len(forwards) == 3 and (again == moved).all()


def test_a_new_episode_does_not_repeat_the_seeds_of_the_last():
    """Default seeds are ``session.seed + generations so far``: in the first episode the turn
    (as before), after ``new_episode`` still counting on; a dict saved before the counter
    existed continues from its turn."""
    tok = create_default_tokenizer()

    def run(explicit: bool) -> tuple[list[list[int]], ResoLLMModel]:
        torch.manual_seed(0)
        model = ResoLLMModel(config()).eval()
        engine = ResoLLMInference(model, tok, temperature=1.0, seed=7)
        out = []
        for i, episode in enumerate((0, 0, 1, 1)):
            if episode > model.session.episode:
                model.session.new_episode()
            out.append(engine.generate("Hello", max_length=15, seed=7 + i if explicit else None).token_ids)
        return out, model

    default, model = run(False)
    explicit, _ = run(True)
    assert default == explicit and default[2] != default[0]
    state = model.cognition_state()
    assert (state["episode"], state["turn"], state["generations"]) == (1, 2, 4)
    del state["generations"]
    assert CognitiveSession.from_dict(state, model.config).generations == 2


@pytest.mark.parametrize("breakage", [
    lambda d: d.pop("seed"),
    lambda d: d.update(seed="seven"),
    lambda d: d["agency"].update(held_since=[]),
    lambda d: d["agency"].update(foci=[["token", "x"]]),
])
def test_a_malformed_session_dict_raises_session_state_error(breakage):
    tok = create_default_tokenizer()
    model, _ = busy_model(tok)
    state = json.loads(json.dumps(model.cognition_state()))
    breakage(state)
    with pytest.raises(SessionStateError, match="malformed session dict"):
        CognitiveSession.from_dict(state, model.config)
