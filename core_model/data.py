"""Training data: loading, chat-format normalisation, tokenisation, packing and batch order.

Pipeline::

    load_text_dataset(source)            hub id (default: the guanaco set) or local jsonl/parquet/text
      -> normalize_example(text)         '### Human:/### Assistant:', Llama-2 '<s>[INST] ... [/INST] ... </s>'
                                         or plain text -> the project's chat template
      -> tokenize_dataset(ds, tok)       ``datasets.map`` (batched, cached): input_ids + loss_mask
      -> pack_dataset(ds, block_size)    one token stream, EOS between examples, cut into blocks
      -> batch_indices(seed, epoch, step, rank, world)   data order as a pure function

The order of blocks depends only on ``(seed, epoch, step, rank, world_size)``, so a resumed run
needs nothing but its step counter to continue on exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .model import IGNORE_INDEX
from .tokenizer import BOS, EOS, ChatTurn, ResoTokenizer, train_bpe_tokenizer

DEFAULT_DATASET = "timdettmers/openassistant-guanaco"
LOCAL_EXAMPLE = "../shared/data/guanaco-llama2-1k"
TEXT_COLUMN = "text"
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
_PROBE_TIMEOUT_S = 2.5
_PIPELINE_VERSION = "1"  # bump when tokenisation output changes (invalidates the datasets cache)


class DatasetError(ValueError):
    """A data source cannot be read (missing file, unsupported format, no text column)."""


class DatasetUnavailable(DatasetError):
    """A hub data set cannot be reached (no network, offline mode); use a local ``--dataset PATH``."""


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
def is_hub_id(source: str) -> bool:
    """Whether ``source`` names a hub data set (``owner/name``) rather than a local path."""
    if Path(source).expanduser().exists():
        return False
    if source.startswith((".", "/", "~")) or "\\" in source:
        return False
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and Path(parts[1]).suffix.lower() not in _BUILDERS


def _unavailable(source: str, reason: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"cannot load the hub data set {source!r} (no local path of that name exists either): {reason}. "
        f"Without a network, train on local files "
        f"with --dataset PATH (a .jsonl, .parquet or .txt file or a folder of them), e.g. "
        f"--dataset {LOCAL_EXAMPLE} --eval-dataset ../shared/data/openassistant-guanaco"
    )


def hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """A quick probe of the Hugging Face endpoint: ``(reachable, reason)``.

    Honours ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` (no probe at all) and ``HF_ENDPOINT``.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False, f"{var} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port} is unreachable ({exc.__class__.__name__}: {exc})"


def _local_files(path: Path) -> tuple[str, list[str]]:
    """The ``datasets`` builder name and the data files of a local file or folder."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS
                       and not p.name.startswith(".") and p.name.lower() != "readme.md")
        if not files:
            raise DatasetError(f"{path}: no .jsonl, .json, .parquet or .txt files in this folder")
    builders = {_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        raise DatasetError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .txt)")
    if len(builders) > 1:
        raise DatasetError(f"{path}: mixes file types {sorted(builders)}; point at one kind of file")
    return builders.pop(), [str(p) for p in files]


def load_text_dataset(source: str | Path, split: str = "train", cache_dir: str | None = None):
    """A ``datasets.Dataset`` with one ``text`` column from a hub id or a local file/folder.

    Local ``.txt`` files give one example per paragraph (blank-line separated). A hub id is probed
    first: without a network this raises :class:`DatasetUnavailable` within a few seconds.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        import datasets

        builder, files = _local_files(path)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
        except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
            raise DatasetError(f"{source}: cannot read as {builder} ({exc})") from exc
    elif is_hub_id(source):
        ok, reason = hub_reachable()
        if not ok:
            raise _unavailable(source, reason)
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
        except (ConnectionError, OSError) as exc:
            raise _unavailable(source, f"{exc.__class__.__name__}: {exc}") from exc
        except ValueError as exc:  # unknown split and similar
            raise DatasetError(f"{source}: {exc}") from exc
    else:
        raise DatasetError(f"{source}: no such file or folder (and not a hub id like {DEFAULT_DATASET})")
    if TEXT_COLUMN not in ds.column_names:
        raise DatasetError(f"{source}: needs a {TEXT_COLUMN!r} column, found {ds.column_names}")
    return ds.select_columns([TEXT_COLUMN])


# --------------------------------------------------------------------------------------
# chat-format normalisation
# --------------------------------------------------------------------------------------
_GUANACO_MARK = re.compile(r"###\s*(Human|Assistant)\s*:")
_LLAMA_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=(?:</s>)?\s*(?:<s>)?\s*\[INST\]|$)", re.S)
_LLAMA_SYS = re.compile(r"<<SYS>>(.*?)<</SYS>>", re.S)


def parse_guanaco(text: str) -> list[ChatTurn]:
    """Turns of a ``### Human: ... ### Assistant: ...`` conversation (text before the first marker is dropped)."""
    pieces = _GUANACO_MARK.split(text)
    turns = []
    for role, body in zip(pieces[1::2], pieces[2::2]):
        body = body.strip()
        if body:
            turns.append(ChatTurn("user" if role == "Human" else "assistant", body))
    return turns


def parse_llama2(text: str) -> list[ChatTurn]:
    """Turns of a Llama-2 chat string ``<s>[INST] (<<SYS>>...<</SYS>>) user [/INST] answer </s>...``."""
    turns: list[ChatTurn] = []
    for user, answer in _LLAMA_TURN.findall(text):
        sys_match = _LLAMA_SYS.search(user)
        if sys_match:
            system = sys_match.group(1).strip()
            if system:
                turns.append(ChatTurn("system", system))
            user = user[: sys_match.start()] + user[sys_match.end():]
        user = user.strip()
        answer = answer.replace("</s>", "").replace("<s>", "").strip()
        if user:
            turns.append(ChatTurn("user", user))
        if answer:
            turns.append(ChatTurn("assistant", answer))
    return turns


def detect_format(text: str) -> str:
    """``"guanaco"``, ``"llama2"`` or ``"plain"``."""
    if _GUANACO_MARK.search(text):
        return "guanaco"
    if "[INST]" in text and "[/INST]" in text:
        return "llama2"
    return "plain"


def parse_turns(text: str) -> list[ChatTurn] | None:
    """The chat turns of ``text``, or ``None`` for plain text."""
    fmt = detect_format(text)
    if fmt == "guanaco":
        return parse_guanaco(text)
    if fmt == "llama2":
        return parse_llama2(text)
    return None


def normalize_example(text: str, tokenizer: ResoTokenizer) -> str:
    """One example in the project's template: chat turns via ``format_chat``, plain text as ``<|bos|>text<|eos|>``."""
    turns = parse_turns(text)
    if turns:
        return tokenizer.format_chat(turns)
    return f"{BOS}{text.strip()}{EOS}"


# --------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------
def assistant_loss_mask(ids: Sequence[int], tokenizer: ResoTokenizer) -> list[int]:
    """1 for tokens the model should learn in assistant-only mode, else 0.

    Trainable: the text of assistant turns, the ``<|end|>`` closing an assistant turn and the
    ``<|eos|>`` right after it (so the model learns to stop). Examples without any role token
    (plain text) are trained on every token.
    """
    roles = tokenizer.role_ids
    if not any(i in roles.values() for i in ids):
        return [1] * len(ids)
    assistant, end, eos = roles["assistant"], tokenizer.end_id, tokenizer.eos_id
    mask, inside, after_assistant_end = [], False, False
    for i in ids:
        if i == assistant:
            inside, keep = True, False
        elif inside and i == end:
            inside, keep, after_assistant_end = False, True, True
            mask.append(1)
            continue
        elif i in roles.values():
            inside, keep = False, False
        elif i == eos:
            keep = after_assistant_end
        else:
            keep = inside
        after_assistant_end = False
        mask.append(int(keep))
    return mask


def tokenize_dataset(ds, tokenizer: ResoTokenizer, *, assistant_only: bool = False, num_proc: int | None = None,
                     batch_size: int = 256):
    """``ds`` with columns ``input_ids`` and ``loss_mask`` (``datasets.map``, batched and cached).

    The cache key combines the source fingerprint, the tokenizer's vocabulary hash and the options,
    so a second run on the same files reuses the cached Arrow result.
    """
    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [normalize_example(t or "", tokenizer) for t in batch[TEXT_COLUMN]]
        ids = tokenizer.encode_batch(texts)
        masks = [assistant_loss_mask(x, tokenizer) if assistant_only else [1] * len(x) for x in ids]
        return {"input_ids": ids, "loss_mask": masks}

    key = f"{ds._fingerprint}|{tokenizer.fingerprint()}|{assistant_only}|{_PIPELINE_VERSION}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return ds.map(encode, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                  new_fingerprint=fingerprint, num_proc=num_proc, desc="tokenizing")


def train_tokenizer_on(ds, vocab_size: int) -> ResoTokenizer:
    """A byte-level BPE trained on the normalised texts of ``ds`` (the training split)."""
    def texts() -> Iterable[str]:
        for row in ds:
            turns = parse_turns(row[TEXT_COLUMN] or "")
            yield from ([t.text for t in turns] if turns else [row[TEXT_COLUMN] or ""])

    return train_bpe_tokenizer(texts(), vocab_size=vocab_size)


# --------------------------------------------------------------------------------------
# packing and batch order
# --------------------------------------------------------------------------------------
@dataclass
class PackedData:
    """One token stream cut into blocks; block ``i`` is ``tokens[i*B : i*B + B + 1]`` (inputs + shifted targets).

    ``mask`` marks trainable target tokens (all ones unless assistant-only). Consecutive blocks share
    one token, so no token of the stream is lost as a target.
    """

    tokens: np.ndarray  # int32 (N,)
    mask: np.ndarray  # bool (N,)
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise DatasetError(f"block_size must be >= 1, got {self.block_size}")
        if len(self) < 1:
            raise DatasetError(f"only {self.tokens.size} tokens: not enough for one block of {self.block_size}")

    def __len__(self) -> int:
        return max(0, (int(self.tokens.size) - 1) // self.block_size)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, block_size) for block indices; untrained targets are -100."""
        B = self.block_size
        rows = np.stack([self.tokens[i * B: i * B + B + 1] for i in indices]).astype(np.int64)
        keep = np.stack([self.mask[i * B + 1: i * B + B + 1] for i in indices])
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(np.where(keep, rows[:, 1:], IGNORE_INDEX))
        return x, y


def pack_dataset(tokenized, block_size: int) -> PackedData:
    """Concatenate the tokenized examples (each already ends with ``<|eos|>``) into one stream."""
    import pyarrow.compute as pc

    if tokenized._indices is not None:  # a select()/shuffle() view: materialise its row order
        tokenized = tokenized.flatten_indices()
    table = tokenized.data.table
    ids = pc.list_flatten(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int32)
    mask = pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False).astype(bool)
    return PackedData(ids, mask, block_size)


def steps_per_epoch(num_blocks: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over the blocks with ``world_size`` ranks of ``batch_size`` each."""
    per_rank = num_blocks // world_size
    if per_rank < batch_size:
        raise DatasetError(f"{num_blocks} blocks over {world_size} rank(s) is fewer than one batch of {batch_size}; "
                           "lower --batch-size or --block-size, or add data")
    return per_rank // batch_size


def batch_indices(num_blocks: int, batch_size: int, step: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> np.ndarray:
    """Block indices of global step ``step`` (0-based) on ``rank``: a pure function of its arguments.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; rank ``r`` takes every
    ``world_size``-th block of it, so the ranks' shards are disjoint.
    """
    spe = steps_per_epoch(num_blocks, batch_size, world_size)
    epoch, within = divmod(step, spe)
    order = np.random.default_rng([seed, epoch]).permutation(num_blocks)
    shard = order[rank::world_size][: spe * batch_size]
    return shard[within * batch_size:(within + 1) * batch_size]


def eval_batches(num_blocks: int, batch_size: int, max_batches: int | None, rank: int = 0,
                 world_size: int = 1) -> list[np.ndarray]:
    """Fixed evaluation batches (blocks in order, sharded by rank), at most ``max_batches`` per rank."""
    idx = np.arange(num_blocks)[rank::world_size]
    out = [idx[i:i + batch_size] for i in range(0, idx.size, batch_size)]
    return out if max_batches is None else out[:max_batches]


@dataclass
class DataBundle:
    """What a training run consumes: the tokenizer and packed train (and optional eval) data."""

    tokenizer: ResoTokenizer
    train: PackedData
    eval: PackedData | None
    description: dict


def prepare_data(
    dataset: str = DEFAULT_DATASET,
    eval_dataset: str | None = None,
    *,
    tokenizer: ResoTokenizer | None = None,
    block_size: int = 256,
    assistant_only: bool = False,
    bpe_vocab_size: int | None = None,
    eval_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | None = None,
) -> DataBundle:
    """Load, normalise, tokenize and pack the training (and evaluation) data.

    Evaluation data: ``eval_dataset`` when given; else the hub's ``test`` split for a hub id; else a
    held-out ``eval_fraction`` of the local training rows (seeded split); ``eval_fraction=0`` disables it.
    ``bpe_vocab_size`` trains a byte-level BPE on the training split instead of the byte tokenizer.
    """
    from .tokenizer import create_default_tokenizer

    train_ds = load_text_dataset(dataset, "train", cache_dir)
    eval_ds = None
    if eval_dataset is not None:
        eval_ds = load_text_dataset(eval_dataset, "test", cache_dir)
    elif is_hub_id(str(dataset)):
        eval_ds = load_text_dataset(dataset, "test", cache_dir)
    elif eval_fraction > 0 and len(train_ds) >= 20:
        parts = train_ds.train_test_split(test_size=eval_fraction, seed=seed)
        train_ds, eval_ds = parts["train"], parts["test"]
    if tokenizer is None:
        tokenizer = train_tokenizer_on(train_ds, bpe_vocab_size) if bpe_vocab_size else create_default_tokenizer()
    train = pack_dataset(tokenize_dataset(train_ds, tokenizer, assistant_only=assistant_only), block_size)
    evald = None
    if eval_ds is not None:
        evald = pack_dataset(tokenize_dataset(eval_ds, tokenizer, assistant_only=assistant_only), block_size)
    description = {"dataset": str(dataset), "eval_dataset": None if eval_dataset is None else str(eval_dataset),
                   "train_rows": len(train_ds), "eval_rows": 0 if eval_ds is None else len(eval_ds),
                   "train_tokens": train.num_tokens, "eval_tokens": 0 if evald is None else evald.num_tokens,
                   "block_size": block_size, "assistant_only": assistant_only,
                   "vocab_size": tokenizer.vocab_size}
    return DataBundle(tokenizer, train, evald, description)
