"""Cost and effect of inference-time cognition, from one run.

1. Cached decode speed (tokens/s, wall clock and per CPU-second of this process; torch runs
   one thread, and the Lyapunov twin's window forwards run on a worker thread beside the
   decoding, so the wall figure is what a user waits and the CPU figure is the total work) of
   the seed's small preset (4 x 256, untrained) with ResoLLMInference: every cognition component
   off, every component on at the defaults (a Lyapunov twin window of 16 tokens every 64 steps,
   a goal steering, PRSC concepts occurring in the prompt, memory conditioning, stochastic
   resonance armed), the same with a twin window every 128 steps instead of 64 (one window in a
   128-token generation instead of two: the cheaper setting of ``stability.lyapunov_every``),
   with twin windows back to back (8 tokens every 8 steps: the twin
   reads every token, the cost of a twin that follows the whole generation), and on without the
   twin; plain ``core_model.generation.generate`` as the reference. Runs are interleaved
   (alternating order); tok/s are medians, "vs off" the median of each repeat's ratio to the
   all-off run of that repeat, with a 95% bootstrap interval of that median. This machine's
   speed changes from one generation to the next (the per-repeat ratios spread by +-20%), so
   "per model-s" gives a drift-free figure as well: the median of each run's wall time over the
   time its main trajectory spent in model forwards, against the same for all off. It counts
   every cost outside those forwards (bookkeeping, the twin's window forwards, waiting for
   them) and assumes the main trajectory's forwards cost the same in both, which they do in
   kernels (the same calls plus one input-offset add). A twin on its worker thread breaks that
   assumption (while its window forward runs, the main forwards slow down: the GIL and the
   cores are shared), so for the two rows whose twin windows run on the worker (every 64 and
   every 128 steps) this column is a lower bound of the cost; the other rows run nothing
   concurrently (windows back to back run in the calling thread). Nor does the column see the
   bookkeeping's cost inside the forwards (it evicts them from the CPU caches).
   The last row runs all off a second time, interleaved like the others (an A/A control): its
   distance from +0% shows how far this run's noise alone moves a "vs off" figure.
2. What the twin's work costs in decode steps, the pointer for a cheaper twin: the median time
   of a batch-1 decoding step, of a batch-2 step (a twin read in lockstep with the main
   trajectory as a second row, which shares the weights' memory traffic), and of a
   ``lyapunov_window``-token window forward on a copy of the cache (what the twin runs now),
   interleaved; and how far the batch-2 step's first row lies from the batch-1 step (a lockstep
   twin would move the main trajectory by that much: the tests require that the twin never
   changes it). Then how much of a window's forward its worker thread hides: ``LAG`` decode
   steps alone, a window forward alone, and the same steps while the window runs on a worker
   thread (what a generation does between starting a window and reading its exponent), in turns.
3. Stochastic resonance on a briefly trained model (a few hundred AdamW steps on tinyshakespeare,
   byte tokenizer, inside this script): share of repeated 4-grams of the generations with SR off
   and on at the same fixed temperature, next to the same statistic of real text, and the mean
   log-likelihood of the generated text under the noise-free model.

    python benchmarks/cognition.py            # about 3-5 minutes on 2 CPU cores
    python benchmarks/cognition.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from core_model.cognition.lyapunov import LAG, in_twin_forward
from core_model.cognition.resonance import repeated_ngram_share
from core_model.config import (
    AgencyConfig, PRSCConfig, ResoLLMConfig, StabilityConfig, StochasticResonanceConfig, TemporalSMFConfig,
    small_config,
)
from core_model.inference import ResoLLMInference
from core_model.model import ResoLLMModel
from core_model.tokenizer import create_default_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import StealMeter, percent  # noqa: E402  (benchmarks/host.py)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PROMPT = "Explain how mathematics and logic help us reason about the world."
CONTROL = "engine, all off again (A/A control)"


def variant(cfg: ResoLLMConfig, **subs) -> ResoLLMConfig:
    """A copy of ``cfg`` with sub-configs replaced (same network, other cognition switches)."""
    return dataclasses.replace(cfg, **subs)


def all_off(cfg: ResoLLMConfig) -> ResoLLMConfig:
    return variant(cfg, agency=AgencyConfig(enabled=False), prsc=PRSCConfig(enabled=False),
                   temporal_smf=TemporalSMFConfig(enabled=False), stability=StabilityConfig(enabled=False),
                   stochastic_resonance=StochasticResonanceConfig(enabled=False))


def all_on(cfg: ResoLLMConfig, lyapunov: bool = True, every: int | None = None) -> ResoLLMConfig:
    stability = StabilityConfig(lyapunov=lyapunov)
    if every is not None:
        stability = dataclasses.replace(stability, lyapunov_every=every)
    return variant(cfg, agency=AgencyConfig(), prsc=PRSCConfig(), temporal_smf=TemporalSMFConfig(),
                   stability=stability,
                   stochastic_resonance=StochasticResonanceConfig(enabled=True))


def prepare_session(model, tok) -> None:
    model.reset_cognition()
    model.bind_concept("mathematics", token_ids=tok.encode("mathematics"))
    model.bind_concept("logic", token_ids=tok.encode("logic"))
    model.update_memory("Reasoning needs careful definitions.", importance=1.0)
    model.update_memory("Logic studies valid inference.", importance=0.5)
    model.create_goal("explain reasoning with clear examples")


class MainForwardClock:
    """Wall time spent inside the main trajectory's model forwards, via forward hooks (the
    Lyapunov twin's window forwards, on its worker thread or not, are left out)."""

    def __init__(self, model) -> None:
        self.main = threading.get_ident()
        self.total = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _counts(self) -> bool:
        return threading.get_ident() == self.main and not in_twin_forward()

    def _pre(self, module, args) -> None:
        if self._counts():
            self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        if self._counts():
            self.total += time.perf_counter() - self._start


def bootstrap_median(values: list[float], rounds: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values`` (fixed seed)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds) - 1]


def speed(args) -> list[tuple]:
    tok = create_default_tokenizer()
    torch.manual_seed(0)
    base = small_config()
    model = ResoLLMModel(base).eval()
    clock = MainForwardClock(model)
    ids = tok.encode(PROMPT)
    n = args.tokens

    def plain() -> tuple[float, float, float]:
        clock.total = 0.0
        w, c = time.perf_counter(), time.process_time()
        out = model.generate([ids], max_new_tokens=n, temperature=0.8, seed=0)[0]
        wall = time.perf_counter() - w
        return len(out) / wall, len(out) / (time.process_time() - c), wall / clock.total

    def engine(cfg: ResoLLMConfig, cognition: bool):
        def run() -> tuple[float, float]:
            ResoLLMInference(model, tok, all_on(base))  # the session setup needs the components on
            if cognition:
                prepare_session(model, tok)
            else:
                model.reset_cognition()
            eng = ResoLLMInference(model, tok, cfg, temperature=0.8)
            clock.total = 0.0
            w, c = time.perf_counter(), time.process_time()
            r = eng.generate(PROMPT, max_length=n, seed=0, stop_at_eos=False)
            wall = time.perf_counter() - w
            return r.tokens_generated / wall, r.tokens_generated / (time.process_time() - c), wall / clock.total
        return run

    runs = {"plain generate (reference)": plain, "engine, all cognition off": engine(all_off(base), False),
            "engine, all on (defaults)": engine(all_on(base), True),
            "engine, all on, twin every 128 steps": engine(all_on(base, every=128), True),
            "engine, all on, twin reads every token": engine(all_on(base, every=8), True),
            "engine, all on but Lyapunov twin": engine(all_on(base, lyapunov=False), True),
            CONTROL: engine(all_off(base), False)}
    samples = {k: [] for k in runs}
    for f in runs.values():  # warm-up
        f()
    order = list(runs)
    for i in range(args.repeats):
        for k in order if i % 2 == 0 else order[::-1]:  # interleaved, alternating order
            samples[k].append(runs[k]())

    off = samples["engine, all cognition off"]

    def med(k: str, i: int) -> float:
        return statistics.median(s[i] for s in samples[k])

    def ratios(k: str, i: int) -> list[float]:
        """Each repeat's speed of ``k`` / the all-off run's speed of the same repeat, minus 1."""
        return [a[i] / b[i] - 1 for a, b in zip(samples[k], off)]

    def per_model_time(k: str) -> float:
        """Drift-free cost: median (wall / main-trajectory forward time) of k over that of all off,
        minus 1, as a change of speed (negative = slower)."""
        return statistics.median(b[2] for b in off) / med(k, 2) - 1

    rows = []
    for k in samples:
        r = ratios(k, 0)
        rows.append((k, med(k, 0), statistics.median(r), bootstrap_median(r), med(k, 1),
                     statistics.median(ratios(k, 1)), per_model_time(k)))
    return rows


def twin_anatomy(args) -> dict[str, float]:
    """Median ms of a batch-1 and a batch-2 decoding step and of a twin window forward (see the
    module docstring), taken in turns, and the largest |logit| difference between the batch-2
    step's first row and the batch-1 step."""
    torch.manual_seed(0)
    model = ResoLLMModel(small_config()).eval()  # built outside inference mode (its derived tables track versions)
    with torch.inference_mode():
        return _twin_anatomy(model, args.anatomy_steps)


def _twin_anatomy(model: ResoLLMModel, steps: int) -> dict[str, float]:
    W = StabilityConfig().lyapunov_window
    prompt = torch.randint(0, 250, (1, 64), generator=torch.Generator().manual_seed(1))
    caches = {}
    for B in (1, 2):
        caches[B] = model.new_cache(B, 64 + 8 * steps + 8)
        model(prompt.expand(B, -1).contiguous(), cache=caches[B])
    fork = caches[1].shared_view()  # the view the twin copies (caches[1] only grows after this)
    window = torch.randint(0, 250, (1, W), generator=torch.Generator().manual_seed(2))
    offsets = torch.zeros(1, W, model.config.dim)
    token = torch.tensor([[7]])
    gap = max(float((model(token, cache=caches[1]).logits[0] - model(token.expand(2, 1), cache=caches[2]).logits[0])
                    .abs().max()) for _ in range(4))
    runs = {"decode step, batch 1": lambda: model(token, cache=caches[1]),
            "decode step, batch 2 (lockstep twin)": lambda: model(token.expand(2, 1), cache=caches[2]),
            f"twin window forward ({W} tokens)": lambda: model(window, cache=fork.copy_prefix(),
                                                               input_offsets=offsets, last_only=True)}
    out: dict = _in_turns(runs, steps)
    out["overlap"] = _overlap(model, prompt, window, offsets, steps)
    out["gap"] = gap
    return out


def _in_turns(runs: dict[str, Callable[[], object]], rounds: int,
              before: Callable[[], None] | None = None) -> dict[str, float]:
    """Median ms of each of ``runs`` over ``rounds`` rounds, in alternating order (``before``
    runs ahead of each round, untimed)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds):
        if before is not None:
            before()
        for k in runs if i % 2 == 0 else reversed(list(runs)):
            t = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def _overlap(model: ResoLLMModel, prompt: torch.Tensor, window: torch.Tensor, offsets: torch.Tensor,
             steps: int) -> dict[str, float]:
    """Median ms of ``LAG`` decode steps alone and of the same steps while a twin window forward
    runs on a worker thread (what a generation does between starting a window and reading it),
    taken in turns with the window alone; the share of the window hidden behind the steps is
    ``(steps + window - both) / window``."""
    pool = ThreadPoolExecutor(1)
    token = torch.tensor([[7]])
    cache = fork = None

    def fresh() -> None:  # a new cache when the next round could overflow this one
        nonlocal cache, fork
        if cache is None or cache.length + 2 * LAG > cache.max_len:
            cache = model.new_cache(1, model.config.max_seq_len)
            model(prompt, cache=cache)
            fork = cache.shared_view()

    def decode() -> None:
        for _ in range(LAG):
            model(token, cache=cache)

    def twin() -> None:
        with torch.inference_mode():  # a thread-local mode: the worker sets its own, as the twin does
            model(window, cache=fork.copy_prefix(), input_offsets=offsets, last_only=True)

    def both() -> None:
        future = pool.submit(twin)
        decode()
        future.result()

    try:
        return _in_turns({f"{LAG} decode steps": decode, "twin window alone": twin,
                          f"{LAG} steps beside a window on the worker": both}, max(steps // 4, 4), before=fresh)
    finally:
        pool.shutdown()


def train_tiny(args, tok) -> ResoLLMModel:
    text = DATA.read_text()
    data = torch.tensor(tok.encode(text[: 400_000]), dtype=torch.long)
    torch.manual_seed(0)
    cfg = ResoLLMConfig(vocab_size=tok.vocab_size, dim=128, num_layers=2, num_heads=4, num_phases=4, max_seq_len=256)
    model = ResoLLMModel(cfg)
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=3e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    T, B = 64, 16
    model.train()
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.train_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    print(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.0f}s, final train loss {loss.item():.3f}")
    return model


def repetition(args) -> tuple[list[tuple[str, float, float, float]], float]:
    tok = create_default_tokenizer()
    model = train_tiny(args, tok)
    text = DATA.read_text()
    held_out = text[-60_000:]
    lines = [l for l in held_out.splitlines() if len(l) > 30][: args.prompts]
    real = statistics.mean(repeated_ngram_share(tok.encode(held_out[i * 997: i * 997 + args.gen_tokens]))
                           for i in range(20))
    fixed = StabilityConfig(enabled=True, auto_temperature_adjust=False, lyapunov=False)
    off = all_off(model.config)
    rows = []
    for temp in args.temperatures:
        settings = [("SR off", StochasticResonanceConfig(enabled=False)),
                    ("SR on (A=0.1, default)", StochasticResonanceConfig(enabled=True))]
        settings += [(f"SR on (A={a:g})", StochasticResonanceConfig(enabled=True, noise_amplitude=a))
                     for a in (1.0, 3.0)]
        for label, sr in settings:
            cfg = variant(off, stability=fixed, stochastic_resonance=sr)
            reps, lls, noisy = [], [], []
            for i, line in enumerate(lines):
                eng = ResoLLMInference(model, tok, cfg, temperature=temp)
                model.reset_cognition()
                r = eng.generate(line, max_length=args.gen_tokens, seed=i, stop_at_eos=False)
                reps.append(repeated_ngram_share(r.token_ids))
                noisy.append(r.noise_steps / max(1, r.tokens_generated))
                ids = torch.tensor([tok.encode(line) + r.token_ids])
                with torch.no_grad():
                    lp = model(ids).logits[0, :-1].float().log_softmax(-1)
                    tgt = ids[0, 1:]
                    ll = lp.gather(1, tgt[:, None])[-len(r.token_ids):].mean()
                lls.append(float(ll))
            rows.append((f"T={temp:g}  {label}", statistics.mean(reps), statistics.mean(noisy), statistics.mean(lls)))
    return rows, real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128, help="tokens per timed generation")
    ap.add_argument("--repeats", type=int, default=31, help="interleaved runs per configuration (median)")
    ap.add_argument("--anatomy-steps", type=int, default=200, help="timed rounds of the twin-cost rows")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=200)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.4])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared CPU)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.train_steps, args.prompts, args.gen_tokens = 32, 2, 30, 2, 60
        args.anatomy_steps = 10
    torch.set_num_threads(args.threads)

    with StealMeter() as steal:
        rows = speed(args)
    print(f"\nDecode speed, small preset (4 x 256), {args.tokens} new tokens, median of {args.repeats}, "
          f"{args.threads} thread(s); CPU steal while timing: {percent(steal.share)}")
    print(f"{'configuration':40s} {'wall tok/s':>10s} {'vs off':>8s} {'95% interval':>17s} {'CPU tok/s':>10s} "
          f"{'vs off':>8s} {'per model-s':>12s}")
    for name, wall, rel_wall, (lo, hi), cpu, rel_cpu, per_model in rows:
        print(f"{name:40s} {wall:10.1f} {rel_wall:+8.1%} {f'[{lo:+.1%}, {hi:+.1%}]':>17s} {cpu:10.1f} "
              f"{rel_cpu:+8.1%} {per_model:+12.1%}")

    control = next(r for r in rows if r[0] == CONTROL)
    print(f"The A/A control runs the all-off configuration again: its {control[2]:+.1%} wall "
          f"({control[6]:+.1%} per model-s) is this run's noise floor for the 'vs off' columns.")

    with StealMeter() as steal:
        anatomy = twin_anatomy(args)
    gap = anatomy.pop("gap")
    one = anatomy["decode step, batch 1"]
    print(f"\nThe twin's work in decode steps, small preset, 64-token prompt, median of {args.anatomy_steps} in "
          f"turns; CPU steal while timing: {percent(steal.share)}")
    print(f"{'operation':40s} {'ms':>8s} {'decode steps':>13s}")
    overlap = anatomy.pop("overlap")
    for name, ms in [*anatomy.items(), *overlap.items()]:
        print(f"{name:40s} {ms:8.3f} {ms / one:13.2f}")
    steps_ms, alone_ms, both_ms = overlap.values()
    hidden = (steps_ms + alone_ms - both_ms) / alone_ms
    print(f"A window on the worker thread beside {LAG} decode steps adds {both_ms - steps_ms:.2f} ms: "
          f"{hidden:.0%} of its forward is hidden behind the decoding (100%: free; 0%: no overlap; torch "
          f"threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}).")
    W = StabilityConfig().lyapunov_window
    second = anatomy["decode step, batch 2 (lockstep twin)"] - one
    print(f"A window read in lockstep as a second row would cost {W} x {second:.3f} = {W * second:.2f} ms against "
          f"{anatomy[f'twin window forward ({W} tokens)']:.2f} ms now; the batch-2 step's first row differs from "
          f"the batch-1 step by up to {gap:.1e} in the logits.")

    rep, real = repetition(args)
    print(f"\nStochastic resonance on a briefly trained model ({args.train_steps} steps), {args.prompts} prompts x "
          f"{args.gen_tokens} tokens, fixed temperature")
    print(f"{'setting':32s} {'repeated 4-grams':>17s} {'noisy steps':>12s} {'mean log-lik':>13s}")
    for name, r, noisy, ll in rep:
        print(f"{name:32s} {r:17.3f} {noisy:12.1%} {ll:13.3f}")
    print(f"{'real text (held-out windows)':32s} {real:17.3f}")


if __name__ == "__main__":
    main()
