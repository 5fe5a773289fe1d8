"""Sampling and the decoding loop (KV cache with phases and Kuramoto running sums).

``generate`` (all at once) and ``generate_stream`` (one step at a time) take one prompt or a
batch (left-padded internally) and decode greedily (``temperature=0``) or by sampling with temperature, top-k, top-p and a repetition penalty,
from an explicit seed. ``use_cache=False`` recomputes the whole sequence every step (the
reference the cached path is tested against).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .cache import ModelCache


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode inside, then each module's mode as it was (a model in train
    mode with one block frozen in eval mode keeps it so); when no module is training, nothing
    is switched (each walk over the modules costs about 0.1-0.4 ms on this CPU)."""
    if not any(m.training for m in model.modules()):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive (multiply negative) logits of tokens already in ``history``."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    picked = logits.gather(1, history)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, history, picked)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask logits (B, V) outside the top-k and outside the top-p nucleus with -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sampling_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
                    temperature: float | None = None) -> torch.Tensor:
    """The logits (B, V) a step draws from: ``logits`` with the repetition penalty, divided by the
    temperature and masked (-inf) outside top-k and top-p; at temperature 0 (greedy) the
    penalised logits. ``temperature`` overrides ``params.temperature``."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    t = params.temperature if temperature is None else temperature
    if t == 0:
        return logits
    return filter_logits(logits / t, params.top_k, params.top_p)


def sample_from(final: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from ``sampling_logits``' output: the argmax at temperature 0."""
    if temperature == 0:
        return final.argmax(dim=-1)
    return torch.multinomial(final.softmax(-1), 1, generator=generator).squeeze(1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                history: torch.Tensor | None = None, temperature: float | None = None) -> torch.Tensor:
    """One token per row from logits (B, V). ``temperature`` overrides ``params.temperature``."""
    t = params.temperature if temperature is None else temperature
    return sample_from(sampling_logits(logits, params, history, t), t, generator)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths: ids (B, T) and attention mask (B, T), padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def generate(
    model,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = 0,
    use_cache: bool = True,
    eos_id: int | None = None,
    pad_id: int = 0,
    external_field: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns the new tokens of each prompt.

    A row stops after emitting ``eos_id`` (included in its output). ``seed=None`` means seed 0:
    generation is always repeatable. The longest prompt plus ``max_new_tokens - 1`` must fit in
    ``config.max_seq_len`` (checked before any work).
    """
    out: list[list[int]] = [[] for _ in range(_batch_size(input_ids))]
    for tokens in generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                  seed, use_cache, eos_id, pad_id, external_field):
        for row, token in enumerate(tokens):
            if token is not None:
                out[row].append(token)
    return out


def generate_stream(
    model,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = 0,
    use_cache: bool = True,
    eos_id: int | None = None,
    pad_id: int = 0,
    external_field: torch.Tensor | None = None,
) -> Iterator[list[int | None]]:
    """``generate`` one step at a time: an iterator that yields, after each decoding step, the
    token each prompt received (None for a row that has already finished). The arguments are
    checked here, before any work; the model is in eval mode until the iterator is exhausted
    or closed, and gradients are off only while it computes (not in the caller's code between
    steps). ``generate`` is this iterator, collected.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    device = next(model.parameters()).device
    if isinstance(input_ids, torch.Tensor):
        prompts = input_ids.tolist() if input_ids.dim() == 2 else [input_ids.tolist()]
    elif input_ids and isinstance(input_ids[0], int):
        prompts = [list(input_ids)]
    else:
        prompts = [list(p) for p in input_ids]
    ids, mask = left_pad(prompts, pad_id, device)
    T = ids.shape[1]
    limit = model.config.max_seq_len
    if T + max(max_new_tokens - 1, 0) > limit:
        raise ValueError(f"a prompt of {T} tokens plus {max_new_tokens} new tokens does not fit in max_seq_len "
                         f"{limit}: shorten the prompt or ask for at most {max(limit - T + 1, 0)} new tokens")
    return _decode(model, ids, mask, max_new_tokens, params, seed, use_cache, eos_id, pad_id, external_field)


def _batch_size(input_ids) -> int:
    if isinstance(input_ids, torch.Tensor):
        return input_ids.shape[0] if input_ids.dim() == 2 else 1
    return 1 if input_ids and isinstance(input_ids[0], int) else len(input_ids)


@torch.inference_mode()  # on a generator function: only while it runs, not between its steps
def _decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, params: SamplingParams,
            seed: int | None, use_cache: bool, eos_id: int | None, pad_id: int,
            external_field: torch.Tensor | None) -> Iterator[list[int | None]]:
    device = ids.device
    B, T = ids.shape
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    history = ids.clone()
    with eval_mode(model):
        if use_cache:
            cache: ModelCache = model.new_cache(B, T + max_new_tokens)
            logits = model(ids, attention_mask=mask, cache=cache, external_field=external_field, last_only=True).logits
        for step in range(max_new_tokens):
            if not use_cache:
                logits = model(history, attention_mask=mask, external_field=external_field, last_only=True).logits
            seen = None
            if params.repetition_penalty != 1.0:  # padding is no token a row produced: count its last real one instead
                seen = torch.where(mask.bool(), history, history[:, -1:])
            nxt = sample_next(logits[:, -1], params, generator, seen)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            # one copy each, not B
            yield [None if done else token for token, done in zip(nxt.tolist(), finished.tolist())]
            if eos_id is not None:
                finished |= nxt == eos_id
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            history = torch.cat([history, nxt[:, None]], dim=1)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            if use_cache:
                logits = model(nxt[:, None], attention_mask=mask[:, -1:], cache=cache,
                               external_field=external_field).logits
