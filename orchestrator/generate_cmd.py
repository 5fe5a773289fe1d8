"""``reso generate``: one prompt through a preset (random weights) or a checkpoint.

With ``--chat`` the prompt is wrapped in the chat template and generation stops at the end of
the reply (``<|end|>``) as well as at ``<|eos|>``, like ``ResoLLMInference`` in chat mode; the stop
token counts in ``tokens_generated`` and the scores but is not part of the text. Bad input (bad
checkpoint or preset, unusable device, a prompt plus ``-n`` beyond the model's context) prints one
line and exits 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer


def load_model_and_tokenizer(checkpoint: Optional[Path], preset: str, seed: int, device: str):
    """A model and tokenizer from a checkpoint directory, or a freshly initialised preset."""
    import torch

    from core_model.checkpoint import CheckpointError, load_checkpoint
    from core_model.config import PRESETS
    from core_model.model import ResoLLMModel
    from core_model.tokenizer import create_default_tokenizer
    from core_model.trainer import TrainError, resolve_device

    try:
        device = resolve_device(device)
    except TrainError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if checkpoint is not None:
        try:
            return load_checkpoint(checkpoint, device=device)
        except CheckpointError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    if preset not in PRESETS:
        typer.echo(f"error: unknown preset {preset!r}; choose one of {sorted(PRESETS)}", err=True)
        raise typer.Exit(2)
    torch.manual_seed(seed)
    tokenizer = create_default_tokenizer()
    model = ResoLLMModel(PRESETS[preset](vocab_size=tokenizer.vocab_size)).to(device).eval()
    return model, tokenizer


def _check_top_p(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value:g} is not in the range 0 < top-p <= 1.")
    return value


def _check_repetition_penalty(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"{value:g} is not > 0 (1 means no penalty).")
    return value


def top_p_option() -> Optional[float]:
    """The ``--top-p`` option of the commands that sample: a usage error outside (0, 1]."""
    return typer.Option(None, callback=_check_top_p,
                        help="Nucleus sampling: the smallest set of tokens whose probability reaches p (0 < p <= 1).")


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        prompt: str = typer.Argument(..., help="Text to continue."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint directory."),
        preset: str = typer.Option("small", help="Preset when no checkpoint is given: small, medium, large."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
        temperature: float = typer.Option(0.8, min=0.0, help="0 means greedy."),
        top_k: Optional[int] = typer.Option(None, min=1),
        top_p: Optional[float] = top_p_option(),
        repetition_penalty: float = typer.Option(1.0, callback=_check_repetition_penalty,
                                                 help="Penalise tokens already present (> 0; 1: none)."),
        seed: int = typer.Option(0),
        chat: bool = typer.Option(False, help="Wrap the prompt in the chat template."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    ) -> None:
        """Continue PROMPT and print the text with a few metrics."""
        import torch

        from core_model.fused import phase_kernel
        from core_model.kuramoto import global_order_parameter

        model, tokenizer = load_model_and_tokenizer(checkpoint, preset, seed, device)
        ids = (tokenizer.chat_prompt_ids(prompt) if chat else tokenizer.encode(prompt)) or [tokenizer.bos_id]
        stops = {tokenizer.eos_id, tokenizer.end_id} if chat else {tokenizer.eos_id}
        try:  # checks the arguments (the prompt and -n must fit in max_seq_len) before any work
            stream = model.generate_stream([ids], max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                           seed=seed)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        phase_kernel()  # load (or, once per machine, build) the fused decoding step before timing
        started = time.perf_counter()
        new: list[int] = []
        for (token,) in stream:
            new.append(token)
            if token in stops:
                break
        stream.close()
        elapsed = time.perf_counter() - started
        with torch.no_grad():
            # the last token's own logits score nothing; at the limit (prompt + -n = max_seq_len + 1
            # tokens) it is left out, and coherence / phase_order are those the last token was drawn from
            scored = ids + new if len(ids) + len(new) <= model.config.max_seq_len else ids + new[:-1]
            out = model(torch.tensor([scored], device=next(model.parameters()).device))
            logprobs = out.logits[0, len(ids) - 1:len(ids) - 1 + len(new)].float().log_softmax(-1)
            token_lp = logprobs.gather(1, torch.tensor(new, device=logprobs.device)[:, None]).squeeze(1)
        metrics = {
            "tokens_generated": len(new),
            "tokens_per_second": round(len(new) / elapsed, 1) if elapsed > 0 else None,
            "mean_logprob": round(float(token_lp.mean()), 4),
            "coherence": None if out.coherence is None else round(float(out.coherence[0, -1]), 4),
            "phase_order": None if out.phases is None else round(float(global_order_parameter(out.phases)[0]), 4),
            "parameters": model.num_parameters(),
        }
        completion = tokenizer.decode([t for t in new if t not in stops])
        if as_json:
            sys.stdout.write(json.dumps({"prompt": prompt, "text": completion, **metrics}) + "\n")
            return
        typer.echo(prompt + completion)
        typer.echo("  ".join(f"{k}={v}" for k, v in metrics.items()), err=True)
