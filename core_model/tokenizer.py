"""Tokenizers: byte-level by default (no download), byte-level BPE trained on a corpus as an option.

Both are one class, :class:`ResoTokenizer`, wrapping a Hugging Face ``tokenizers.Tokenizer`` and
saved as ``tokenizer.json``. The default tokenizer maps byte ``b`` to id ``b`` (0..255) and puts
the chat special tokens after the bytes. Token id ``i`` maps to the ``i``-th prime
(:meth:`ResoTokenizer.primes`), which the model's phase embedding is initialised from.

Chat template (one conversation)::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|><|eos|>
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .primes import primes_for_ids

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
DEFAULT_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class TokenizerError(ValueError):
    """A tokenizer file or argument is unusable."""


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "system" | "user" | "assistant"
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLE_TOKENS:
            raise TokenizerError(f"chat role must be one of {sorted(ROLE_TOKENS)}, got {self.role!r}")


class ResoTokenizer:
    """A byte-level (optionally BPE) tokenizer with the chat special tokens."""

    def __init__(self, backend: Tokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks the special tokens {missing}")
        self.backend = backend
        self.pad_id, self.bos_id, self.eos_id = (backend.token_to_id(t) for t in (PAD, BOS, EOS))
        self.end_id = backend.token_to_id(END)
        self.role_ids = {role: backend.token_to_id(tok) for role, tok in ROLE_TOKENS.items()}
        self.special_ids = frozenset(backend.token_to_id(t) for t in SPECIAL_TOKENS)
        self._literal_lock = threading.Lock()
        self._pieces: dict[int, str] = {}  # token id -> the token decoded on its own (decode_pieces)
        self._boundary_ids: frozenset[int] | None = None  # boundary_ids(), computed on first use

    # --- sizes and primes -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def primes(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The prime of each token id (id ``i`` -> ``i``-th prime)."""
        return primes_for_ids(token_ids, self.vocab_size)

    # --- encode / decode --------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token strings kept as plain text: for user input, so
        that typing ``<|system|>`` cannot forge a turn of the chat template."""
        with self._literal_lock:
            self.backend.encode_special_tokens = True
            try:
                return self.backend.encode(text, add_special_tokens=False).ids
            finally:
                self.backend.encode_special_tokens = False

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token decoded on its own; a token's piece is decoded once (one call into the
        backend for all new ones) and then kept."""
        table = self._pieces
        missing = sorted({int(i) for i in ids} - table.keys())
        if missing:
            table.update(zip(missing, self.backend.decode_batch([[i] for i in missing])))
        return [table[int(i)] for i in ids]

    def boundary_ids(self) -> frozenset[int]:
        """Ids of the tokens after which a word boundary lies: those whose piece is empty or does
        not end in a letter or digit (computed once per tokenizer)."""
        if self._boundary_ids is None:
            pieces = self.decode_pieces(range(self.vocab_size))
            self._boundary_ids = frozenset(i for i, s in enumerate(pieces) if not s or not s[-1].isalnum())
        return self._boundary_ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # --- chat template ----------------------------------------------------------------
    @staticmethod
    def format_turn(turn: ChatTurn) -> str:
        return f"{ROLE_TOKENS[turn.role]}{turn.text}{END}"

    def format_chat(self, turns: Sequence[ChatTurn], add_generation_prompt: bool = False) -> str:
        """A conversation in the project's chat template (see module docstring)."""
        body = "".join(self.format_turn(t) for t in turns)
        if add_generation_prompt:
            return f"{BOS}{body}{ASSISTANT}"
        return f"{BOS}{body}{EOS}"

    def chat_prompt(self, user_text: str, system: str | None = None) -> str:
        turns = ([ChatTurn("system", system)] if system else []) + [ChatTurn("user", user_text)]
        return self.format_chat(turns, add_generation_prompt=True)

    def encode_chat(self, turns: Sequence[ChatTurn], add_generation_prompt: bool = False) -> list[int]:
        """The ids of :meth:`format_chat`, with each turn's text encoded literally (see
        :meth:`encode_literal`): only the template itself produces special tokens."""
        ids = [self.bos_id]
        for turn in turns:
            ids += [self.role_ids[turn.role], *self.encode_literal(turn.text), self.end_id]
        ids.append(self.role_ids["assistant"] if add_generation_prompt else self.eos_id)
        return ids

    def chat_prompt_ids(self, user_text: str, system: str | None = None) -> list[int]:
        """Ids of a one-turn chat prompt ending in the assistant's role token."""
        turns = ([ChatTurn("system", system)] if system else []) + [ChatTurn("user", user_text)]
        return self.encode_chat(turns, add_generation_prompt=True)

    # --- persistence ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory or a file path)."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        self.backend.save(str(path))
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> "ResoTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer file at {path}")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        return cls(backend)

    def fingerprint(self) -> str:
        """A stable hash of the vocabulary, used to check that agents share one tokenizer."""
        import hashlib

        vocab = json.dumps(sorted(self.backend.get_vocab(with_added_tokens=True).items()))
        return hashlib.sha256(vocab.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        kind = "bpe" if self.vocab_size > DEFAULT_VOCAB_SIZE else "byte"
        return f"ResoTokenizer({kind}, vocab_size={self.vocab_size})"


def _byte_level_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(merges))
    backend.decoder = decoders.ByteLevel()
    return backend


def create_default_tokenizer() -> ResoTokenizer:
    """The byte-level tokenizer: id ``b`` is byte ``b``; the special tokens follow (no download)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel's alphabet maps each byte to a printable character; order ids by byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    if set(vocab) != set(alphabet):  # pragma: no cover - guards a tokenizers behaviour change
        raise TokenizerError("tokenizers' ByteLevel alphabet changed; cannot build the byte tokenizer")
    backend = _byte_level_backend(vocab, [])
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return ResoTokenizer(backend)


def train_bpe_tokenizer(
    texts: Iterable[str] | Iterator[str], vocab_size: int = 8192, min_frequency: int = 2
) -> ResoTokenizer:
    """Train a byte-level BPE on ``texts``; the 256 byte tokens and the specials are always kept."""
    if vocab_size <= DEFAULT_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size must exceed {DEFAULT_VOCAB_SIZE} for BPE, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return ResoTokenizer(backend)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ``ByteLevel`` uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
