"""``reso train`` and ``reso eval``.

``reso train`` runs the plain trainer in this process (``--workers 0``, the default) or a Ray
Train ``TorchTrainer`` with ``--workers N`` (``--address`` for a cluster, ``--use-gpu``). Both
write into ``--out``: ``metrics.jsonl``, ``loss_curve.png``, training checkpoints and ``final/``
(a standard checkpoint for ``reso generate --checkpoint`` / ``ResoLLMModel.from_checkpoint``).
``metrics.jsonl`` is one run's curve: a run that starts from step 0 moves an older one to
``metrics.jsonl.1``; ``--resume`` drops the rows after the checkpoint it continues from.
Bad input (unreachable hub, missing file, bad checkpoint, bad settings) prints one line and exits 2;
a refused ``--resume`` leaves ``--out`` (``run.json``, ``metrics.jsonl``) as it was.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

DEFAULT_DATASET = "timdettmers/openassistant-guanaco"  # core_model.data.DEFAULT_DATASET (not imported: keeps
# `reso --help` free of the torch import)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _quiet_datasets() -> None:
    """No datasets progress bars unless stderr is a terminal."""
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()


def build_model_config(preset: str, vocab_size: int, block_size: int, dim: Optional[int], layers: Optional[int],
                       heads: Optional[int], dropout: float):
    """A preset with the tokenizer's vocabulary and optional shape overrides."""
    from core_model.config import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset](vocab_size=vocab_size, dropout=dropout)
    changes: dict[str, Any] = {"max_seq_len": max(config.max_seq_len, block_size)}
    if dim is not None:
        changes["dim"] = dim
    if layers is not None:
        changes["num_layers"] = layers
    if heads is not None:
        changes["num_heads"] = heads
    return config.replace(**changes)


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        dataset: str = typer.Option(DEFAULT_DATASET, "--dataset", "-d",
                                    help="Hub id (needs a network) or a local .jsonl/.parquet/.txt file or folder."),
        eval_dataset: Optional[str] = typer.Option(None, "--eval-dataset",
                                                   help="Evaluation data; default: the hub's test split, or a "
                                                        "held-out 5% of local training rows."),
        out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Output folder."),
        preset: str = typer.Option("small", help="Model preset: small, medium, large."),
        dim: Optional[int] = typer.Option(None, min=8, help="Override the preset's width."),
        layers: Optional[int] = typer.Option(None, min=1, help="Override the preset's depth."),
        heads: Optional[int] = typer.Option(None, min=1, help="Override the preset's heads."),
        dropout: float = typer.Option(0.0, min=0.0, max=0.99),
        block_size: int = typer.Option(256, min=8, help="Tokens per packed training block."),
        steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps (default 1000 unless --epochs)."),
        epochs: Optional[float] = typer.Option(None, min=0.0, help="Train for this many passes instead of --steps."),
        batch_size: int = typer.Option(8, min=1, help="Blocks per step per worker."),
        grad_accum: int = typer.Option(1, min=1),
        lr: float = typer.Option(3e-4, min=0.0),
        min_lr_ratio: float = typer.Option(0.1, min=0.0, max=1.0),
        warmup: int = typer.Option(100, min=0, help="Warmup steps (linear), then cosine decay."),
        weight_decay: float = typer.Option(0.1, min=0.0),
        grad_clip: float = typer.Option(1.0, min=0.0, help="Clip the gradient norm to this (0: no clipping)."),
        eval_interval: int = typer.Option(100, min=1),
        eval_batches: int = typer.Option(20, min=0, help="Evaluation batches per worker (0: the whole set)."),
        log_interval: int = typer.Option(10, min=1, help="Metrics row (and Ray report) every N steps."),
        checkpoint_interval: int = typer.Option(200, min=1),
        assistant_only: bool = typer.Option(False, "--assistant-only/--all-tokens",
                                            help="Loss only on assistant replies."),
        bpe_vocab: int = typer.Option(0, min=0, help="Train a byte-level BPE of this size on the training split "
                                                     "(0: the byte tokenizer)."),
        seed: int = typer.Option(0),
        device: str = typer.Option("auto", help="auto, cpu, cuda, ... (plain trainer)."),
        precision: str = typer.Option("auto", help="auto (bf16 on CUDA), bf16, fp32."),
        resume: bool = typer.Option(False, "--resume",
                                    help="Continue from the latest checkpoint in --out, with the same data and "
                                         "settings (refused otherwise); a larger --steps/--epochs extends the run."),
        workers: int = typer.Option(0, min=0, help="Ray Train workers (0: train in this process)."),
        use_gpu: bool = typer.Option(False, "--use-gpu", help="One GPU per Ray Train worker."),
        address: Optional[str] = typer.Option(None, help="Ray cluster address (e.g. auto or ray://head:10001)."),
        cpus_per_worker: float = typer.Option(1.0, min=0.1),
        max_failures: int = typer.Option(2, min=-1, help="Worker-group restarts Ray Train may do."),
        report_interval: int = typer.Option(50, min=1, help="ray.train.report every N steps (Ray runs)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    ) -> None:
        """Train a Reso-LLM model on a chat / text data set (plain torch, or Ray Train with --workers)."""
        from core_model.checkpoint import CheckpointError
        from core_model.config import ConfigError
        from core_model.data import DatasetError, prepare_data
        from core_model.tokenizer import TokenizerError
        from core_model.train_state import latest_checkpoint
        from core_model.trainer import TrainConfig, TrainError, resolve_device

        _quiet_datasets()
        if workers == 0 and (use_gpu or address):
            raise _fail("--use-gpu and --address apply to Ray Train runs; add --workers N (N >= 1)")
        out = out.expanduser().resolve()
        existing = latest_checkpoint(out / "checkpoints") if workers == 0 else _ray_checkpoint(out)
        if existing is not None and not resume:
            raise _fail(f"{out} already holds checkpoints ({existing.name}); pass --resume to continue or choose "
                        "another --out")
        try:
            if workers == 0:
                resolve_device(device)  # an unknown or absent device: one line, before any data work
            previous = None
            if resume and existing is not None:  # keep the run's tokenizer (BPE included)
                from core_model.tokenizer import ResoTokenizer

                previous = ResoTokenizer.from_file(existing)
            data = prepare_data(dataset, eval_dataset, tokenizer=previous, block_size=block_size,
                                assistant_only=assistant_only, bpe_vocab_size=bpe_vocab or None, seed=seed)
            model_config = build_model_config(preset, data.tokenizer.vocab_size, block_size, dim, layers, heads,
                                              dropout)
            train_config = TrainConfig(
                max_steps=steps if steps is not None or epochs is not None else 1000, epochs=epochs,
                batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio,
                warmup_steps=warmup, weight_decay=weight_decay, grad_clip=grad_clip, eval_interval=eval_interval,
                eval_batches=eval_batches or None, log_interval=log_interval,
                checkpoint_interval=checkpoint_interval, seed=seed, device=device, precision=precision,
                out_dir=str(out), assistant_only=assistant_only)
            if epochs is not None and steps is None:
                train_config.max_steps = None
            train_config.validate()
        except (DatasetError, ConfigError, TrainError, CheckpointError, TokenizerError, ValueError) as exc:
            raise _fail(str(exc)) from exc

        trainer = None
        if workers == 0:  # a refused resume leaves run.json (and the rest of --out) as it was
            try:
                trainer = _plain_trainer(model_config, train_config, data, existing if resume else None)
            except (TrainError, CheckpointError) as exc:
                raise _fail(str(exc)) from exc
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({"argv": sys.argv, "data": data.description,
                                                  "model": model_config.to_dict(),
                                                  "train": train_config.to_dict(), "workers": workers}, indent=2))
        started = time.perf_counter()
        if trainer is not None:
            summary = _train_plain(trainer)
        else:
            summary = _train_ray(model_config, train_config, data, out, workers, use_gpu, address, cpus_per_worker,
                                 max_failures, report_interval)
        summary["wall_s"] = round(time.perf_counter() - started, 2)
        if as_json:
            sys.stdout.write(json.dumps(summary) + "\n")
        else:
            typer.echo("  ".join(f"{k}={v}" for k, v in summary.items()), err=True)

    @app.command("eval")
    def eval_cmd(
        checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Checkpoint directory."),
        dataset: str = typer.Option(DEFAULT_DATASET, "--dataset", "-d",
                                    help="Hub id (its test split) or a local file/folder."),
        block_size: Optional[int] = typer.Option(None, min=8, help="Default: min(256, model max_seq_len)."),
        batch_size: int = typer.Option(8, min=1),
        max_batches: int = typer.Option(0, min=0, help="Evaluate at most this many batches (0: all)."),
        assistant_only: bool = typer.Option(False, "--assistant-only/--all-tokens"),
        device: str = typer.Option("auto"),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    ) -> None:
        """Loss, perplexity and tokens/s of a checkpoint on a data set."""
        import torch

        from core_model.checkpoint import CheckpointError, load_checkpoint
        from core_model.data import DatasetError, load_text_dataset, pack_dataset, tokenize_dataset
        from core_model.trainer import TrainError, evaluate, resolve_device

        _quiet_datasets()
        try:
            dev = resolve_device(device)
            model, tokenizer = load_checkpoint(checkpoint, device=dev)
            block = block_size or min(256, model.config.max_seq_len)
            if block > model.config.max_seq_len:
                raise DatasetError(f"--block-size {block} exceeds the model's max_seq_len {model.config.max_seq_len}")
            ds = load_text_dataset(dataset, "test")
            packed = pack_dataset(tokenize_dataset(ds, tokenizer, assistant_only=assistant_only), block)
        except (CheckpointError, DatasetError, TrainError) as exc:
            raise _fail(str(exc)) from exc
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else None
        started = time.perf_counter()
        result = evaluate(model, packed, batch_size, max_batches or None, dev, autocast=autocast)
        elapsed = time.perf_counter() - started
        report = {"checkpoint": str(checkpoint), "dataset": dataset, "rows": len(ds), "block_size": block,
                  "loss": _r(result["eval_loss"]),
                  "perplexity": None if result["eval_ppl"] is None else round(result["eval_ppl"], 3),
                  "tokens": result["eval_tokens"], "tokens_per_s": round(result["eval_tokens"] / elapsed, 1),
                  "seconds": round(elapsed, 2)}
        if result["eval_loss"] is None:
            typer.echo("warning: the evaluated batches hold no trained token (with --assistant-only: no assistant "
                       "reply), so loss and perplexity are undefined (null)", err=True)
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            typer.echo("  ".join(f"{k}={v}" for k, v in report.items()))


def _ray_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in out.glob("step_*") if p.is_dir()) if out.is_dir() else []
    return found[-1] if found else None


def _plain_trainer(model_config, train_config, data, resume_from: Path | None):
    """The in-process :class:`Trainer`, resumed from ``resume_from`` when given (TrainError or
    CheckpointError when that checkpoint is unreadable or does not match these settings)."""
    import torch

    from core_model.model import ResoLLMModel
    from core_model.trainer import Trainer, resolve_device

    torch.manual_seed(train_config.seed)
    model = ResoLLMModel(model_config).to(resolve_device(train_config.device))
    trainer = Trainer(model, data.tokenizer, data.train, data.eval, train_config)
    if resume_from is not None:
        trainer.resume(resume_from)
    return trainer


def _train_plain(trainer) -> dict[str, Any]:
    summary = trainer.fit()
    model = trainer.model
    final = trainer.export()
    return {"final": str(final), "step": summary.step, "total_steps": summary.total_steps,
            "loss": _r(summary.final_loss), "eval_loss": _r(summary.eval_loss), "eval_ppl": _r(summary.eval_ppl),
            "tokens_per_s": round(summary.tokens_per_s, 1), "parameters": model.num_parameters()}


def _train_ray(model_config, train_config, data, out: Path, workers: int, use_gpu: bool, address: Optional[str],
               cpus_per_worker: float, max_failures: int, report_interval: int) -> dict[str, Any]:
    from .ray_train import RayTrainError, RayTrainSettings, run_ray_training

    settings = RayTrainSettings(workers=workers, use_gpu=use_gpu, address=address, cpus_per_worker=cpus_per_worker,
                                max_failures=max_failures, report_interval=report_interval)
    try:
        result = run_ray_training(model_config, train_config, data, settings, out)
    except RayTrainError as exc:
        raise _fail(str(exc).splitlines()[0], code=1) from exc
    m = result.metrics
    return {"final": str(result.final_dir), "step": result.step, "workers": workers, "resumes": result.resumes,
            "loss": _r(m.get("loss")), "eval_loss": _r(m.get("eval_loss")), "eval_ppl": _r(m.get("eval_ppl")),
            "fit_s": round(result.fit_seconds, 2)}


def _r(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(float(value), 5)
