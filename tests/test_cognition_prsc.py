"""PRSC: composition multiplies primes and adds log-prime phases; interference coherence; bound
concepts feed the network's input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core_model.cognition import CognitionError
from core_model.cognition.api import ConceptInput
from core_model.cognition.prsc import ConceptStore, interference_coherence, prime_phases
from core_model.config import PRSCConfig
from core_model.embedding import log_prime_phases
from core_model.inference import ResoLLMInference
from core_model.primes import first_primes
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread, tiny  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def circular_close(a, b, tol=1e-6) -> bool:
    return bool(np.all(np.abs(np.angle(np.exp(1j * (np.asarray(a) - np.asarray(b))))) < tol))


def test_single_token_concept_matches_the_embedding_phase_table():
    store = ConceptStore(263, 4)
    b = store.bind("mathematics", [42])
    assert b.primes == [int(first_primes(263)[42])] and b.prime == 191
    assert circular_close(b.phases, log_prime_phases(263, 4)[42].double().numpy(), tol=1e-5)


@settings(max_examples=50, deadline=None)
@given(a=st.lists(st.integers(0, 262), min_size=1, max_size=3), b=st.lists(st.integers(0, 262), min_size=1, max_size=3))
def test_composition_multiplies_primes_and_adds_phases(a, b):
    store = ConceptStore(263, 8)
    ca, cb = store.bind("a", a), store.bind("b", b)
    c = store.compose("a", "b")
    assert c.prime == ca.prime * cb.prime and c.parts == ["a", "b"]
    assert circular_close(c.phases, np.asarray(ca.phases) + np.asarray(cb.phases), tol=1e-7)
    assert 0.0 <= c.coherence <= 1.0 and c.coherence == pytest.approx(store.coherence("a", "b"))


def test_interference_coherence_bounds():
    th = prime_phases([5], 8)
    assert interference_coherence([th, th]) == pytest.approx(1.0)
    assert interference_coherence([th, th + math.pi]) == pytest.approx(0.0, abs=1e-12)
    mid = interference_coherence([th, th + math.pi / 2])
    assert mid == pytest.approx(math.cos(math.pi / 4))
    store = ConceptStore(263, 8, coherence_threshold=0.7)
    store.bind("x", [10]), store.bind("y", [10])
    assert store.is_coherent("x", "y")


def test_bound_concepts_feed_the_embeddings_of_their_tokens():
    tok = create_default_tokenizer()
    model = tiny()
    ids = tok.encode("I like math a lot")
    base = model(torch.tensor([ids])).logits
    model.bind_concept("mathematics", token_ids=tok.encode("math"))
    off = ConceptInput(model).offsets(ids, 0)
    end = ids.index(tok.encode("h")[0])  # the concept ends at the 'h' of "math"
    assert off is not None and off.shape == (len(ids), 64)
    assert torch.count_nonzero(off.abs().sum(-1)) == 1 and off[end].abs().sum() > 0
    conditioned = model(torch.tensor([ids]), input_offsets=off[None]).logits
    assert torch.allclose(conditioned[0, :end], base[0, :end], atol=1e-6)  # causal: earlier positions untouched
    assert not torch.allclose(conditioned[0, end:], base[0, end:])
    # ... and the engine uses them: same seed, different continuation
    engine = ResoLLMInference(model, tok, temperature=1.0)
    with_concept = engine.generate("I like math a lot", max_length=20, seed=0)
    model.session.concepts.unbind("mathematics")
    without = engine.generate("I like math a lot", max_length=20, seed=0)
    assert with_concept.entropy_trace != without.entropy_trace


def test_prsc_switch_and_limits():
    model = tiny(prsc=PRSCConfig(enabled=False))
    assert not hasattr(model, "concept_proj")
    with pytest.raises(CognitionError, match="disabled"):
        model.bind_concept("x", token_id=1)
    store = ConceptStore(263, 4, max_bindings=1)
    store.bind("a", [1])
    with pytest.raises(CognitionError, match="max_bindings"):
        store.bind("b", [2])
    with pytest.raises(CognitionError, match="outside"):
        ConceptStore(263, 4).bind("c", [263])
    with pytest.raises(CognitionError, match="no concept"):
        store.compose("a", "missing")
