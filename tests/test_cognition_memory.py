"""Temporal sedenion memory: recall among distractors, decay with the clock, importance, pruning,
episode/turn tags, and the consolidated state conditioning the network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core_model.cognition import CognitionError, TemporalSedenionMemory
from core_model.config import TemporalSMFConfig
from core_model.inference import ResoLLMInference
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread, tiny  # noqa: F401  (fixture)

FACTS = ["The capital of France is Paris.", "Bananas are rich in potassium.", "The meeting is on Tuesday at noon.",
         "Quantum computers use qubits.", "My favourite colour is green.", "The train leaves from platform nine.",
         "Octopuses have three hearts.", "Water boils at one hundred degrees."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_recall_finds_the_stored_text_among_distractors():
    model = tiny()
    for f in FACTS:
        model.update_memory(f)
    hits = sum(model.recall_memory(f[: int(0.6 * len(f))], k=1)[0].text == f for f in FACTS)
    assert hits >= 7, f"only {hits}/8 facts recalled from a 60% prefix"
    top = model.recall_memory("Quantum computers use", k=3)
    assert top[0].text == "Quantum computers use qubits." and top[0].similarity > top[1].similarity


def test_when_did_i_learn_returns_tags():
    model = tiny()
    session = model.session
    model.update_memory("The train leaves from platform nine.")
    session.turn = 3
    session.new_episode()
    session.turn = 2
    model.update_memory("Octopuses have three hearts.")
    model.session.memory.tick(5)
    hit = model.when_did_i_learn("Octopuses have three", k=1)[0]
    assert hit.text == "Octopuses have three hearts."
    assert (hit.episode, hit.turn, hit.time) == (1, 2, 1) and hit.age == model.session.memory.clock - 1 == 6
    first = model.when_did_i_learn("The train leaves from", k=1)[0]
    assert (first.episode, first.turn, first.time) == (0, 0, 0)


def test_weights_decay_with_the_clock_and_importance_scales_them():
    mem = TemporalSedenionMemory(decay_rate=0.1, max_moments=10)
    state = np.eye(16)[0]
    a = mem.store(state, "a", importance=1.0)
    b = mem.store(np.eye(16)[1], "b", importance=3.0)
    w0 = mem.weights()
    mem.tick(10)
    w1 = mem.weights()
    assert np.allclose(w1 / w0, math.exp(-0.1 * 10))  # exp(-rate * age)
    # b is 3x as important and one tick younger
    assert b.weight(mem.clock, 0.1) == pytest.approx(3 * a.weight(mem.clock, 0.1) * math.exp(0.1))
    # importance moves the consolidated state towards the important moment, and never cancels out
    s = mem.consolidated()
    assert s[1] > s[0] > 0 and np.isclose(np.linalg.norm(s), 1.0)
    with pytest.raises(ValueError):
        mem.store(state, "zero importance", importance=0.0)


def test_recall_score_decays_and_pruning_drops_the_weakest():
    mem = TemporalSedenionMemory(decay_rate=0.05, max_moments=3)
    rng = np.random.default_rng(0)
    states = rng.normal(size=(4, 16))
    mem.store(states[0], "weak", importance=0.2)
    mem.store(states[1], "old but important", importance=5.0)
    before = mem.recall(states[1], k=1)[0].score
    mem.tick(20)
    after = mem.recall(states[1], k=1)[0]
    assert after.text == "old but important" and after.score == pytest.approx(before * math.exp(-0.05 * 20))
    mem.store(states[2], "c")
    mem.store(states[3], "d")  # 4 > max_moments: the weakest goes
    assert [m.text for m in mem.moments] == ["old but important", "c", "d"]


def test_memory_conditions_generation():
    tok = create_default_tokenizer()
    model = tiny(1)
    engine = ResoLLMInference(model, tok, temperature=1.0)
    ids = torch.tensor([tok.encode("Tell me about trains")])
    base = model(ids).logits
    plain = engine.generate("Tell me about trains", max_length=24, seed=0)
    model.update_memory("The train leaves from platform nine.", importance=2.0)
    model.session.turn = 0
    conditioned = engine.generate("Tell me about trains", max_length=24, seed=0)
    from core_model.cognition.api import memory_offset

    off = memory_offset(model)
    assert off is not None and off.shape == (64,)
    assert not torch.allclose(model(ids, input_offsets=off.expand(1, ids.shape[1], -1)).logits, base)
    assert conditioned.entropy_trace != plain.entropy_trace
    assert conditioned.token_ids != plain.token_ids  # same seed, memory changes the sampled text


def test_memory_can_be_switched_off():
    model = tiny(temporal_smf=TemporalSMFConfig(enabled=False))
    assert not hasattr(model, "memory_proj")
    with pytest.raises(CognitionError, match="disabled"):
        model.update_memory("anything")


def test_decay_and_importance_reorder_recall():
    """Equally similar moments: recall ranks the fresher first, unless an older one is important
    enough to outweigh its decay (importance * exp(-rate * age))."""
    rng = np.random.default_rng(0)
    state = rng.standard_normal(16)
    mem = TemporalSedenionMemory(decay_rate=0.05, max_moments=10)
    mem.store(state, "old", importance=1.0)
    mem.tick(20)
    mem.store(state, "new", importance=1.0)
    assert [r.text for r in mem.recall(state, k=2)] == ["new", "old"]
    mem = TemporalSedenionMemory(decay_rate=0.05, max_moments=10)
    mem.store(state, "old but important", importance=4.0)  # 4 * exp(-0.05 * 21) = 1.40 > 1
    mem.tick(20)
    mem.store(state, "new", importance=1.0)
    assert [r.text for r in mem.recall(state, k=2)] == ["old but important", "new"]
    mem.tick(20)  # ages now 42 and 21 (each store also ticks the clock once)
    weights = {r.text: r.weight for r in mem.recall(state, k=2)}
    assert weights["old but important"] == pytest.approx(4.0 * math.exp(-0.05 * 42))
    assert weights["new"] == pytest.approx(math.exp(-0.05 * 21))
