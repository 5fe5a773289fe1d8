"""Stochastic resonance at generation time: repetition score, noise switched by it, off by default."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from core_model.cognition.resonance import RepetitionDetector, repeated_ngram_share
from core_model.config import ResoLLMConfig, StochasticResonanceConfig
from core_model.inference import ResoLLMInference
from core_model.model import ResoLLMModel
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(sr: StochasticResonanceConfig | None = None, seed: int = 0) -> ResoLLMModel:
    torch.manual_seed(seed)
    cfg = ResoLLMConfig(dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256,
                        stochastic_resonance=sr or StochasticResonanceConfig())
    return ResoLLMModel(cfg).eval()


def test_repetition_score():
    assert repeated_ngram_share(list(range(20))) == 0.0
    assert repeated_ngram_share([1, 2, 3, 4] * 5) == pytest.approx(13 / 17)
    assert repeated_ngram_share([1, 2, 3]) == 0.0
    det = RepetitionDetector(window=8)
    for t in [5] * 20:
        det.push(t)
    assert len(det.tokens) == 8 and det.score() == pytest.approx(4 / 5)


@settings(max_examples=80, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), max_size=120), window=st.integers(1, 40), n=st.integers(1, 5))
def test_sliding_repetition_score_equals_the_share_of_its_window(tokens, window, n):
    det = RepetitionDetector(window=window, n=n)
    for i, t in enumerate(tokens):
        det.push(t)
        assert list(det.tokens) == tokens[max(0, i + 1 - window):i + 1]
        assert det.score() == repeated_ngram_share(list(det.tokens), n)
    assert RepetitionDetector(window, n, tokens).score() == det.score()


def test_noise_breaks_a_greedy_loop_only_when_enabled():
    tok = create_default_tokenizer()
    prompt = "the cat sat on the mat"
    off = ResoLLMInference(tiny(), tok, temperature=0.0).generate(prompt, max_length=60, seed=0)
    assert off.noise_steps == 0 and off.stability == "periodic"
    sr = StochasticResonanceConfig(enabled=True, noise_amplitude=3.0, repetition_threshold=0.3, weak_fraction=2.0)
    model = tiny(sr)
    on = ResoLLMInference(model, tok, temperature=0.0).generate(prompt, max_length=60, seed=0)
    assert on.noise_steps > 0
    first_noisy = next(i for i, r in enumerate(on.repetition_trace) if r > 0.3)
    assert on.token_ids[: first_noisy + 1] == off.token_ids[: first_noisy + 1]  # identical until noise starts
    assert on.token_ids != off.token_ids
    assert repeated_ngram_share(on.token_ids) < repeated_ngram_share(off.token_ids)
    assert all(b.ffn.noise_amplitude == 0.0 for b in model.blocks)  # switched off after the generation
    model.reset_cognition()  # the repetition window is session state
    again = ResoLLMInference(model, tok, temperature=0.0).generate(prompt, max_length=60, seed=0)
    assert again.token_ids == on.token_ids  # repeatable: seeded noise generator
