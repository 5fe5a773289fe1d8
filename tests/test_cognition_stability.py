"""Predictive stability: classes, Lyapunov estimate, prediction, temperature control, halting."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from core_model.cognition.lyapunov import LAG
from core_model.cognition.stability import (
    PredictiveStability, StabilityState, TemperatureController, detect_period, stability_score,
)
from core_model.config import ResoLLMConfig, StabilityConfig
from core_model.inference import ResoLLMInference
from core_model.model import ResoLLMModel
from core_model.tokenizer import create_default_tokenizer
from model_helpers import one_torch_thread, tiny  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_detect_period():
    assert detect_period([1, 2, 3] * 10, 16) == 3
    assert detect_period([7] * 20, 16) == 1
    assert detect_period(list(range(40)), 16) is None
    assert detect_period([1, 2, 3] * 5, 16) is None  # too short for the window
    assert detect_period(list(range(10)) + [4, 5, 6, 7] * 6, 16) == 4


def test_controller_raises_temperature_when_entropy_collapses_and_lowers_it_when_it_explodes():
    cfg = StabilityConfig(min_temperature=0.3, max_temperature=1.5, entropy_low=0.15, entropy_high=0.85,
                          temperature_step=0.1)
    ctrl = TemperatureController(cfg, 0.7)
    temps = [ctrl.update(0.02, unstable=False, collapsed=False) for _ in range(30)]  # collapse
    assert temps[0] > 0.7 and all(b >= a for a, b in zip(temps, temps[1:])) and temps[-1] == 1.5
    temps = [ctrl.update(0.97, unstable=False, collapsed=False) for _ in range(40)]  # explosion
    assert temps[0] < 1.5 and all(b <= a for a, b in zip(temps, temps[1:])) and temps[-1] == 0.3
    t = ctrl.update(0.5, unstable=False, collapsed=False)  # in the band: relax towards the request
    assert 0.3 < t < 0.7
    assert ctrl.suggest(0.7, 0.5, unstable=True, collapsed=False) < 0.7  # instability cools
    assert ctrl.suggest(0.7, 0.5, unstable=False, collapsed=True) > 0.7  # loops heat
    assert TemperatureController(cfg, 0.0).update(0.01, False, True) == 0.0  # greedy stays greedy


def test_engine_temperature_follows_entropy():
    """Untrained model: near-uniform distributions -> the controller cools down to the minimum."""
    tok = create_default_tokenizer()
    model = tiny()
    r = ResoLLMInference(model, tok, temperature=1.0).generate("Hello", max_length=30, seed=0, stop_at_eos=False)
    assert r.temperature_trace[0] == 1.0 and r.temperature_trace[-1] == pytest.approx(0.3)
    assert min(r.temperature_trace) >= 0.3 and len(r.temperature_trace) == r.tokens_generated
    assert r.entropy_trace[0] > r.entropy_trace[-1]  # lower temperature, lower sampling entropy
    assert model.get_suggested_temperature(0.7) < 0.7  # still high entropy at the end


def test_looping_generation_is_classified_periodic():
    tok = create_default_tokenizer()
    model = tiny()
    r = ResoLLMInference(model, tok, temperature=0.0).generate("the cat sat on the mat", max_length=60, seed=0)
    period = detect_period(r.token_ids, 16)
    assert period is not None  # greedy decoding of this untrained model falls into a loop
    assert r.stability == "periodic" and any("became periodic" in w for w in r.warnings)
    assert model.get_stability() <= 0.5


def test_lyapunov_trace_is_real():
    tok = create_default_tokenizer()
    model = tiny()
    r = ResoLLMInference(model, tok, temperature=0.8).generate("Once upon a time", max_length=40, seed=1,
                                                               stop_at_eos=False)
    assert len(r.lyapunov_trace) == r.tokens_generated == 40
    # the twin catches up after 8, 16 (then 32) more steps, each read LAG steps after it started;
    # the first measurement is the reference
    second = 8 + 16 + LAG
    assert r.lyapunov_trace[:second] == [0.0] * second
    assert r.lyapunov_trace[second] != 0.0 and all(math.isfinite(v) for v in r.lyapunov_trace)
    assert r.lyapunov == r.lyapunov_trace[-1] and 0.0 <= model.get_stability() <= 1.0
    # measured every step, the estimate moves every step
    model1 = tiny(stability=StabilityConfig(lyapunov_every=1))
    r1 = ResoLLMInference(model1, tok, temperature=0.8).generate("Once upon a time", max_length=40, seed=1,
                                                                 stop_at_eos=False)
    assert r1.lyapunov_trace[:2] == [0.0, 0.0] and len(set(r1.lyapunov_trace[2:])) > 20
    assert r1.token_ids == r.token_ids  # the twin never changes the main trajectory
    # switching the twin off removes the estimate (and its cost)
    model2 = tiny(stability=StabilityConfig(lyapunov=False))
    r2 = ResoLLMInference(model2, tok, temperature=0.8).generate("Once upon a time", max_length=10, seed=1)
    assert set(r2.lyapunov_trace) == {0.0}


def test_twin_on_a_worker_thread_gives_the_same_trace_however_slow(monkeypatch):
    """A catch-up's distance is read at a fixed step, so the worker's speed changes nothing."""
    import time

    from core_model.cognition import lyapunov

    tok = create_default_tokenizer()

    def run():
        model = tiny(stability=StabilityConfig(lyapunov_every=16))
        r = ResoLLMInference(model, tok, temperature=0.8).generate("Once upon a time", max_length=48, seed=3,
                                                                   stop_at_eos=False)
        return r.token_ids, r.lyapunov_trace, model.get_stability()

    threads = []
    real_forward = lyapunov.LyapunovTwin._forward

    def slow_forward(self, ids, offsets):
        threads.append(threading.current_thread().name)
        time.sleep(0.03)  # far slower than the main trajectory's steps
        return real_forward(self, ids, offsets)

    fast = run()
    monkeypatch.setattr(lyapunov.LyapunovTwin, "_forward", slow_forward)
    slow = run()
    assert threads and all(t.startswith("reso-lyapunov-twin") for t in threads)
    monkeypatch.setattr(lyapunov.LyapunovTwin.__init__, "__defaults__", (False,))  # in the calling thread
    threads.clear()
    inline = run()
    assert threads == [threading.current_thread().name] * len(threads) and threads
    assert fast == slow == inline
    assert any(v != 0.0 for v in fast[1])


def test_a_catch_up_still_running_at_the_end_updates_the_final_exponent():
    tok = create_default_tokenizer()
    model = tiny(stability=StabilityConfig(lyapunov_every=16))
    # catch-ups after 8 and 24 steps; the second is read when the 26-step generation ends
    r = ResoLLMInference(model, tok, temperature=0.8).generate("Once upon a time", max_length=26, seed=2,
                                                               stop_at_eos=False)
    assert r.tokens_generated == 26
    assert set(r.lyapunov_trace) == {0.0}  # no exponent during the steps (one reference distance only)
    assert r.lyapunov != 0.0 and len(model.session.stability.local_exponents) == 1


def test_benettin_renormalisation_pulls_the_twin_cache():
    from core_model.cognition.lyapunov import _pull

    torch.manual_seed(0)
    # more oscillators (16) than filled positions (4): the running phase sums are pulled whole
    model = ResoLLMModel(ResoLLMConfig(dim=256, num_layers=2, num_heads=4, num_phases=16, max_seq_len=64)).eval()
    a, b = model.new_cache(1, 16), model.new_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), cache=a)
        model(torch.tensor([[1, 2, 3, 9]]), cache=b)
    k_a, k_b = a.layers[0].k[:, :, :4].clone(), b.layers[0].k[:, :, :4].clone()
    s_a, s_b = a.layers[0].phase_sum.clone(), b.layers[0].phase_sum.clone()
    assert s_a.shape[2] == 16 and not torch.allclose(s_a, s_b)
    _pull(a, b, 0.25)
    assert torch.allclose(b.layers[0].k[:, :, :4], k_a + 0.25 * (k_b - k_a), atol=1e-6)
    assert torch.allclose(b.layers[0].phase_sum, s_a + 0.25 * (s_b - s_a), atol=1e-6)
    _pull(a, b, 0.0)
    for la, lb in zip(a.layers, b.layers):
        assert torch.allclose(la.k[:, :, :4], lb.k[:, :, :4]) and torch.allclose(la.v[:, :, :4], lb.v[:, :, :4])
        assert torch.allclose(la.phase_sum, lb.phase_sum)


def test_growing_divergence_is_chaotic_and_predicted_first():
    cfg = StabilityConfig(lyapunov_threshold=0.1, predictive_horizon=5, window=16, lyapunov_every=1)
    mon = PredictiveStability(cfg, vocab_size=263)
    mon.start()
    log_d, labels, rate = -7.0, [], 0.0
    for step in range(40):
        rate = min(0.3, rate + 0.015)  # perturbations grow faster and faster
        log_d += rate
        mon.observe_distance(log_d)
        labels.append(mon.observe(step, 3.0, list(range(step + 1))).label)
    assert labels[-1] == "chaotic" and labels[0] == "stable"
    first_chaotic = labels.index("chaotic")
    predicted = [w for w in mon.warnings if "predicted" in w]
    assert predicted, mon.warnings
    assert int(predicted[0].split()[1].rstrip(":")) < first_chaotic  # the warning names an earlier step
    assert any(w.startswith(f"step {first_chaotic}: generation became chaotic") for w in mon.warnings)


def test_divergent_and_score():
    cfg = StabilityConfig(lyapunov_every=1)
    mon = PredictiveStability(cfg, vocab_size=263)
    mon.start()
    mon.observe_distance(float("nan"))
    assert mon.observe(0, 3.0, [1]).label == "divergent" and mon.score() == 0.0
    s = StabilityState(label="stable", lyapunov=-0.5)
    assert stability_score(s, 0.1) == pytest.approx(1.0, abs=1e-6)
    assert stability_score(StabilityState(label="chaotic", lyapunov=0.3), 0.1) < 0.01


def test_halting_is_opt_in_and_respects_the_minimum(monkeypatch):
    tok = create_default_tokenizer()
    model = tiny()
    # Force every step to look chaotic: a monitor that always reports a high exponent.
    original = PredictiveStability.observe

    def chaotic(self, step, entropy, tokens, finite=True):
        self.exponents.append(1.0)
        self.positions.append(step + 1)
        return original(self, step, entropy, tokens, finite)

    monkeypatch.setattr(PredictiveStability, "observe", chaotic)
    engine = ResoLLMInference(model, tok, temperature=0.8)
    r = engine.generate("Hi", max_length=40, seed=0, stop_at_eos=False)
    assert r.tokens_generated == 40 and not r.halted and r.stability == "chaotic"
    r = engine.generate("Hi", max_length=40, seed=0, stop_at_eos=False, halt_on_instability=True)
    assert r.halted and r.tokens_generated == model.config.stability.min_tokens_before_halt == 16
    assert any("halted" in w for w in r.warnings)
