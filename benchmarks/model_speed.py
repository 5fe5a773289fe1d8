"""Training and decoding speed of the full Reso-LLM network against the vanilla GPT of the same size.

Prints one table: training tokens/s (forward + backward + AdamW step) and cached decode tokens/s
for the full model and the vanilla setting, at the small preset and at nanoGPT's CPU size, plus
cached against uncached decoding, all measured in one run. The settings compared take turns at
a fine grain, so the drift of a shared machine's speed (20-30% over minutes here) hits them
alike: training steps alternate one by one, and decoding runs advance each setting's generation
(``generate_stream``) ``--chunk`` tokens at a time in rotating order. tok/s come from the median
step or generation time; a ratio is the median over the pairs of steps (training) or over the
runs (decoding) of the ratio measured back to back.

    python benchmarks/model_speed.py            # about 6-8 minutes on 2 CPU cores
    python benchmarks/model_speed.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

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


def train_step(model: ResoLLMModel, batch: int, seq: int) -> Callable[[], None]:
    """One training step (forward, backward, AdamW as the trainer runs it) on a fixed batch."""
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-4, foreach=True)  # as the trainer
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g)
    model.train()

    def step() -> None:
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def paired_steps(steps: dict[str, Callable[[], None]], pairs: int) -> dict[str, list[float]]:
    """Seconds per step of each setting, the settings taking turns step by step (the order
    alternating), so each pair of steps is measured back to back (~0.1 s apart)."""
    for f in steps.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for i in range(pairs):
        for k in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    return times


def decode_streams(streams: dict[str, Callable[[], Iterator]], chunk: int, runs: int) -> dict[str, list[float]]:
    """Seconds per whole generation of each setting: in every run the settings' generations
    advance ``chunk`` tokens at a time in turn (rotating order), each chunk timed on its own, so
    the settings of one run are measured over the same stretch of the machine's time."""
    totals: dict[str, list[float]] = {k: [] for k in streams}
    names = list(streams)
    for r in range(runs + 1):  # run 0 is a warm-up
        live = {k: streams[k]() for k in names}
        spent = dict.fromkeys(names, 0.0)
        turn = 0
        while live:
            rot = turn % len(names)
            for k in names[rot:] + names[:rot]:
                it = live.get(k)
                if it is None:
                    continue
                t = time.perf_counter()
                done = next(itertools.islice(it, chunk - 1, None), None) is None
                spent[k] += time.perf_counter() - t
                if done:
                    del live[k]
            turn += 1
        if r > 0:
            for k in names:
                totals[k].append(spent[k])
    return totals


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


def paired_ratio(times: dict[str, list[float]], fast: str, slow: str) -> float:
    """Median over pairs of slow/fast seconds, i.e. of the speed of ``fast`` relative to ``slow``
    measured back to back: steady when the machine's speed drifts, and a burst of noise moves
    the median by one sample at most."""
    return statistics.median(y / x for x, y in zip(times[fast], times[slow]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=48, help="training steps per setting, taken in turns")
    ap.add_argument("--runs", type=int, default=5, help="decoding runs, each setting generating in turns")
    ap.add_argument("--chunk", type=int, default=16, help="tokens a generation advances per turn")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of: {', '.join(SIZES)}")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few pairs, 1 run, 64 new tokens")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.runs, args.new_tokens = 4, 1, 64
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; training: {args.pairs} steps per setting taken in "
          f"turns; decoding: {args.runs} runs, generations advancing {args.chunk} tokens per turn\n")
    prompt = list(range(1, 17))

    rows = []
    for name in args.sizes.split(","):
        factory, batch, seq = SIZES[name]
        torch.manual_seed(0)
        models = {"full": ResoLLMModel(factory()), "vanilla": ResoLLMModel(factory(vanilla=True))}
        train = paired_steps({k: train_step(m, batch, seq) for k, m in models.items()}, args.pairs)

        def stream(m: ResoLLMModel, cached: bool) -> Callable[[], Iterator]:
            return lambda: m.generate_stream([prompt], max_new_tokens=args.new_tokens, temperature=0.0,
                                             use_cache=cached)

        decode = decode_streams({"full": stream(models["full"], True), "vanilla": stream(models["vanilla"], True),
                                 "full_uncached": stream(models["full"], False)}, args.chunk, args.runs)
        kernels = {k: kernels_per_decode_step(m) for k, m in models.items()}
        ratios = (paired_ratio(train, "full", "vanilla"), paired_ratio(decode, "full", "vanilla"),
                  paired_ratio(decode, "full", "full_uncached"))
        train_tps = {k: batch * seq / statistics.median(v) for k, v in train.items()}
        decode_tps = {k: args.new_tokens / statistics.median(v) for k, v in decode.items()}
        rows.append((name, models["full"].num_parameters(), models["vanilla"].num_parameters(), batch, seq,
                     train_tps, decode_tps, ratios, kernels))

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
    print("tok/s: from the median step (training) or generation (decoding) time; ratios: medians of the ratios "
          "of steps or runs measured back to back")
    print(f"decoding step path: {fused.status()} (core_model/fused.py; RESO_FUSED=0 for the eager path)")
    print("targets: full >= 0.90x vanilla (train and decode); cached >= 5x uncached at 256 new tokens")


if __name__ == "__main__":
    main()
