"""PRSC: concepts bound to prime states; composition multiplies primes, i.e. adds phases.

A concept bound to tokens ``i_1..i_m`` is the prime product ``P = p_{i_1} ... p_{i_m}``.
Its phase vector uses the embedding's log-prime frequencies ``w_k = phi^k`` (k < F):

    theta_k(P) = 2 pi frac(w_k ln P) = sum_j theta_k(p_{i_j})   (mod 2 pi)

so composing concepts (multiplying their primes) adds their phase vectors. The interference
coherence of concepts ``c_1..c_n`` is the mean over frequencies of their order parameter,

    C = (1/F) sum_k | (1/n) sum_c exp(1j theta_k(c)) |   in [0, 1]   (1 when all phases agree)

A concept feeds the network: at every position where a bound concept's token sequence ends
(one token for ``token_id=``), ``concept_proj([cos theta, sin theta])`` of the composition of the
concepts ending there is added to the input embedding (``api.ConceptInput``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import PHI
from ..primes import first_primes
from .errors import CognitionError


def prime_phases(primes: list[int], num_phases: int) -> np.ndarray:
    """``2 pi frac(phi^k ln prod(primes))`` computed as a sum of logs (float64), shape (F,)."""
    log_p = float(sum(math.log(p) for p in primes))
    freqs = PHI ** np.arange(num_phases, dtype=np.float64)
    return 2 * math.pi * np.mod(freqs * log_p, 1.0)


def interference_coherence(phases: list[np.ndarray]) -> float:
    """``C = mean_k | mean_c exp(1j theta_{c,k}) |`` in [0, 1]."""
    if not phases:
        raise ValueError("interference needs at least one concept")
    th = np.stack(phases)  # (n, F)
    z = np.exp(1j * th).mean(0)
    return float(np.clip(np.abs(z).mean(), 0.0, 1.0))


@dataclass
class ConceptBinding:
    name: str
    token_ids: list[int]
    primes: list[int]
    phases: list[float]  # (F,)
    coherence: float = 1.0  # interference coherence of its constituents (1 for a base concept)
    parts: list[str] = field(default_factory=list)  # names of composed concepts

    @property
    def prime(self) -> int:
        """The prime product ``P`` (exact integer)."""
        return math.prod(self.primes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConceptBinding":
        return cls(str(d["name"]), [int(v) for v in d["token_ids"]], [int(v) for v in d["primes"]],
                   [float(v) for v in d["phases"]], float(d["coherence"]), [str(v) for v in d["parts"]])


class ConceptStore:
    """Named bindings and the token -> concepts index the network's input offsets come from."""

    def __init__(self, vocab_size: int, num_phases: int, max_bindings: int = 1000,
                 coherence_threshold: float = 0.7) -> None:
        self.vocab_size = vocab_size
        self.num_phases = num_phases
        self.max_bindings = max_bindings
        self.coherence_threshold = coherence_threshold
        self.bindings: dict[str, ConceptBinding] = {}
        self.version = 0  # bumped on every change (the offset table is rebuilt lazily)

    def __len__(self) -> int:
        return len(self.bindings)

    def bind(self, name: str, token_ids: list[int]) -> ConceptBinding:
        if not name:
            raise CognitionError("a concept needs a non-empty name")
        self._check_token_ids(name, token_ids)
        if name not in self.bindings and len(self.bindings) >= self.max_bindings:
            raise CognitionError(f"PRSC holds max_bindings={self.max_bindings} concepts; unbind one first")
        primes = [int(p) for p in first_primes(self.vocab_size)[np.asarray(token_ids, dtype=np.int64)]]
        binding = ConceptBinding(name, [int(t) for t in token_ids], primes,
                                 prime_phases(primes, self.num_phases).tolist())
        self.bindings[name] = binding
        self.version += 1
        return binding

    def _check_token_ids(self, name: str, token_ids: list[int]) -> None:
        if not token_ids:
            raise CognitionError(f"concept {name!r}: give at least one token id")
        bad = [t for t in token_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise CognitionError(f"concept {name!r}: token ids {bad} outside [0, {self.vocab_size})")

    def unbind(self, name: str) -> None:
        self._get(name)
        del self.bindings[name]
        self.version += 1

    def _get(self, name: str) -> ConceptBinding:
        if name not in self.bindings:
            raise CognitionError(f"no concept named {name!r} (bound: {sorted(self.bindings)})")
        return self.bindings[name]

    def compose(self, *names: str) -> ConceptBinding:
        """The product concept: primes multiplied, phases added, with its interference coherence."""
        parts = [self._get(n) for n in names]
        if len(parts) < 2:
            raise CognitionError("composition needs at least two concepts")
        primes = [p for c in parts for p in c.primes]
        phases = prime_phases(primes, self.num_phases)
        coherence = interference_coherence([np.asarray(c.phases) for c in parts])
        return ConceptBinding("+".join(names), [t for c in parts for t in c.token_ids], primes,
                              phases.tolist(), coherence, list(names))

    def coherence(self, *names: str) -> float:
        return interference_coherence([np.asarray(self._get(n).phases) for n in names])

    def is_coherent(self, *names: str) -> bool:
        return self.coherence(*names) >= self.coherence_threshold

    def ending_at(self, context: list[int], end: int | None = None) -> list[str]:
        """Names of the concepts whose whole token sequence ends ``context[:end]`` (an occurrence)."""
        index = self._index()
        end = len(context) if end is None else end
        if end <= 0 or context[end - 1] not in index:
            return []
        return [name for name, seq in index[context[end - 1]]
                if len(seq) <= end and context[end - len(seq):end] == seq]

    def occurring_in(self, token_ids: list[int]) -> list[str]:
        """Names of the concepts whose token sequence occurs anywhere in ``token_ids``."""
        return sorted({n for end in range(1, len(token_ids) + 1) for n in self.ending_at(token_ids[:end])})

    def phases_of(self, names: list[str]) -> np.ndarray:
        """Phases of the composition of ``names`` (their primes multiplied)."""
        return prime_phases([p for n in names for p in self._get(n).primes], self.num_phases)

    def _index(self) -> dict[int, list[tuple[str, list[int]]]]:
        """last token -> [(name, token sequence)], rebuilt when the bindings change."""
        if getattr(self, "_index_version", None) != self.version:
            index: dict[int, list[tuple[str, list[int]]]] = {}
            for c in self.bindings.values():
                index.setdefault(c.token_ids[-1], []).append((c.name, c.token_ids))
            self._index_cache, self._index_version = index, self.version
        return self._index_cache

    def to_dict(self) -> dict[str, Any]:
        return {"bindings": [c.to_dict() for c in self.bindings.values()]}

    def load(self, data: dict[str, Any]) -> None:
        """Replace the bindings by those of ``to_dict`` output, checked like ``bind`` checks them."""
        bindings = {d["name"]: ConceptBinding.from_dict(d) for d in data["bindings"]}
        if len(bindings) > self.max_bindings:
            raise CognitionError(f"{len(bindings)} concepts, more than max_bindings={self.max_bindings}")
        for c in bindings.values():
            self._check_token_ids(c.name, c.token_ids)
            if len(c.phases) != self.num_phases:
                raise CognitionError(f"concept {c.name!r}: {len(c.phases)} phases, the model has {self.num_phases}")
        self.bindings = bindings
        self.version += 1
