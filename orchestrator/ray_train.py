"""Distributed training through Ray Train: a ``TorchTrainer`` running :class:`core_model.trainer.Trainer`.

The driver prepares the data once (tokenizer, packed token streams) and puts the arrays in the
Ray object store; each worker reads them zero-copy and trains on its own shard (block indices
``rank::world_size`` of each epoch's permutation). DDP comes from ``ray.train.torch.prepare_model``
(gloo on CPU, NCCL on GPU). Workers report metrics every ``log_interval`` steps and a checkpoint
(model + ``training_state.pt``) every ``checkpoint_interval`` steps; the loop loads
``ray.train.get_checkpoint()`` first, so after a worker failure (``FailureConfig.max_failures``)
the restarted group continues from the last checkpoint. Rerunning with the same output folder
continues the same run (Ray Train restores its checkpoint list from the storage folder).

Output folder layout (``RunConfig(storage_path=out.parent, name=out.name)``)::

    out/metrics.jsonl  out/loss_curve.png  out/step_00000100/  ...  out/final/  (standard checkpoint)
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core_model.config import ResoLLMConfig
from core_model.data import DataBundle
from core_model.trainer import TrainConfig

FAILURE_MARKER = ".injected_failure"


class RayTrainError(RuntimeError):
    """The Ray Train run failed or produced no checkpoint."""


@dataclass
class RayTrainSettings:
    """How to run on Ray: workers, resources, failure handling, where to write."""

    workers: int = 2
    use_gpu: bool = False
    address: str | None = None  # None: start/attach a local Ray; "auto" or "ray://host:10001" for a cluster
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None  # default: cpus_per_worker (Ray sets OMP_NUM_THREADS=1 otherwise)
    max_failures: int = 2
    report_interval: int = 50  # ray.train.report every N steps (metrics.jsonl still gets every log row)
    keep_checkpoints: int = 2
    find_unused_parameters: bool = True  # the last block's phase coupling never reaches the loss
    fail_at_step: int | None = None  # test hook: rank 1 exits after this step on the first attempt only

    def validate(self) -> None:
        if self.workers < 1:
            raise RayTrainError(f"workers must be >= 1, got {self.workers}")
        if self.report_interval < 1:
            raise RayTrainError(f"report_interval must be >= 1, got {self.report_interval}")
        if self.cpus_per_worker <= 0:
            raise RayTrainError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass
class RayTrainResult:
    out_dir: Path
    final_dir: Path
    checkpoint_dir: Path
    step: int
    metrics: dict[str, Any]
    fit_seconds: float
    resumes: int
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------
class RayReportSink:
    """Reports metrics (and, on checkpoint steps, rank 0's checkpoint) through ``ray.train.report``."""

    def __init__(self, rank: int, report_interval: int = 1) -> None:
        self.rank, self.report_interval = rank, max(1, report_interval)

    def report(self, step: int, metrics: dict[str, Any], write) -> None:
        """Called at every metrics row; reports on checkpoint steps and every ``report_interval`` steps.

        The decision depends on ``step`` only, so every rank calls ``ray.train.report`` equally often.
        """
        import ray.train

        if write is None:
            if step % self.report_interval == 0:
                ray.train.report(metrics)
            return
        name = f"step_{step:08d}"
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="reso_ckpt_") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker function: build model and data, resume if a checkpoint exists, train."""
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from tokenizers import Tokenizer

    from core_model.data import PackedData
    from core_model.model import ResoLLMModel
    from core_model.tokenizer import ResoTokenizer
    from core_model.trainer import LossOnly, Trainer

    torch.set_num_threads(int(cfg["torch_threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tokenizer = ResoTokenizer(Tokenizer.from_str(cfg["tokenizer_json"]))
    block = int(cfg["block_size"])
    train = PackedData(np.asarray(ray.get(cfg["train_tokens"])), np.asarray(ray.get(cfg["train_mask"])), block)
    evald = None
    if cfg["eval_tokens"] is not None:
        evald = PackedData(np.asarray(ray.get(cfg["eval_tokens"])), np.asarray(ray.get(cfg["eval_mask"])), block)

    train_config = TrainConfig(**cfg["train_config"])
    torch.manual_seed(train_config.seed)  # identical initial weights on every rank
    model = ResoLLMModel(ResoLLMConfig.from_dict(cfg["model_config"]))
    ddp = ray.train.torch.prepare_model(
        LossOnly(model), parallel_strategy_kwargs={"find_unused_parameters": bool(cfg["find_unused_parameters"])})
    bare = model  # prepare_model moved it (inside the wrapper) to this worker's device
    torch.manual_seed(train_config.seed + 1000 * rank)  # per-rank dropout streams

    run_dir = Path(cfg["run_dir"])
    fail_at = cfg.get("fail_at_step")

    def inject_failure(step: int) -> None:
        marker = run_dir / FAILURE_MARKER
        if fail_at is not None and step == fail_at and rank == min(1, world - 1) and not marker.exists():
            marker.write_text(f"rank {rank} exited after step {step} (test hook)\n")
            os._exit(1)

    trainer = Trainer(bare, tokenizer, train, evald, train_config, rank=rank, world_size=world, ddp_model=ddp,
                      sink=RayReportSink(rank, int(cfg["report_interval"])), on_step_end=inject_failure)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.resume(directory)
    trainer.fit()


# --------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------
def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to (or start) Ray unless this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    # Each ray.train.report can wait for the controller's next poll (2 s by default); a Ray started
    # here polls faster unless the user chose a value. A cluster takes the setting from `ray start`.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)


def existing_checkpoints(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("step_*") if p.is_dir())


def run_ray_training(model_config: ResoLLMConfig, train_config: TrainConfig, data: DataBundle,
                     settings: RayTrainSettings, out_dir: str | Path) -> RayTrainResult:
    """Run a ``TorchTrainer`` and export the final model to ``out_dir/final``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from core_model.train_metrics import read_metrics
    from core_model.train_state import export_model

    settings.validate()
    train_config.validate()
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray(settings.address)

    plain_config = dict(train_config.to_dict())
    plain_config.update(out_dir=str(out_dir), device="auto", progress=False)
    threads = settings.torch_threads or max(1, int(settings.cpus_per_worker))
    loop_config = {
        "model_config": model_config.to_dict(),
        "train_config": plain_config,
        "tokenizer_json": data.tokenizer.backend.to_str(),
        "block_size": data.train.block_size,
        "train_tokens": ray.put(data.train.tokens),
        "train_mask": ray.put(data.train.mask),
        "eval_tokens": None if data.eval is None else ray.put(data.eval.tokens),
        "eval_mask": None if data.eval is None else ray.put(data.eval.mask),
        "torch_threads": threads,
        "find_unused_parameters": settings.find_unused_parameters,
        "run_dir": str(out_dir),
        "report_interval": settings.report_interval,
        "fail_at_step": settings.fail_at_step,
    }
    resources = {"CPU": settings.cpus_per_worker}
    if settings.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=out_dir.name,
            storage_path=str(out_dir.parent),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors in several exception types; report them as ours
        raise RayTrainError(f"Ray Train run {out_dir} failed: {exc}") from exc
    fit_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RayTrainError(f"Ray Train run {out_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        final = export_model(ckpt, out_dir / "final")
        checkpoint_dir = Path(result.checkpoint.path)
    rows = read_metrics(out_dir / "metrics.jsonl")
    resumes = sum(1 for r in rows if r.get("event") == "resume")
    last_step = max((int(r["step"]) for r in rows if "loss" in r), default=0)
    return RayTrainResult(out_dir=out_dir, final_dir=final, checkpoint_dir=checkpoint_dir, step=last_step,
                          metrics=dict(result.metrics or {}), fit_seconds=fit_seconds, resumes=resumes)
