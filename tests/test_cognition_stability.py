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
from core_model.config import StabilityConfig
from core_model.inference import ResoLLMInference
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
    # the first twin window reads the 16 tokens after the prompt and is read LAG steps later
    first = 16 + LAG
    assert r.lyapunov_trace[:first] == [0.0] * first
    assert r.lyapunov_trace[first] != 0.0 and all(math.isfinite(v) for v in r.lyapunov_trace)
    assert r.lyapunov == r.lyapunov_trace[-1] and 0.0 <= model.get_stability() <= 1.0
    # the shortest windows (3 tokens) back to back: the estimate moves every 3 steps
    model1 = tiny(stability=StabilityConfig(lyapunov_every=1))
    r1 = ResoLLMInference(model1, tok, temperature=0.8).generate("Once upon a time", max_length=40, seed=1,
                                                                 stop_at_eos=False)
    assert r1.lyapunov_trace[:3] == [0.0] * 3 and len(set(r1.lyapunov_trace[3:])) >= 12
    assert r1.token_ids == r.token_ids  # the twin never changes the main trajectory
    # switching the twin off removes the estimate (and its cost)
    model2 = tiny(stability=StabilityConfig(lyapunov=False))
    r2 = ResoLLMInference(model2, tok, temperature=0.8).generate("Once upon a time", max_length=10, seed=1)
    assert set(r2.lyapunov_trace) == {0.0}


def test_twin_on_a_worker_thread_gives_the_same_trace_however_slow(monkeypatch):
    """A window's exponent is read at a fixed step, so the worker's speed changes nothing."""
    import time

    from core_model.cognition import lyapunov

    tok = create_default_tokenizer()

    def run():
        # windows read steps 1-16 and 33-48, each read 8 steps after its forward started
        model = tiny(stability=StabilityConfig(lyapunov_every=32))
        r = ResoLLMInference(model, tok, temperature=0.8).generate("Once upon a time", max_length=60, seed=3,
                                                                   stop_at_eos=False)
        return r.token_ids, r.lyapunov_trace, model.get_stability()

    threads = []
    real_forward = lyapunov.LyapunovTwin._forward

    def slow_forward(self, *args):
        threads.append(threading.current_thread().name)
        time.sleep(0.03)  # far slower than the main trajectory's steps
        return real_forward(self, *args)

    fast = run()
    monkeypatch.setattr(lyapunov.LyapunovTwin, "_forward", slow_forward)
    slow = run()
    assert threads and all(t.startswith("reso-lyapunov-twin") for t in threads)
    monkeypatch.setattr(lyapunov.LyapunovTwin.__init__, "__defaults__", (False,))  # in the calling thread
    threads.clear()
    inline = run()
    assert threads == [threading.current_thread().name] * len(threads) and threads
    assert fast == slow == inline
    assert len(threads) == 2 and len(set(fast[1])) == 3  # 0 until the first window, then two exponents


def test_a_window_still_running_at_the_end_updates_the_final_exponent():
    tok = create_default_tokenizer()
    model = tiny(stability=StabilityConfig(lyapunov_every=32))
    # the window's forward starts after 16 steps, due 8 steps later: after the 22-step generation
    r = ResoLLMInference(model, tok, temperature=0.8).generate("Once upon a time", max_length=22, seed=2,
                                                               stop_at_eos=False)
    assert r.tokens_generated == 22
    assert set(r.lyapunov_trace) == {0.0}  # no exponent during the steps
    assert r.lyapunov != 0.0 and len(model.session.stability.local_exponents) == 1


def test_window_exponent_is_the_slope_of_log_distance_after_the_perturbed_position():
    from core_model.cognition.lyapunov import window_exponent

    torch.manual_seed(0)
    W, D = 16, 32
    main = torch.randn(W, D)
    direction = torch.nn.functional.normalize(torch.randn(W, D), dim=1)
    log_d = torch.tensor([3.0] + [-7.0 + 0.1 * j for j in range(1, W)])  # position 1: the kick itself
    twin = main + direction * main.norm(dim=1, keepdim=True) * log_d.exp()[:, None]
    assert window_exponent(twin, main) == pytest.approx(0.1, abs=1e-4)
    assert window_exponent(main.clone(), main) == pytest.approx(0.0)  # d = 0 everywhere: floored, flat
    twin[5] = float("inf")
    assert not math.isfinite(window_exponent(twin, main))


def test_growing_divergence_is_chaotic_and_predicted_first():
    cfg = StabilityConfig(lyapunov_threshold=0.1, predictive_horizon=5, window=16, lyapunov_every=1)
    mon = PredictiveStability(cfg, vocab_size=263)
    mon.start()
    labels, rate = [], 0.0
    for step in range(40):
        rate = min(0.3, rate + 0.015)  # perturbations grow faster and faster
        mon.observe_exponent(rate, step + 1)
        labels.append(mon.observe(step, 3.0, list(range(step + 1))).label)
    assert labels[-1] == "chaotic" and labels[0] == "stable"
    first_chaotic = labels.index("chaotic")
    predicted = [w for w in mon.warnings if "predicted" in w]
    assert predicted, mon.warnings
    assert int(predicted[0].split()[1].rstrip(":")) < first_chaotic  # the warning names an earlier step
    assert any(w.startswith(f"step {first_chaotic}: generation became chaotic") for w in mon.warnings)


def test_two_windows_at_the_default_spacing_can_predict():
    """At the defaults (a twin window every 64 steps) the second window's exponent already makes
    a trend: rising to just under the threshold, it predicts instability within the horizon."""
    cfg = StabilityConfig()
    mon = PredictiveStability(cfg, vocab_size=263)
    mon.start()
    first, second = LAG + cfg.lyapunov_window, cfg.lyapunov_every + LAG + cfg.lyapunov_window
    thr = cfg.lyapunov_threshold
    mon.observe_exponent(thr - 0.2, first)
    assert not mon.observe(first, 3.0, list(range(first + 1))).predicted_unstable  # one exponent: no trend
    mon.observe_exponent(thr - 0.001, second)  # rising by 0.2 over 64 steps: over the threshold within 5
    state = mon.observe(second, 3.0, list(range(second + 1)))
    assert state.label == "stable" and state.predicted_unstable
    assert any(w.startswith(f"step {second}: instability predicted") for w in mon.warnings)


def test_divergent_and_score():
    cfg = StabilityConfig(lyapunov_every=1)
    mon = PredictiveStability(cfg, vocab_size=263)
    mon.start()
    mon.observe_exponent(float("nan"), 1)
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


def test_a_shared_view_of_the_cache_copied_later_is_the_cache_as_it_was():
    """The twin forks the main cache without copying it: the main trajectory goes on appending,
    and the copy made later (on the worker) is the cache as it was at the fork."""
    model = tiny()
    with torch.inference_mode():
        ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
        cache = model.new_cache(1, 32)
        model(ids, cache=cache)
        eager = cache.select(torch.tensor([0]))  # a copy now
        view = cache.shared_view()
        for t in (4, 8, 6):  # the main trajectory appends three tokens
            model(torch.tensor([[t]]), cache=cache)
        later = view.copy_prefix()
        assert later.length == eager.length == 6 and cache.length == 9
        for a, b in zip(later.layers, eager.layers):
            assert torch.equal(a.k[:, :, :6], b.k[:, :, :6]) and torch.equal(a.v[:, :, :6], b.v[:, :, :6])
            assert torch.equal(a.phase_sum, b.phase_sum)
        for name in ("next_pos", "phase_count", "last_theta"):
            assert torch.equal(getattr(later, name), getattr(eager, name)), name
        # and both continue the same way, without touching the main cache
        before = [layer.k[:, :, :9].clone() for layer in cache.layers]
        x, y = model(torch.tensor([[11, 12]]), cache=later), model(torch.tensor([[11, 12]]), cache=eager)
        assert torch.equal(x.logits, y.logits) and torch.equal(x.hidden, y.hidden)
        assert all(torch.equal(k, layer.k[:, :, :9]) for k, layer in zip(before, cache.layers))


def test_the_twin_worker_is_shared_and_a_forked_child_gets_its_own():
    import multiprocessing as mp

    from core_model.cognition import lyapunov

    first = lyapunov._shared_worker()
    assert lyapunov._shared_worker() is first and first.submit(threading.current_thread).result().name.startswith(
        "reso-lyapunov-twin")
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_uses_the_worker, args=(child,))
    proc.start()
    assert parent.poll(30), "the forked child's twin worker never ran"
    assert parent.recv() == ("reso-lyapunov-twin", True)
    proc.join(10)


def _child_uses_the_worker(conn) -> None:
    from core_model.cognition import lyapunov

    worker = lyapunov._shared_worker()
    name = worker.submit(lambda: threading.current_thread().name).result(timeout=10)
    conn.send((name.rsplit("_", 1)[0], worker is not None))


@pytest.mark.parametrize("exponent, label", [(0.5, "chaotic"), (float("nan"), "divergent")])
def test_the_window_read_after_the_last_step_classifies_too(monkeypatch, exponent, label):
    """A 20-token generation reads its only window (steps 1-16) when it ends, not during it: that
    exponent must still set the label, the score and a warning."""
    from core_model.cognition import lyapunov

    monkeypatch.setattr(lyapunov, "window_exponent", lambda twin, main: exponent)
    tok = create_default_tokenizer()
    model = tiny()
    r = ResoLLMInference(model, tok, temperature=0.8).generate("Once upon a time", max_length=20, seed=0,
                                                               stop_at_eos=False)
    assert r.tokens_generated == 20 and set(r.lyapunov_trace) == {0.0}  # nothing was read during the steps
    assert r.stability == label and any(f"step 19: generation became {label}" in w for w in r.warnings)
    assert model.get_stability() < 0.5


@pytest.mark.parametrize("max_length", [40, 20])  # the window read at a step (due at 24), at the end
def test_an_interrupted_wait_for_a_window_still_waits_for_its_forward(monkeypatch, max_length):
    """An exception (Ctrl-C) while the main thread waits for a window's exponent must not return
    while the worker's forward still runs on the model."""
    import time

    from core_model.cognition import lyapunov

    done = threading.Event()
    real_forward = lyapunov.LyapunovTwin._forward

    def slow_forward(self, *args):
        time.sleep(0.3)
        try:
            return real_forward(self, *args)
        finally:
            done.set()

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(lyapunov.LyapunovTwin, "_forward", slow_forward)
    monkeypatch.setattr(lyapunov.Future, "result", interrupted)  # the first wait is interrupted
    tok = create_default_tokenizer()
    model = tiny()
    engine = ResoLLMInference(model, tok, temperature=0.8)
    with pytest.raises(KeyboardInterrupt):
        engine.generate("Once upon a time", max_length=max_length, seed=0, stop_at_eos=False)
    assert done.is_set()  # generate() returned only after the window's forward had ended


def test_an_interrupted_cleanup_still_takes_the_noise_and_the_probe_off_the_model(monkeypatch):
    """A Ctrl-C during a generation, then a second one while the clean-up waits for the twin's
    worker: the stochastic-resonance noise and the attention probe still come off the model, and
    its next generation is that of a fresh model."""
    from core_model.cognition import lyapunov
    from core_model.config import StochasticResonanceConfig

    def interrupted_wait(fs, *args, **kwargs):
        raise KeyboardInterrupt

    sr = StochasticResonanceConfig(enabled=True, noise_amplitude=0.01, repetition_threshold=0.0)
    tok = create_default_tokenizer()
    model = tiny(stochastic_resonance=sr)
    engine = ResoLLMInference(model, tok, temperature=0.0)
    calls = {"n": 0}
    real_forward = model.forward

    def forward(*args, **kwargs):
        if not lyapunov.in_twin_forward():
            calls["n"] += 1
            if calls["n"] == 20:  # a main-trajectory step while window 1 (steps 16 .. 24) runs
                raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(lyapunov, "wait", interrupted_wait)
    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(KeyboardInterrupt):
        engine.generate("ab ab ab ab ab", max_length=40, seed=0, stop_at_eos=False)
    lyapunov._shared_worker().submit(lambda: None).result()  # the window's forward has ended
    monkeypatch.undo()
    assert calls["n"] == 20
    assert all(b.ffn.noise_amplitude == 0 and b.ffn.noise_generator is None for b in model.blocks)
    attn = model.blocks[-1].attn
    assert attn.record_query is None and attn.last_query is None
    model.session.reset()
    again = engine.generate("ab ab ab ab ab", max_length=30, seed=0, stop_at_eos=False)
    fresh = ResoLLMInference(tiny(stochastic_resonance=sr), tok, temperature=0.0).generate(
        "ab ab ab ab ab", max_length=30, seed=0, stop_at_eos=False)
    assert again.noise_steps > 0 and again.token_ids == fresh.token_ids
