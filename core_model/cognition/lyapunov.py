"""The perturbed twin trajectory behind the finite-time Lyapunov estimate.

After the prompt's prefill the twin takes a copy of the main trajectory's cache (a memory copy,
no second prefill). The main trajectory decodes alone (batch 1, no extra cost per step); every
``N`` steps the twin catches up on the ``N`` tokens the main trajectory produced, in one cached
forward, and the relative distance of the two final hidden states at the same position feeds
``PredictiveStability``. The first catch-up reads its tokens with ``eps * rms(E) * xi`` added to
their input embeddings (``xi`` standard normal, fixed by the seed): that is the perturbation, and
the distance it leaves is the reference ``d_0``. ``N`` starts at ``min(8, lyapunov_every)`` and
doubles after each catch-up up to ``lyapunov_every`` (default 64): the first exponent is known
after 8 + 16 + ``LAG`` = 28 steps, and a long generation pays one catch-up of 64 tokens per 64.

A catch-up runs on a worker thread while the main trajectory goes on decoding, and its distance
is read ``min(LAG, N - 1)`` steps after it started (at once when ``N`` is 1), or when the
generation ends: always at the same step, however fast the worker is (the main trajectory waits
there if the worker is slower), so a seed still gives the same tokens and the same trace. The
worker reads and writes only the twin's own cache, and its FFN noise is off in its thread only
(``noise_suppressed``); the main trajectory is not touched by it. Its Python still competes with
the main trajectory's for the interpreter lock.

When ``d`` has grown 10x past its first value, the twin's cache is pulled back towards the main
one (Benettin renormalisation ``c' <- c + s (c' - c)``, ``s = d_0 / d``; ``ln s`` is accounted
for). Stochastic-resonance noise is not replayed in the twin: an interval during which it was on
gives no exponent, only a new reference distance.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..cache import LayerCache
from ..config import StabilityConfig
from ..feedforward import noise_suppressed
from .stability import PredictiveStability

FIRST_INTERVAL = 8  # steps before the first catch-up; intervals then double up to lyapunov_every
LAG = 4  # steps between starting a catch-up on the worker thread and reading its distance


@dataclass
class _MainSnapshot:
    """The main trajectory's cache as it was when a catch-up started (what the twin is compared
    with and pulled towards): its length and its layers' tensors (k and v are only written
    further on; the running phase sums are replaced, not modified, at every step)."""
    length: int
    layers: list[LayerCache]


@dataclass
class _CatchUp:
    future: Future
    due: int  # the step count at which its distance is read
    steps: int  # tokens it covers
    noisy: bool  # SR noise was on in the main trajectory during its interval
    main_hidden: torch.Tensor  # (D,) the main trajectory's final hidden state at the same position
    main: _MainSnapshot


class _Done(Future):
    """A future already holding its result (a catch-up run in the calling thread)."""

    def __init__(self, value) -> None:
        super().__init__()
        self.set_result(value)


SEQUENCE_FIELDS = ("k", "v")  # LayerCache fields laid out (B, H, T_max, d): only the filled part is pulled


def _pull(main, twin, scale: float) -> None:
    """``twin <- main + scale (twin - main)`` for every floating tensor of every cached layer
    (k and v over the ``main.length`` filled positions, the running phase sums whole)."""
    L = main.length
    for lm, lt in zip(main.layers, twin.layers):
        for f in dataclasses.fields(lt):
            a, b = getattr(lm, f.name), getattr(lt, f.name)
            pairs = zip(a, b) if isinstance(b, tuple) else [(a, b)]
            for x, y in pairs:
                if not isinstance(y, torch.Tensor) or not (y.is_floating_point() or y.is_complex()):
                    continue
                if f.name in SEQUENCE_FIELDS:
                    y[:, :, :L] = x[:, :, :L] + scale * (y[:, :, :L] - x[:, :, :L])
                else:
                    y.copy_(x + scale * (y - x))


class LyapunovTwin:
    def __init__(self, model, config: StabilityConfig, tracker: PredictiveStability, seed: int,
                 background: bool = True) -> None:
        self.model = model
        self.config = config
        self.tracker = tracker
        self.seed = seed
        self.cache = None
        self.pending: list[int] = []
        self.offsets: list[torch.Tensor | None] = []
        self.noisy = False
        self.perturbed = False
        self.log_d0: float | None = None
        self.interval = min(FIRST_INTERVAL, config.lyapunov_every)  # steps until the next catch-up
        self.steps = 0
        self.running: _CatchUp | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="reso-lyapunov-twin") if background else None

    def fork(self, cache) -> None:
        """Start the twin from a copy of the main trajectory's prefilled (batch 1) cache."""
        self.cache = cache.select(torch.tensor([0], device=cache.layers[0].k.device))

    def perturbation(self, n: int) -> torch.Tensor:
        """``eps * rms(E) * xi`` for ``n`` input positions: (1, n, D), fixed by the seed."""
        p = next(self.model.parameters())
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919)
        xi = torch.randn(n, self.model.config.dim, generator=gen).to(device=p.device, dtype=p.dtype)
        eps = self.config.perturbation * float(self.model.embed.semantic.weight.detach().pow(2).mean().sqrt())
        return eps * xi[None]

    def step(self, token: int, offset: torch.Tensor | None, main_cache, main_hidden: torch.Tensor, noise: bool) -> None:
        """The main trajectory just read ``token`` (with input ``offset`` (1, 1, D), under SR noise
        or not) and produced ``main_hidden`` (1, T, D): the last row is the state compared; every
        ``N`` such tokens a catch-up starts, and ``LAG`` steps later its distance is read."""
        self.steps += 1
        if self.running is not None and self.steps >= self.running.due:
            self._finish_catch_up()
        self.pending.append(token)
        self.offsets.append(offset)
        self.noisy |= noise
        if len(self.pending) >= self.interval:
            if self.running is not None:  # an interval shorter than the lag
                self._finish_catch_up()
            self._start_catch_up(main_cache, main_hidden)
            self.interval = min(2 * self.interval, self.config.lyapunov_every)

    def close(self, read: bool = True) -> None:
        """Read the last catch-up's distance (if one is running and ``read``) and stop the
        worker thread; closing twice is harmless."""
        try:
            if self.running is not None and read:
                self._finish_catch_up()
        finally:
            self.running = None
            if self.worker is not None:
                self.worker.shutdown(wait=True)
                self.worker = None

    def _start_catch_up(self, main_cache, main_hidden: torch.Tensor) -> None:
        model = self.model
        device = main_hidden.device
        n = len(self.pending)
        ids = torch.tensor([self.pending], device=device)
        off = None
        if any(o is not None for o in self.offsets):
            zero = torch.zeros(1, 1, model.config.dim, device=device, dtype=main_hidden.dtype)
            off = torch.cat([o if o is not None else zero for o in self.offsets], dim=1)
        if not self.perturbed:  # the first catch-up carries the perturbation
            off = self.perturbation(n) if off is None else off + self.perturbation(n)
            self.perturbed = True
        main = _MainSnapshot(main_cache.length, [LayerCache(l.k, l.v, l.phase_sum) for l in main_cache.layers])
        lag = min(LAG, self.interval - 1)
        if self.worker is not None and lag > 0:
            future = self.worker.submit(self._forward, ids, off)
        else:
            future = _Done(self._forward(ids, off))
        self.running = _CatchUp(future, self.steps + lag, n, self.noisy, main_hidden[0, -1].float(), main)
        self.pending, self.offsets, self.noisy = [], [], False
        if lag == 0:
            self._finish_catch_up()

    def _forward(self, ids: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """The twin reads ``ids``: its final hidden state (D,). Runs on the worker thread."""
        with torch.inference_mode(), noise_suppressed():
            return self.model(ids, cache=self.cache, input_offsets=offsets, last_only=True).hidden[0, -1].float()

    def _finish_catch_up(self) -> None:
        run, self.running = self.running, None
        h, h0 = run.future.result(), run.main_hidden
        d = float((h - h0).norm() / h0.norm().clamp(min=1e-12))
        log_d = math.log(max(d, 1e-12)) if math.isfinite(d) else float("nan")
        if run.noisy:
            self.tracker.resync(log_d)
            return
        rescale = 0.0
        if self.log_d0 is None and math.isfinite(log_d):
            self.log_d0 = log_d
        elif self.log_d0 is not None and math.isfinite(log_d) and log_d - self.log_d0 > math.log(10.0):
            s = math.exp(self.log_d0 - log_d)
            with torch.inference_mode():
                _pull(run.main, self.cache, s)
            rescale = math.log(s)
        self.tracker.observe_distance(log_d, rescale, steps=run.steps)
