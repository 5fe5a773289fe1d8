"""Training throughput: plain trainer vs Ray Train with 1 and 2 workers, and Ray Train's fixed cost.

One run prints one table. All configurations train the same model on the same packed data
(guanaco-llama2-1k from ../shared/data) for the same number of steps; tokens/s is measured inside
the training loop after ``--warmup-steps`` steps (global tokens: batch x block x workers per step).
"Overhead" is the wall time of ``TorchTrainer.fit()`` minus the time its training loop ran
(worker group start, process group, model build, data fetch, checkpoint upload, teardown).

    python benchmarks/train_scaling.py                 # defaults: dim 128, 2 layers, 80 steps
    python benchmarks/train_scaling.py --steps 80 --json

Run it on an otherwise idle machine: the workers compete with anything else for the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # the 2 s default blocks each report
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup-steps", type=int, default=10, help="a multiple of --log-interval")
    parser.add_argument("--log-interval", type=int, default=10, help="metrics row and Ray report every N steps")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.warmup_steps % args.log_interval or args.steps % args.log_interval:
        parser.error("--warmup-steps and --steps must be multiples of --log-interval")

    import ray
    import torch

    from core_model.config import ResoLLMConfig
    from core_model.data import prepare_data
    from core_model.model import ResoLLMModel
    from core_model.train_metrics import read_metrics
    from core_model.trainer import TrainConfig, Trainer
    from orchestrator.ray_train import RayTrainSettings, run_ray_training

    if not DATA.is_dir():
        sys.exit(f"shared data folder {DATA} is absent")
    data = prepare_data(str(DATA / "guanaco-llama2-1k"), block_size=args.block_size, eval_fraction=0)
    model_config = ResoLLMConfig(vocab_size=data.tokenizer.vocab_size, dim=args.dim, num_layers=args.layers,
                                 num_heads=args.heads, num_phases=4, max_seq_len=args.block_size)

    def train_config(out: Path) -> TrainConfig:
        return TrainConfig(max_steps=args.steps, batch_size=args.batch_size, warmup_steps=2,
                           log_interval=args.log_interval,
                           eval_interval=10**9, checkpoint_interval=10**9, out_dir=str(out), plot=False,
                           progress=False)

    def throughput(out: Path, workers: int) -> tuple[float, float]:
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        loop_s = rows[-1]["elapsed_s"]
        t0 = next(r["elapsed_s"] for r in rows if r["step"] == args.warmup_steps)
        steps = args.steps - args.warmup_steps
        tokens = steps * args.batch_size * args.block_size * workers
        return tokens / (loop_s - t0), loop_s

    load_before = os.getloadavg()[0]
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="train_scaling_"))
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = ResoLLMModel(model_config)
        out = tmp / f"plain_{threads}"
        Trainer(model, data.tokenizer, data.train, None, train_config(out)).fit()
        tps, loop_s = throughput(out, 1)
        results.append({"config": f"plain trainer, {threads} thread(s)", "workers": 1, "tokens_per_s": tps,
                        "loop_s": loop_s, "overhead_s": None})
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - started
    for workers in (1, 2):
        out = tmp / f"ray_{workers}"
        res = run_ray_training(model_config, train_config(out), data,
                               RayTrainSettings(workers=workers, cpus_per_worker=1, max_failures=0,
                                                report_interval=args.log_interval), out)
        tps, loop_s = throughput(out, workers)
        results.append({"config": f"Ray Train, {workers} worker(s) x 1 CPU", "workers": workers, "tokens_per_s": tps,
                        "loop_s": loop_s, "overhead_s": res.fit_seconds - loop_s, "fit_s": res.fit_seconds})
    ray.shutdown()

    one = next(r for r in results if r["config"].startswith("Ray Train, 1"))
    two = next(r for r in results if r["config"].startswith("Ray Train, 2"))
    efficiency = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    summary = {"model_parameters": ResoLLMModel(model_config).num_parameters(), "steps": args.steps,
               "batch_per_worker": args.batch_size, "block_size": args.block_size, "ray_init_s": ray_init_s,
               "scaling_efficiency_2_workers": efficiency, "cpus": os.cpu_count(), "results": results,
               "load_average_1min": [load_before, os.getloadavg()[0]]}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"model {summary['model_parameters'] / 1e6:.2f}M params, dim {args.dim}, {args.layers} layers, "
          f"block {args.block_size}, batch {args.batch_size}/worker, {args.steps} steps "
          f"({args.warmup_steps} warmup excluded), {os.cpu_count()} CPUs")
    print(f"{'configuration':<36} {'tokens/s':>10} {'loop s':>8} {'fit s':>7} {'overhead s':>11}")
    for r in results:
        fit = f"{r['fit_s']:.1f}" if "fit_s" in r else "-"
        over = f"{r['overhead_s']:.1f}" if r["overhead_s"] is not None else "-"
        print(f"{r['config']:<36} {r['tokens_per_s']:>10.0f} {r['loop_s']:>8.1f} {fit:>7} {over:>11}")
    print(f"scaling efficiency, 2 vs 1 Ray worker: {efficiency:.2f} "
          f"({two['tokens_per_s'] / one['tokens_per_s']:.2f}x throughput)")
    print(f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"(above {os.cpu_count()} means other processes competed for the CPUs)")
    print(f"fixed overhead of a Ray Train run: {one['overhead_s']:.1f} s (1 worker), {two['overhead_s']:.1f} s "
          f"(2 workers); ray.init {ray_init_s:.1f} s")


if __name__ == "__main__":
    main()
