"""The training loop (pure torch; Ray Train drives the same :class:`Trainer` on every worker).

- AdamW (multi-tensor on a CPU, fused on CUDA) with no weight decay on norms, biases and phase parameters
  (:meth:`ResoLLMModel.optimizer_param_groups`).
- Linear warmup then cosine decay to ``min_lr_ratio * lr``, computed from the real number of
  optimizer steps (``max_steps``, or ``epochs`` x steps per epoch of the packed data).
- Gradient clipping (``grad_clip <= 0``: none), gradient accumulation, bf16 autocast on CUDA.
- Periodic evaluation (loss, perplexity) on fixed batches of the evaluation data.
- Checkpoints (model + ``training_state.pt``) through a :class:`CheckpointSink`; a resumed run
  continues exactly: same batches (data order is a function of seed and step), same optimizer,
  scheduler and RNG states. A resume refuses other data or batch settings and other settings that
  shape the loss curve (:meth:`Trainer.resume_settings`: assistant-only, dropout, learning rate and
  schedule, weight decay, clipping); only the run's length may grow (more ``max_steps`` or
  ``epochs``: the cosine decay then stretches to the new total from the resumed step on).
- ``metrics.jsonl`` rows (one run's curve: a run from step 0 moves an older file to ``metrics.jsonl.1``,
  a resumed one drops the rows after its checkpoint), a Rich progress bar on a terminal,
  ``loss_curve.png`` at the end.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import CheckpointError
from .data import PackedData, batch_indices, eval_batches, steps_per_epoch
from .model import IGNORE_INDEX
from .train_metrics import MetricsLog, Progress, plot_loss_curve
from .train_state import (
    gather_rng_states,
    load_training_state,
    load_weights_into,
    restore_rng_state,
    save_training_checkpoint,
)


class TrainError(ValueError):
    """Training cannot start or resume (bad settings, incompatible checkpoint)."""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one run (``batch_size`` is per rank)."""

    max_steps: int | None = 200  # total optimizer steps; None: derived from ``epochs``
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm; <= 0: no clipping (the norm is still logged)
    eval_interval: int = 100
    eval_batches: int | None = 20  # per rank; None: the whole evaluation set
    log_interval: int = 10
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto (bf16 on CUDA), bf16, fp32
    out_dir: str = "runs/train"
    plot: bool = True
    progress: bool = True
    assistant_only: bool = False  # whether the data's loss mask keeps only assistant replies (checked on resume)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise TrainError("set max_steps or epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise TrainError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "log_interval", "eval_interval", "checkpoint_interval",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise TrainError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise TrainError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def total_steps(self, num_blocks: int, world_size: int = 1) -> int:
        """The real number of optimizer steps of this run on ``num_blocks`` packed blocks."""
        if self.max_steps is not None:
            return self.max_steps
        spe = steps_per_epoch(num_blocks, self.batch_size * self.grad_accum, world_size)
        return max(1, math.ceil(self.epochs * spe))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for 0-based ``step``: linear warmup, then cosine decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CheckpointSink(Protocol):
    """Where periodic metrics and checkpoints go (a local folder, or Ray Train)."""

    def report(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None] | None) -> None:
        """Called on every rank at the same steps; ``write(dir)`` fills a checkpoint dir (None: metrics only)."""


class LocalSink:
    """Checkpoints in ``<out_dir>/checkpoints/step_000123/``, keeping the newest ``keep``."""

    def __init__(self, out_dir: str | Path, keep: int = 2, is_main: bool = True) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep, self.is_main = keep, is_main

    def report(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None] | None) -> None:
        if write is None or not self.is_main:
            return
        final, tmp = self.root / f"step_{step:08d}", self.root / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint directory is complete or absent
        for old in sorted(self.root.glob("step_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class TrainSummary:
    step: int
    total_steps: int
    final_loss: float | None
    eval_loss: float | None
    eval_ppl: float | None
    tokens_per_s: float
    elapsed_s: float
    out_dir: str
    losses: list[tuple[int, float | None]]  # (step, loss) of every step run by this call (None: no trained token)


class LossOnly(torch.nn.Module):
    """Wraps the network so its forward returns only the loss.

    DDP with ``find_unused_parameters`` walks the autograd graph from the forward outputs; the full
    :class:`ModelOutput` also carries the last block's phases, whose parameters (e.g. the final
    Kuramoto coupling) never reach the loss and would then be waited for forever.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, targets).loss


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a device this machine has; TrainError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise TrainError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "meta":
        raise TrainError(f"device {name!r} holds no data (use auto, cpu, cuda or cuda:N)")
    if device.type != "cpu":
        try:
            torch.empty(0, device=device)  # the backend exists and the index is in range
        except (RuntimeError, AssertionError) as exc:
            reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
            raise TrainError(f"device {name!r} is not usable here: {reason}") from exc
    return device


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: PackedData, batch_size: int = 8, max_batches: int | None = None,
             device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
             autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, float | None]:
    """Token-weighted mean loss and perplexity over fixed batches (sharded and summed across ranks).

    The loss is the summed cross-entropy of every trained target divided by their number; batches
    without a trained target (all user text under an assistant-only mask) are skipped. When no
    batch has one, ``eval_loss`` and ``eval_ppl`` are None (``eval_tokens`` is 0).
    """
    was_training = model.training
    model.eval()
    total_loss, total_tokens, started = 0.0, 0, time.perf_counter()
    try:
        for idx in eval_batches(len(data), batch_size, max_batches, rank, world_size):
            x, y = data.batch(idx)
            n = int((y != IGNORE_INDEX).sum())
            if n == 0:
                continue
            x, y = x.to(device), y.to(device)
            with autocast() if autocast else contextlib.nullcontext():
                logits = model(x).logits
            total_loss += float(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum"))
            total_tokens += n
    finally:
        model.train(was_training)
    total_loss, total_tokens_f, elapsed = _all_reduce_sum([total_loss, float(total_tokens),
                                                           time.perf_counter() - started], torch.device(device))
    loss = total_loss / total_tokens_f if total_tokens_f > 0 else None
    return {"eval_loss": loss, "eval_ppl": None if loss is None else math.exp(min(loss, 50.0)),
            "eval_tokens": int(total_tokens_f),
            "eval_tokens_per_s": total_tokens_f / max(elapsed / max(world_size, 1), 1e-9)}


class Trainer:
    """Train ``model`` on packed data; the same object runs alone or as one DDP rank.

    ``ddp_model`` is the wrapped module to run forward/backward through (``model`` stays the bare
    network used for evaluation and checkpoints). Only rank 0 writes files.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, train_data: PackedData, eval_data: PackedData | None,
                 config: TrainConfig, *, rank: int = 0, world_size: int = 1, ddp_model: torch.nn.Module | None = None,
                 sink: CheckpointSink | None = None, on_step_end: Callable[[int], None] | None = None) -> None:
        config.validate()
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.net = ddp_model if ddp_model is not None else model
        self.device = next(model.parameters()).device
        self.out_dir = Path(config.out_dir)
        self.sink = sink if sink is not None else LocalSink(self.out_dir, config.keep_checkpoints, self.is_main)
        self.on_step_end = on_step_end
        self.total_steps = config.total_steps(len(train_data), world_size)
        self.micro_batch = config.batch_size
        steps_per_epoch(len(train_data), config.batch_size * config.grad_accum, world_size)  # enough data?
        self.optimizer = torch.optim.AdamW(model.optimizer_param_groups(config.weight_decay), lr=config.lr,
                                           betas=tuple(config.betas), fused=self.device.type == "cuda" or None,
                                           foreach=self.device.type != "cuda" or None)
        total, warmup, floor = self.total_steps, config.warmup_steps, config.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_factor(s, total, warmup, floor))
        self.step = 0
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl") if self.is_main else None
        use_bf16 = self.device.type == "cuda" and (config.precision == "bf16" or (
            config.precision == "auto" and torch.cuda.is_bf16_supported()))
        self._autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else None

    # --- data position ---------------------------------------------------------------
    def _global_batch_blocks(self) -> int:
        return self.config.batch_size * self.config.grad_accum

    def _micro_batches(self, step: int) -> list:
        idx = batch_indices(len(self.train_data), self._global_batch_blocks(), step, self.config.seed,
                            self.rank, self.world_size)
        return [idx[i:i + self.micro_batch] for i in range(0, idx.size, self.micro_batch)]

    def data_position(self) -> dict[str, Any]:
        spe = steps_per_epoch(len(self.train_data), self._global_batch_blocks(), self.world_size)
        return {"seed": self.config.seed, "step": self.step, "epoch": self.step // spe,
                "step_in_epoch": self.step % spe, "steps_per_epoch": spe, "world_size": self.world_size,
                "batch_size": self.config.batch_size, "grad_accum": self.config.grad_accum,
                "num_blocks": len(self.train_data), "block_size": self.train_data.block_size}

    # --- checkpoints -----------------------------------------------------------------
    def _writer(self) -> Callable[[Path], None]:
        rng = gather_rng_states()  # collective: every rank calls it

        def write(directory: Path) -> None:
            save_training_checkpoint(directory, self.model, self.tokenizer, optimizer=self.optimizer,
                                     scheduler=self.scheduler, step=self.step, data_position=self.data_position(),
                                     rng_states=rng, extra={"train_config": _plain(self.config.to_dict()),
                                                            "settings": self.resume_settings()})
        return write

    def resume_settings(self) -> dict[str, Any]:
        """The settings besides the data position that shape the loss curve, as stored in a checkpoint.

        A resume must match each of them, except ``total_steps``, which may grow (extending a run).
        """
        c = self.config
        return {"assistant_only": bool(c.assistant_only), "dropout": float(self.model.config.dropout),
                "lr": float(c.lr), "min_lr_ratio": float(c.min_lr_ratio), "warmup_steps": int(c.warmup_steps),
                "weight_decay": float(c.weight_decay), "betas": [float(b) for b in c.betas],
                "grad_clip": float(c.grad_clip), "total_steps": int(self.total_steps)}

    def resume(self, checkpoint_dir: str | Path) -> int:
        """Restore weights, optimizer, scheduler, step and RNG from a training checkpoint; returns the step."""
        state = load_training_state(checkpoint_dir)
        pos = state["data"]
        mine = self.data_position()
        for key in ("seed", "world_size", "batch_size", "grad_accum", "num_blocks", "block_size"):
            if pos.get(key) != mine[key]:
                raise TrainError(f"{checkpoint_dir}: cannot resume exactly, {key} was {pos.get(key)} and is now "
                                 f"{mine[key]} (resume with the same data and settings)")
        saved = (state.get("extra") or {}).get("settings") or {}  # absent in older checkpoints: not checked
        now = self.resume_settings()
        for key, value in saved.items():
            if key not in now:
                continue
            if key == "total_steps" and now[key] < value:
                raise TrainError(f"{checkpoint_dir}: the run was {value} steps long and would now be {now[key]} "
                                 "(a resumed run may be extended with more steps or epochs, not shortened)")
            if key != "total_steps" and now[key] != value:
                raise TrainError(f"{checkpoint_dir}: cannot resume exactly, {key} was {value} and is now {now[key]} "
                                 "(resume with the same settings; only the number of steps may grow)")
        load_weights_into(self.model, checkpoint_dir)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
            rngs = state["rng"]
            restore_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{checkpoint_dir}: unusable training state ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else 'malformed'})") from exc
        self.step = step
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)
            self.metrics.append({"step": self.step, "event": "resume", "from": str(checkpoint_dir)})
        return self.step

    # --- the loop --------------------------------------------------------------------
    def _train_step(self) -> tuple[float | None, float, float]:
        """One optimizer step; returns (loss, grad norm before clipping, learning rate used).

        The loss is the mean of the micro-batches' token means, over the micro-batches that hold a
        trained target (a micro-batch without one adds a zero loss and a zero gradient: the model's
        loss is 0 there). When none does, the gradient is zero, the optimizer still steps (the data
        position and schedule advance) and the loss is None.
        """
        self.net.train()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self.train_data.batch(idx) for idx in self._micro_batches(self.step)]
        trained = sum(1 for _, y in batches if bool((y != IGNORE_INDEX).any()))
        loss_sum = 0.0
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                with self._autocast() if self._autocast else contextlib.nullcontext():
                    out = self.net(x, y)  # every rank runs every backward: DDP syncs on the last one
                    loss = (out if isinstance(out, torch.Tensor) else out.loss) / max(trained, 1)
                loss.backward()
            loss_sum += float(loss.detach())
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf  # inf: measure, never clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return (loss_sum if trained else None), grad_norm, lr

    def run_eval(self) -> dict[str, float] | None:
        if self.eval_data is None:
            return None
        return evaluate(self.model, self.eval_data, self.config.batch_size, self.config.eval_batches, self.device,
                        self.rank, self.world_size, self._autocast)

    def fit(self, stop_at: int | None = None) -> TrainSummary:
        """Train until ``total_steps`` (or ``stop_at``, to simulate an interruption); returns a summary."""
        cfg = self.config
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.train_data.block_size * self.world_size
        progress = Progress(self.total_steps, self.step, enabled=self.is_main and cfg.progress)
        if self.metrics is not None and self.step == 0:
            self.metrics.rotate()  # e.g. a run killed before its first checkpoint, started again: a new curve
            self.metrics.append({"step": 0, "event": "start", "total_steps": self.total_steps,
                                 "world_size": self.world_size, "parameters": self.model.num_parameters()})
        losses: list[tuple[int, float | None]] = []
        window: list[float] = []
        last_eval: dict[str, float] | None = None
        started = window_start = time.perf_counter()
        first_step = window_step = self.step
        try:
            while self.step < end:
                loss, grad_norm, lr = self._train_step()
                losses.append((self.step, loss))
                if loss is not None:
                    window.append(loss)
                if self.on_step_end is not None:
                    self.on_step_end(self.step)
                is_log = self.step % cfg.log_interval == 0 or self.step == end
                is_eval = self.step % cfg.eval_interval == 0 or self.step == self.total_steps
                is_ckpt = self.step % cfg.checkpoint_interval == 0 or self.step == end
                row: dict[str, Any] | None = None
                if is_log or is_eval or is_ckpt:
                    now = time.perf_counter()
                    # the mean of the ranks' window means, over the ranks that trained on some token
                    loss_total, ranks = _all_reduce_sum([sum(window) / len(window) if window else 0.0,
                                                         1.0 if window else 0.0], self.device)
                    mean_loss = loss_total / ranks if ranks else None
                    row = {"step": self.step, "epoch": round(self.step / self.data_position()["steps_per_epoch"], 4),
                           "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": tokens_per_step * (self.step - window_step)
                           / max(now - window_start, 1e-9),
                           "elapsed_s": now - started}
                    window, window_start, window_step = [], now, self.step
                if is_eval and self.eval_data is not None:
                    last_eval = self.run_eval()
                    row.update(last_eval)
                if row is not None:
                    if self.metrics is not None:
                        self.metrics.append(_rounded(row))
                    self.sink.report(self.step, _rounded(row), self._writer() if is_ckpt else None)
                progress.update(self.step, "loss -" if loss is None else f"loss {loss:.3f}")
        finally:
            progress.close()
        elapsed = time.perf_counter() - started
        if self.is_main and cfg.plot and self.metrics is not None:
            plot_loss_curve(self.metrics.path, self.out_dir / "loss_curve.png")
        return TrainSummary(
            step=self.step, total_steps=self.total_steps,
            final_loss=next((loss for _, loss in reversed(losses) if loss is not None), None),
            eval_loss=None if last_eval is None else last_eval["eval_loss"],
            eval_ppl=None if last_eval is None else last_eval["eval_ppl"],
            tokens_per_s=tokens_per_step * (self.step - first_step) / max(elapsed, 1e-9),
            elapsed_s=elapsed, out_dir=str(self.out_dir), losses=losses)

    def export(self, directory: str | Path | None = None) -> Path:
        """Write the standard model checkpoint (``from_checkpoint`` loads it); rank 0 only."""
        directory = Path(directory) if directory is not None else self.out_dir / "final"
        return self.model.save(directory, self.tokenizer)


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


def _plain(value: Any) -> Any:
    """Config values as plain containers (tuples become lists) for ``weights_only`` loading."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
