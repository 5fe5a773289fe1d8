"""Agency: goals encoded with the model steer decoding, measure progress, get achieved; foci."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core_model.cognition import CognitionError
from hypothesis import given, settings
from hypothesis import strategies as st

from core_model.cognition.agency import (
    Goal, SteeringTable, compute_foci, content_words, group_words, steering_bias, word_coverage,
)
from core_model.config import AgencyConfig
from core_model.inference import ResoLLMInference
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread, tiny  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_goal_fields_and_content_words():
    model = tiny()
    goal = model.create_goal("Describe the ocean waves clearly", goal_type="informative", priority=0.8)
    assert goal.words == ["describe", "ocean", "waves", "clearly"]
    assert len(goal.vector) == 64 and goal.status == "active" and goal.progress == 0.0
    [active] = model.get_active_goals()
    assert (active.description, active.priority) == ("Describe the ocean waves clearly", 0.8)
    assert content_words("Provide a clear, beginner-friendly explanation") == ["clear", "beginner-friendly", "explanation"]


def test_progress_rises_when_the_text_matches_the_goal():
    model = tiny()
    goal = model.create_goal("describe ocean waves")
    matching = model.goal_progress(goal, "The ocean waves roll in; let me describe them.")
    unrelated = model.goal_progress(goal, "Compilers translate source code into machine code.")
    assert matching > unrelated + 0.3
    assert model.goal_progress(goal, "describe ocean waves") == pytest.approx(1.0, abs=1e-6)
    # Goal.update marks achievement at the threshold and counts stalls
    assert not goal.update(None, "nothing here", 0.6, step=1) and goal.stall == 1
    assert goal.update(np.asarray(goal.vector), "describe ocean waves", 0.6, step=9)
    assert goal.status == "achieved" and goal.achieved_at == 9 and model.get_active_goals() == []


def test_goal_changes_the_output_at_a_fixed_seed_and_fills_goals_achieved():
    tok = create_default_tokenizer()
    # Random weights have flat logits: a steering bias of 3 achieved the goal for 6 of 6 weight
    # seeds (1.5, the default for trained models, for 2 of 6).
    model = tiny(agency=AgencyConfig(goal_bias=3.0))
    engine = ResoLLMInference(model, tok)
    plain = engine.generate("Tell me about the sea.", max_length=120, seed=3, stop_at_eos=False)
    steered = engine.generate_with_goal("Tell me about the sea.", "describe ocean waves", max_length=120, seed=3,
                                        stop_at_eos=False)
    assert steered.token_ids != plain.token_ids
    low_plain, low_steered = plain.text.lower(), steered.text.lower()
    hits = lambda s: sum(w in s for w in ("describe", "ocean", "waves"))  # noqa: E731
    assert hits(low_steered) > hits(low_plain)
    assert steered.goals_achieved == ["describe ocean waves"]
    assert any("goal achieved" in w for w in steered.warnings)
    assert model.get_goals()[0].status == "achieved"


def test_unachieved_goal_of_generate_with_goal_is_abandoned():
    tok = create_default_tokenizer()
    model = tiny()
    engine = ResoLLMInference(model, tok)
    r = engine.generate_with_goal("Hi", "zyxwvut quorblax", max_length=10, seed=0)
    assert r.goals_achieved == [] and "zyxwvut quorblax" in r.goal_progress
    assert model.get_active_goals() == [] and model.get_goals()[0].status == "abandoned"


def test_steering_bias_continues_goal_words():
    g = Goal(1, "ocean", "task", 1.0, [0.0], ["ocean"], [[111, 99, 101, 97, 110]], [True])
    start = steering_bias([g], [32], at_boundary=True, base=2.0)
    assert start == {111: 1.0}  # beta / 2 on the first token at a word boundary
    assert steering_bias([g], [120], at_boundary=False, base=2.0) == {}
    mid = steering_bias([g], [32, 111, 99], at_boundary=False, base=2.0)
    assert mid == {101: pytest.approx(2.0 * (1 + 2 / 5))}
    g.stall = 2
    assert steering_bias([g], [32, 111, 99], False, 2.0)[101] == pytest.approx(2 * 2.0 * (1 + 2 / 5))


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=5), min_size=1, max_size=4),
       covered=st.lists(st.booleans(), min_size=4, max_size=4), stall=st.integers(0, 4),
       tokens=st.lists(st.integers(0, 5), min_size=1, max_size=60), boundary=st.lists(st.booleans(), min_size=60, max_size=60))
def test_steering_table_equals_steering_bias(words, covered, stall, tokens, boundary):
    """The indexed, cached table gives the bias ``steering_bias`` computes, step by step, across goal updates."""
    V = 6
    g = Goal(1, "g", "task", 0.7, [0.0], [f"w{i}" for i in range(len(words))], words, [i % 2 == 0 for i in range(len(words))],
             list(range(len(words))), covered[: len(words)], stall=stall)
    h = Goal(2, "h", "task", 1.0, [0.0], ["x"], [[3, 1, 3]], [False], [0], [False])
    table = SteeringTable(V, 1.5, "cpu")
    table.reset([g, h])
    for i in range(1, len(tokens) + 1):
        if i % 8 == 0:  # a goal update: stall and coverage change
            g.stall, g.covered = min(g.stall + 1, 4), [not c for c in g.covered]
            table.reset([g, h])
        tail = tokens[max(0, i - 32):i]
        expected = torch.zeros(V)
        for t, b in steering_bias([g, h], tail, boundary[i - 1], 1.5).items():
            expected[t] = b
        got = table.bias(tail, boundary[i - 1])
        assert torch.equal(got if got is not None else torch.zeros(V), expected)


def test_compute_foci_keeps_each_targets_best_occurrence_and_breaks_ties_by_position():
    pieces = [" sea", " and", " sea", " sky", " sun"]
    ids = [1, 2, 1, 3, 4]
    surprisal = np.array([1.0, 0.2, 3.0, 2.0, 2.0])
    foci = compute_foci(pieces, ids, surprisal, np.zeros(5), None, [], lambda t: [], (1.0, 0.0, 0.0), 3, 4.0)
    assert [(f["target"], f["position"]) for f in foci] == [("sea", 2), ("sky", 3), ("sun", 4)]
    assert [f["novelty"] for f in foci] == [0.75, 0.5, 0.5]


def test_attention_foci_have_the_seed_fields():
    tok = create_default_tokenizer()
    model = tiny()
    model.bind_concept("mathematics", token_ids=tok.encode("math"))
    engine = ResoLLMInference(model, tok)
    model.create_goal("explain algebra")
    engine.generate("I love math and algebra puzzles", max_length=16, seed=0)
    foci = model.get_attention_foci()
    assert 1 <= len(foci) <= model.config.agency.max_foci
    for f in foci:
        assert f.type in ("token", "goal", "concept") and f.target
        assert 0 <= f.intensity <= 1 and 0 <= f.novelty <= 1 and 0 <= f.relevance <= 1 and f.duration >= 0
    assert [f.salience for f in foci] == sorted((f.salience for f in foci), reverse=True)
    kinds = {(f.type, f.target) for f in foci}
    assert ("goal", "algebra") in kinds  # a goal word in the context is maximally relevant


def test_last_query_attention_matches_explicit_scores():
    """The probe's attention mass equals softmax of the module's own explicit scores (last row),
    after a prefill and after a cached decoding step (the fused path when it is built), also when
    read later, as the foci are: a recorded moment's query over a cache that has grown since."""
    from core_model.cognition.decoding import _AttentionProbe, _FociMoment

    model = tiny()
    attn = model.blocks[-1].attn

    def explicit_last_row(ids: torch.Tensor) -> np.ndarray:
        seen = {}
        block = model.blocks[-1]
        hook = block.register_forward_pre_hook(lambda module, args: seen.update(args=args))
        with torch.no_grad():
            model(ids)
            hook.remove()
            x, theta, rope = seen["args"][:3]  # the block's input, phases and RoPE tables
            qkv = block.in_proj(block.ln_attn(x)).split(block.in_widths, dim=-1)[0]
            T = ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            scores = attn.explicit_scores(qkv, theta, rope).masked_fill(~causal, float("-inf"))
            return scores.softmax(-1)[0, :, -1].mean(0).numpy()

    probe = _AttentionProbe(attn)
    ids = torch.tensor([[5, 80, 101, 33, 7, 250, 90, 12]])
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        model(ids, cache=cache)
        probe.capture()
        after_prefill = _FociMoment.now(probe, 8, 0)
        model(torch.tensor([[44]]), cache=cache)  # one cached step
        probe.capture()
        after_step = _FociMoment.now(probe, 9, 1)
        model(torch.tensor([[45]]), cache=cache)  # the cache grows on after both moments
        mass = after_prefill.intensity(cache.layers[-1], None)
        mass_step = after_step.intensity(cache.layers[-1], None)
    probe.remove()
    assert attn.last_query is None and not attn.record_query
    assert mass.shape == (8,) and math.isclose(float(mass.sum()), 1.0, rel_tol=1e-5)
    assert np.allclose(mass, explicit_last_row(ids), atol=1e-5)
    assert np.allclose(mass_step, explicit_last_row(torch.cat([ids, torch.tensor([[44]])], 1)), atol=1e-5)


def test_agency_switch_and_errors():
    model = tiny(agency=AgencyConfig(enabled=False, max_goals=1))
    with pytest.raises(CognitionError, match="disabled"):
        model.create_goal("anything")
    model = tiny(agency=AgencyConfig(max_goals=1))
    model.create_goal("first goal here")
    with pytest.raises(CognitionError, match="already active"):
        model.create_goal("second goal here")
    assert group_words(["I", " lo", "ve", " m", "ath", "!"]) == [[0], [1, 2], [3, 4], [5]]


def test_batched_surprisal_equals_per_step_log_softmax():
    from core_model.cognition.decoding import _Surprisal

    g = torch.Generator().manual_seed(0)
    prompt_logits, prompt = torch.randn(5, 11, generator=g), torch.tensor([1, 4, 2, 7, 3])
    s = _Surprisal(prompt_logits, prompt, 11, 3)
    steps = [(torch.randn(11, generator=g), int(t)) for t in (5, 0, 10)]
    for i, (row, t) in enumerate(steps):
        s.push(row, t)
        if i == 1:
            assert len(s.values(6)) == 6  # a partial read flushes what is pending
    want = [math.log(11)] + [-float(prompt_logits[i].double().log_softmax(-1)[prompt[i + 1]]) for i in range(4)]
    want += [-float(r.double().log_softmax(-1)[t]) for r, t in steps]
    assert np.allclose(s.values(8), want, atol=1e-12)


def test_rows_buffer_copies_batches_of_rows_of_either_shape():
    from core_model.cognition.decoding import _Rows

    g = torch.Generator().manual_seed(1)
    n = 2 * _Rows.BATCH + 3  # two full batches and a partial one
    for shape, dtype in (((6,), torch.float32), ((1, 1, 6), torch.float32), ((1, 1, 6), torch.float16)):
        rows, want = _Rows(n, 6, "cpu"), []
        for i in range(n):
            r = torch.randn(shape, generator=g).to(dtype)
            rows.push(r)
            want.append(r.reshape(6).float())
            if i == 5:
                assert torch.equal(rows.view(), torch.stack(want))  # a read flushes what is pending
        assert rows.count == n and torch.equal(rows.view(), torch.stack(want)), (shape, dtype)


def test_coverage_counts_whole_words_and_plurals_only():
    assert word_coverage(["rain"], "We are training the model.") == 0.0  # not inside another word
    assert word_coverage(["rain"], "Rain, again.") == 1.0
    assert word_coverage(["goal", "wave"], "Two goals; the waves.") == 1.0  # plurals count
    assert word_coverage(["beginner-friendly", "ocean"], "a beginner-friendly text") == 0.5
    model = tiny()
    goal = model.create_goal("rain forecast")
    assert model.goal_progress(goal, "training forecasters") < 0.5  # no coverage from substrings


def test_a_goal_without_content_words_is_measured_by_similarity_alone():
    import numpy as np

    from core_model.cognition.agency import Goal

    g = Goal(1, "be it so", "task", 1.0, [1.0, 0.0, 0.0], [], [], [])
    assert g.measure(np.array([2.0, 0.0, 0.0]), "anything") == pytest.approx(1.0)  # reachable
    assert g.measure(np.array([0.0, 1.0, 0.0]), "anything") == 0.0
    worded = Goal(2, "gardens", "task", 1.0, [1.0, 0.0, 0.0], ["gardens"], [[1]], [True])
    assert worded.measure(np.array([2.0, 0.0, 0.0]), "no match") == pytest.approx(0.5)


def test_every_generation_is_steered_to_every_goal_word_from_its_first_token(monkeypatch):
    """Coverage is of the output being generated (module docstring): the words an earlier
    output held do not stop the steering of the next one, whose first steps (before any goal
    update) are those of a goal nothing has covered; a generation that fails puts the coverage
    it found back."""
    from core_model.cognition import decoding

    tok = create_default_tokenizer()
    model = tiny(agency=AgencyConfig(goal_bias=3.0))
    engine = ResoLLMInference(model, tok)
    model.create_goal("describe ocean waves")
    state = model.cognition_state()
    first = engine.generate("Tell me about the sea.", max_length=6, seed=3, stop_at_eos=False)  # < update_every
    model.load_cognition_state(state)
    [goal] = model.get_goals()
    goal.covered = [True, True, True]  # as an earlier output holding every goal word left it
    again = engine.generate("Tell me about the sea.", max_length=6, seed=3, stop_at_eos=False)
    assert again.token_ids == first.token_ids and again.entropy_trace == first.entropy_trace

    model.load_cognition_state(state)
    [goal] = model.get_goals()
    goal.covered = [True, False, True]

    def failing(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(decoding.CognitiveDecoder, "_update_goals", failing)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate("Tell me about the sea.", max_length=6, seed=3, stop_at_eos=False)
    assert goal.covered == [True, False, True]
