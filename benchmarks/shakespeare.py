"""Char-level tiny Shakespeare with nanoGPT's CPU configuration: vanilla against full, one run.

nanoGPT (karpathy/nanoGPT, config/train_shakespeare_char.py with its CPU overrides) trains
4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, learning-rate decay over 2000,
dropout 0, and reports a validation loss of about 1.88. This script trains our vanilla setting
and the full resonant model on the same 90/10 split with the same schedule (AdamW, lr 1e-3 ->
1e-4 cosine, warmup 100, beta2 0.99, weight decay 0.1, clip 1.0) and evaluates both on the same
200 fixed validation batches (a 20-batch estimate is noisy, about +-0.015).

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


def train(name: str, config: ResoLLMConfig, train_data, val_data, args) -> dict:
    torch.manual_seed(args.seed)
    model = ResoLLMModel(config)
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=args.lr, betas=(0.9, 0.99))
    rng = np.random.default_rng(args.seed)
    model.train()
    started = time.perf_counter()
    for it in range(args.iters):
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args)
        x, y = batch(train_data, args.block, args.batch, rng)
        loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.log_every and (it % args.log_every == 0 or it == args.iters - 1):
            print(f"  {name:<8} iter {it:>5}  train loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - started
    val_loss = evaluate(model, val_data, args)
    return {"name": name, "params": model.num_parameters(), "val_loss": val_loss, "train_s": train_s,
            "tokens_per_s": args.iters * args.batch * args.block / train_s}


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
    results = [train(n, configs[n], train_data, val_data, args) for n in args.models.split(",")]
    print(f"\nchar-level tiny shakespeare, {args.iters} iters, batch {args.batch}, block {args.block}, "
          f"val loss on {args.eval_batches} fixed batches, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<10}{'params':>10}{'val loss':>10}{'train s':>10}{'tok/s':>10}")
    for r in results:
        print(f"{r['name']:<10}{r['params'] / 1e6:>9.3f}M{r['val_loss']:>10.4f}{r['train_s']:>10.1f}"
              f"{r['tokens_per_s']:>10.0f}")
    print("reference: nanoGPT reports val loss ~1.88 for this configuration (0.80M parameters)")


if __name__ == "__main__":
    main()
