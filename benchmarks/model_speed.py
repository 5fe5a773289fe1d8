"""Training and decoding speed of the full Reso-LLM network against the vanilla GPT of the same size.

Prints one table: training tokens/s (forward + backward + AdamW step) and cached decode tokens/s
for the full model and the vanilla setting, at the small preset and at nanoGPT's CPU size, plus
cached against uncached decoding. Interleaved repeats in one run: tok/s are medians, ratios the
median of per-repeat ratios.

    python benchmarks/model_speed.py            # about 6-8 minutes on 2 CPU cores
    python benchmarks/model_speed.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from core_model import fused
from core_model.config import ResoLLMConfig, medium_config, small_config
from core_model.tokenizer import DEFAULT_VOCAB_SIZE
from core_model.model import ResoLLMModel

SIZES: dict[str, tuple[Callable[..., ResoLLMConfig], int, int]] = {
    # name: (config factory, batch, sequence length)
    "small (4x256)": (lambda **kw: small_config(max_seq_len=512, **kw), 8, 256),
    "nanoGPT cpu (4x128)": (
        lambda **kw: ResoLLMConfig(vocab_size=DEFAULT_VOCAB_SIZE, dim=128, num_layers=4, num_heads=4, num_phases=4,
                                   max_seq_len=512, **kw), 12, 64),
    "medium (8x512)": (lambda **kw: medium_config(**kw), 4, 256),
}


def train_tokens_per_s(model: ResoLLMModel, batch: int, seq: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-4, foreach=True)  # as the trainer
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g)
    model.train()

    def step() -> None:
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq / (time.perf_counter() - t)


def decode_tokens_per_s(model: ResoLLMModel, new_tokens: int, use_cache: bool) -> float:
    model.eval()
    prompt = list(range(1, 17))
    model.generate([prompt], max_new_tokens=4, temperature=0.0, use_cache=use_cache)  # warm-up
    t = time.perf_counter()
    out = model.generate([prompt], max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache)
    return len(out[0]) / (time.perf_counter() - t)


def kernels_per_decode_step(model: ResoLLMModel) -> int:
    """ATen operators dispatched for one cached decode step (batch 1): the per-token overhead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    model.eval()
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with Count():
            model(torch.tensor([[4]]), cache=cache, last_only=True)
    return Count.n


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Every function once per repeat, in alternating order (forward, then backward), so a
    drifting machine speed hits each setting alike; returns the samples per setting."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(repeats):
        for k in order if i % 2 == 0 else order[::-1]:
            runs[k].append(fns[k]())
    return runs


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in runs.items()}


def paired_ratio(runs: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repeats of a/b measured back to back: steadier than a ratio of medians when
    the machine's speed drifts between repeats."""
    return statistics.median(x / y for x, y in zip(runs[a], runs[b]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of: {', '.join(SIZES)}")
    ap.add_argument("--quick", action="store_true", help="1 repeat, few steps, 64 new tokens")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.train_steps, args.new_tokens = 1, 2, 64
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} interleaved repeats\n")

    rows = []
    for name in args.sizes.split(","):
        factory, batch, seq = SIZES[name]
        torch.manual_seed(0)
        models = {"full": ResoLLMModel(factory()), "vanilla": ResoLLMModel(factory(vanilla=True))}
        train = interleaved(
            {k: (lambda m=m: train_tokens_per_s(m, batch, seq, args.train_steps)) for k, m in models.items()},
            args.repeats)
        decode = interleaved(
            {
                "full": lambda: decode_tokens_per_s(models["full"], args.new_tokens, True),
                "vanilla": lambda: decode_tokens_per_s(models["vanilla"], args.new_tokens, True),
                "full_uncached": lambda: decode_tokens_per_s(models["full"], args.new_tokens, False),
            },
            args.repeats)
        kernels = {k: kernels_per_decode_step(m) for k, m in models.items()}
        ratios = (paired_ratio(train, "full", "vanilla"), paired_ratio(decode, "full", "vanilla"),
                  paired_ratio(decode, "full", "full_uncached"))
        rows.append((name, models["full"].num_parameters(), models["vanilla"].num_parameters(), batch, seq,
                     medians(train), medians(decode), ratios, kernels))

    header = (f"{'size':<22}{'params full/vanilla':>22}{'train tok/s full':>18}{'vanilla':>10}{'ratio':>8}"
              f"{'decode tok/s full':>19}{'vanilla':>10}{'ratio':>8}{'uncached':>10}{'cached/uncached':>17}"
              f"{'kernels/token full/vanilla':>28}")
    print(header)
    print("-" * len(header))
    for name, pf, pv, batch, seq, train, decode, (r_train, r_decode, r_cache), kernels in rows:
        kernel_pair = f"{kernels['full']}/{kernels['vanilla']}"
        print(f"{name:<22}{f'{pf / 1e6:.2f}M/{pv / 1e6:.2f}M':>22}{train['full']:>18.0f}{train['vanilla']:>10.0f}"
              f"{r_train:>8.2f}{decode['full']:>19.0f}{decode['vanilla']:>10.0f}"
              f"{r_decode:>8.2f}{decode['full_uncached']:>10.0f}{r_cache:>17.2f}{kernel_pair:>28}")
    print(f"\ntraining: batch x sequence per size as in the script; decode: batch 1, 16-token prompt, "
          f"{args.new_tokens} new tokens, greedy")
    print("tok/s: medians over the repeats; ratios: medians of the per-repeat ratios (measured back to back)")
    print(f"decoding step path: {fused.status()} (core_model/fused.py; RESO_FUSED=0 for the eager path)")
    print("targets: full >= 0.90x vanilla (train and decode); cached >= 5x uncached at 256 new tokens")


if __name__ == "__main__":
    main()
