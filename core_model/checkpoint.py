"""Checkpoint directories: ``config.json``, ``model.safetensors``, ``tokenizer.json``.

Loading never unpickles anything: weights come from safetensors, the config from JSON. A
checkpoint whose files, config, tokenizer or tensor shapes don't match is refused with a
:class:`CheckpointError` that says what differs.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ResoLLMConfig
from .tokenizer import ResoTokenizer, TokenizerError, create_default_tokenizer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or does not match the model it claims to hold."""


def save_checkpoint(model, directory: str | Path, tokenizer: ResoTokenizer | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or create_default_tokenizer()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size "
                              f"{model.config.vocab_size}")
    meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    # Tied weights are stored once; safetensors refuses shared storage.
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("head.weight", None)
    # Each file is written under a temporary name and renamed into place, the config last: an
    # interrupted save leaves whole files, and a config that does not match the weights beside it
    # is refused on loading (shape check), never half-read.
    _replace(directory / WEIGHTS_FILE,
             lambda p: save_file(state, str(p), metadata={"format_version": str(FORMAT_VERSION)}))
    _replace(directory / TOKENIZER_FILE, tokenizer.save)
    _replace(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return directory


def _replace(path: Path, write) -> None:
    """``write(tmp)`` a sibling temporary file, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")  # same suffix: writers look at it
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_config(directory: str | Path) -> ResoLLMConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: missing {CONFIG_FILE}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "config" not in meta:
        raise CheckpointError(f"{path}: unsupported checkpoint format (expected format_version {FORMAT_VERSION})")
    try:
        return ResoLLMConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from exc


def load_checkpoint(directory: str | Path, device: str | torch.device | None = None):
    """Returns ``(model, tokenizer)``; raises :class:`CheckpointError` on any mismatch."""
    from .model import ResoLLMModel

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: missing {name}")
    config = load_config(directory)
    try:
        tokenizer = ResoTokenizer.from_file(directory / TOKENIZER_FILE)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but config.vocab_size "
                              f"is {config.vocab_size}")
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unreadable safetensors file ({exc})") from exc
    with torch.device("meta"):  # shapes only: a hostile config.json allocates nothing before the check
        skeleton = ResoLLMModel(config)
    expected = {k: v for k, v in skeleton.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        raise CheckpointError(f"{directory}: weights do not match config.json: " + ", ".join(parts))
    model = ResoLLMModel(config)
    model.load_state_dict(state, strict=not config.tie_embeddings)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
