"""The perturbed twin behind the finite-time Lyapunov estimate: short windows, fresh perturbations.

Every ``E = lyapunov_every`` steps (the first window right after the prompt's prefill) the twin
forks the main trajectory's cache and reads the next ``W = lyapunov_window`` tokens
the main trajectory reads, in one cached forward, with ``eps * rms(E_sem) * xi`` added to the
first one's input embedding (``xi`` standard normal, fixed by the seed and the window's index;
``3 <= W``, at most ``E`` unless ``E < 3``; windows run back to back when ``E <= W``). The relative distances of
the two trajectories' final hidden states at the window's positions,

    d_j = |h'_j - h_j| / |h_j|,        j = 1 .. W,

give the window's local exponent, the least-squares slope of ``ln d_j`` over ``j = 2 .. W``
(position 1 carries the perturbation itself, not its dynamics):

    lambda = sum_j (j - jbar)(ln d_j - mean_j ln d) / sum_j (j - jbar)^2.

A fresh perturbation of size ``eps`` per window keeps ``d`` small, so no renormalisation is
needed, and the twin reads ``W`` of every ``E`` tokens: a quarter at the defaults, where a twin
following the whole generation read every token a second time (that second read was the largest
cost of inference-time cognition). The price: each window's perturbation has ``W`` steps to turn
towards the most unstable direction, so this is the local, finite-time growth rate over ``W``
steps, not the asymptotic largest exponent.

A window's work runs on a worker thread (one per process, shared by every twin) while the main
trajectory goes on decoding: copying the cache, the perturbation, the forward and the exponent.
The fork itself copies nothing: it keeps a view of the main cache as it was
(``ModelCache.shared_view``; the main trajectory only appends to its cache), which the worker
copies. The exponent is read ``min(LAG, E - W)`` steps after the window's work started (at once
when that is 0), or when the generation ends: always at the same step, however fast the worker
is (the main trajectory waits there if the worker is slower), so a seed gives the same tokens
and the same trace. The worker writes only the twin's own cache copy, and its FFN noise is off in
its thread only (``noise_suppressed``). A window during which stochastic-resonance noise was on
in the main trajectory gives no exponent (the twin does not replay the noise).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from ..config import StabilityConfig
from ..derived import derived
from ..feedforward import noise_suppressed
from .stability import PredictiveStability

LAG = 8  # steps between starting a window's forward on the worker thread and reading its exponent
_twin = threading.local()
_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _shared_worker() -> ThreadPoolExecutor:
    """The process's twin worker thread (started on first use, kept for later generations)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(1, thread_name_prefix="reso-lyapunov-twin")
        return _worker


def _forget_worker() -> None:
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()  # a forked child has the executor but not its thread


os.register_at_fork(after_in_child=_forget_worker)


def in_twin_forward() -> bool:
    """Whether the calling thread is inside a twin's window forward (for instrumentation: a
    benchmark that times the main trajectory's forwards leaves these out)."""
    return getattr(_twin, "on", False)


@dataclass
class _Window:
    future: Future  # the window's exponent (float)
    due: int  # the step count at which its exponent is read
    end: int  # the step count at which its last token was read (the exponent's position)
    noisy: bool  # SR noise was on in the main trajectory during the window


class _Done(Future):
    """A future already holding its result (a forward run in the calling thread)."""

    def __init__(self, value) -> None:
        super().__init__()
        self.set_result(value)


def window_exponent(twin: torch.Tensor, main: torch.Tensor) -> float:
    """Least-squares slope of ``ln d_j`` over positions ``2 .. W`` (module docstring); ``d`` below
    1e-12 counts as 1e-12, and a non-finite distance gives a non-finite slope."""
    d = ((twin - main).norm(dim=1) / main.norm(dim=1).clamp(min=1e-12)).cpu().numpy().astype(np.float64)
    y = np.log(np.maximum(d[1:], 1e-12))
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    with np.errstate(invalid="ignore"):  # inf - inf: the nan that marks divergence
        return float(np.dot(x, y - y.mean()) / np.dot(x, x))


class LyapunovTwin:
    def __init__(self, model, config: StabilityConfig, tracker: PredictiveStability, seed: int,
                 background: bool = True) -> None:
        self.model = model
        self.tracker = tracker
        self.seed = seed
        self.perturbation_size = config.perturbation
        self.length = max(3, min(config.lyapunov_window, config.lyapunov_every))  # W: a slope needs 2 points
        self.every = max(config.lyapunov_every, self.length)  # E
        self.lag = min(LAG, self.every - self.length)
        self.cache = None  # a view of the main cache as it was at the fork, while a window collects its tokens
        self.tokens: list[int] = []
        self.offsets: list[torch.Tensor | None] = []
        self.mains: list[torch.Tensor] = []
        self.noisy = False
        self.windows = 0
        self.steps = 0
        self.next_fork = 0
        self.running: _Window | None = None
        self.worker = _shared_worker() if background and self.lag > 0 else None

    def fork(self, cache) -> None:
        """Open a window on the main trajectory's (batch 1) cache as it is now: called after the
        prompt's prefill, and by ``step`` every ``E`` steps (the copy is made on the worker)."""
        self.cache = cache.shared_view()
        self.next_fork = self.steps + self.every

    def perturbation(self, window: int) -> torch.Tensor:
        """``eps * rms(E_sem) * xi`` for the first input position of window number ``window``:
        (1, 1, D), fixed by the seed and the window's index."""
        p = next(self.model.parameters())
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919 + 104_729 * window)
        xi = torch.randn(1, 1, self.model.config.dim, generator=gen).to(device=p.device, dtype=p.dtype)
        w = self.model.embed.semantic.weight
        rms = derived(self.model.embed, "_semantic_rms", (w,), lambda: w.detach().pow(2).mean().sqrt())
        return self.perturbation_size * float(rms) * xi

    def step(self, token: int, offset: torch.Tensor | None, main_cache, main_hidden: torch.Tensor, noise: bool) -> None:
        """The main trajectory just read ``token`` (with input ``offset`` (1, 1, D), under SR noise
        or not) and produced ``main_hidden`` (1, T, D), whose last row is the state compared."""
        self.steps += 1
        if self.running is not None and self.steps >= self.running.due:
            self._finish()
        if self.cache is not None:
            self.tokens.append(token)
            self.offsets.append(offset)
            self.mains.append(main_hidden[0, -1])
            self.noisy |= noise
            if len(self.tokens) == self.length:
                self._start()
        if self.steps == self.next_fork:
            self.fork(main_cache)

    def close(self, read: bool = True) -> None:
        """Read the running window's exponent (if ``read``; otherwise just wait for its work to
        end, so the model is free again); a window still collecting its tokens gives nothing;
        closing twice is harmless. The window counts as running until its work has ended: an
        interrupt (or the worker's error) while waiting leaves it so, and a later
        ``close(read=False)`` still waits for it."""
        self.cache = None
        if self.running is not None:
            if read:
                self._finish()
            else:
                wait([self.running.future])
                self.running = None

    def _start(self) -> None:
        # no window is running here: one is read (at its start + lag <= start + E - W, the next
        # fork) before the next one forks, let alone starts
        work = (self.cache, self.tokens, self.offsets, self.mains, self.windows)
        self.cache = None
        future = self.worker.submit(self._forward, *work) if self.worker is not None else _Done(self._forward(*work))
        self.running = _Window(future, self.steps + self.lag, self.steps, self.noisy)
        self.windows += 1
        self.tokens, self.offsets, self.mains, self.noisy = [], [], [], False
        if self.lag == 0:
            self._finish()

    def _forward(self, fork, tokens: list[int], offsets: list[torch.Tensor | None], mains: list[torch.Tensor],
                 window: int) -> float:
        """The twin reads ``tokens`` (with the main trajectory's input ``offsets``, the first one
        perturbed) on a copy of the ``fork`` view: the window's exponent against the main
        trajectory's final hidden states ``mains``. Runs on the worker thread when there is one."""
        _twin.on = True
        try:
            with torch.inference_mode(), noise_suppressed():
                device = mains[0].device
                pert = self.perturbation(window)
                zero = torch.zeros_like(pert)
                off = torch.cat([o if o is not None else zero for o in offsets], dim=1)  # (1, W, D), fresh
                off[:, :1] += pert
                ids = torch.tensor([tokens], device=device)
                out = self.model(ids, cache=fork.copy_prefix(), input_offsets=off, last_only=True)
                return window_exponent(out.hidden[0].float(), torch.stack(mains).float())
        finally:
            _twin.on = False

    def _finish(self) -> None:
        run = self.running
        # cleared only once the result is in: an interrupt (or the worker's error) while waiting
        # leaves the window running, so close(read=False) still waits for its forward to end
        exponent = run.future.result()
        self.running = None
        if not run.noisy:
            self.tracker.observe_exponent(exponent, run.end)
