"""Char-level tiny Shakespeare with nanoGPT's CPU configuration: vanilla against full, one run.

nanoGPT (karpathy/nanoGPT, config/train_shakespeare_char.py with its CPU overrides) trains
4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, learning-rate decay over 2000,
dropout 0, and reports a validation loss of about 1.88. This script trains our vanilla setting
and the full resonant model on the same 90/10 split with the same schedule (AdamW, lr 1e-3 ->
1e-4 cosine, warmup 100, beta2 0.99, weight decay 0.1, clip 1.0) and evaluates both on the same
200 fixed validation batches (a 20-batch estimate is noisy, about +-0.015). The runs advance
step by step in alternating order, each timed over its own steps, so a machine whose speed
drifts slows both alike and the time ratio stays meaningful.

    python benchmarks/shakespeare.py                 # about 5-8 minutes on 2 CPU cores
    python benchmarks/shakespeare.py --iters 200     # a smoke run
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from core_model.config import ResoLLMConfig
from core_model.model import ResoLLMModel

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def load(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    text = path.read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(data))
    return data[:n], data[n:], len(chars)


def batch(data: np.ndarray, block: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = rng.integers(0, len(data) - block - 1, size)
    x = torch.from_numpy(np.stack([data[i:i + block] for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block] for i in ix]))
    return x, y


def lr_at(it: int, args) -> float:
    if it < args.warmup:
        return args.lr * (it + 1) / (args.warmup + 1)
    if it > args.iters:
        return args.min_lr
    ratio = (it - args.warmup) / max(1, args.iters - args.warmup)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


@torch.no_grad()
def evaluate(model: ResoLLMModel, val: np.ndarray, args) -> float:
    model.eval()
    rng = np.random.default_rng(1234)  # the same 200 batches for every model
    losses = [model(*batch(val, args.block, args.batch, rng)).loss.item() for _ in range(args.eval_batches)]
    model.train()
    return float(np.mean(losses))


class Run:
    """One model's training run, advanced a step at a time so that several runs can be
    interleaved (each is timed over its own steps only; dropout is 0, so nothing random is shared
    and a run gives the same losses interleaved or alone)."""

    def __init__(self, name: str, config: ResoLLMConfig, args) -> None:
        torch.manual_seed(args.seed)
        self.name, self.args = name, args
        self.model = ResoLLMModel(config)
        self.opt = torch.optim.AdamW(self.model.optimizer_param_groups(0.1), lr=args.lr, betas=(0.9, 0.99),
                                     foreach=True)  # as the trainer on a CPU
        self.rng = np.random.default_rng(args.seed)
        self.model.train()
        self.train_s = 0.0

    def step(self, it: int, train_data: np.ndarray) -> None:
        args, model, opt = self.args, self.model, self.opt
        started = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args)
        x, y = batch(train_data, args.block, args.batch, self.rng)
        loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        self.train_s += time.perf_counter() - started
        if args.log_every and (it % args.log_every == 0 or it == args.iters - 1):
            print(f"  {self.name:<8} iter {it:>5}  train loss {loss.item():.4f}", flush=True)

    def result(self, val_data: np.ndarray) -> dict:
        args = self.args
        return {"name": self.name, "params": self.model.num_parameters(),
                "val_loss": evaluate(self.model, val_data, args), "train_s": self.train_s,
                "tokens_per_s": args.iters * args.batch * args.block / self.train_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--num-phases", type=int, default=4)
    ap.add_argument("--models", default="vanilla,full", help="comma list of: vanilla, full")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"tiny shakespeare not found at {args.data}; pass --data PATH")
    train_data, val_data, vocab = load(args.data)
    base = dict(vocab_size=vocab, dim=128, num_layers=4, num_heads=4, max_seq_len=args.block, dropout=0.0,
                num_phases=args.num_phases)
    configs = {"vanilla": ResoLLMConfig(vanilla=True, **base), "full": ResoLLMConfig(**base)}
    runs = [Run(n, configs[n], args) for n in args.models.split(",")]
    for it in range(args.iters):  # interleaved step by step, alternating order: drift hits both alike
        for run in runs if it % 2 == 0 else runs[::-1]:
            run.step(it, train_data)
    results = [run.result(val_data) for run in runs]
    print(f"\nchar-level tiny shakespeare, {args.iters} iters, batch {args.batch}, block {args.block}, "
          f"val loss on {args.eval_batches} fixed batches, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<10}{'params':>10}{'val loss':>10}{'train s':>10}{'tok/s':>10}")
    for r in results:
        print(f"{r['name']:<10}{r['params'] / 1e6:>9.3f}M{r['val_loss']:>10.4f}{r['train_s']:>10.1f}"
              f"{r['tokens_per_s']:>10.0f}")
    times = {r["name"]: r["train_s"] for r in results}
    if {"vanilla", "full"} <= times.keys():
        print(f"training speed, full / vanilla: {times['vanilla'] / times['full']:.3f}x (target >= 0.90x)")
    print("reference: nanoGPT reports val loss ~1.88 for this configuration (0.80M parameters)")


if __name__ == "__main__":
    main()
