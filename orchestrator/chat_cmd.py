"""``reso chat``: the interactive session of the seed document on a checkpoint or a preset.

Reads messages and commands (``exit``, ``goal <description>``, ``status``, ``metrics``) from
stdin, one per line, so it can be driven through a pipe; answers on stdout, with a metrics line
after each answer unless ``--no-metrics``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .generate_cmd import load_model_and_tokenizer, top_p_option


def register(app: typer.Typer) -> None:
    @app.command()
    def chat(
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint directory."),
        preset: str = typer.Option("small", help="Preset when no checkpoint is given: small, medium, large."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Tokens per answer."),
        temperature: float = typer.Option(0.8, min=0.0, help="Starting temperature; 0 means greedy."),
        top_k: Optional[int] = typer.Option(None, min=1),
        top_p: Optional[float] = top_p_option(),
        seed: int = typer.Option(0, help="Seed of the weights (preset) and of sampling."),
        metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Print a metrics line after each answer."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    ) -> None:
        """Chat with a model; commands: exit, goal <description>, status, metrics."""
        from core_model.inference import ResoLLMInference

        model, tokenizer = load_model_and_tokenizer(checkpoint, preset, seed, device)
        engine = ResoLLMInference(model, tokenizer, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        engine.interactive_session(show_metrics=metrics, input_stream=sys.stdin, output_stream=sys.stdout,
                                   max_length=max_new_tokens)
