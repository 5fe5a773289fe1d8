"""Primes for token ids: token id ``i`` maps to the ``i``-th prime ``p_i`` (``p_0 = 2``).

Because ``log(p*q) = log p + log q``, phases built from ``log p`` add when primes multiply,
which is what makes concept composition (PRSC) an addition of phase vectors.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def sieve(limit: int) -> np.ndarray:
    """All primes ``<= limit`` by the sieve of Eratosthenes, as an int64 array."""
    if limit < 2:
        return np.zeros(0, dtype=np.int64)
    is_prime = np.ones(limit + 1, dtype=bool)
    is_prime[:2] = False
    for p in range(2, math.isqrt(limit) + 1):
        if is_prime[p]:
            is_prime[p * p :: p] = False
    return np.flatnonzero(is_prime).astype(np.int64)


def _upper_bound_nth_prime(n: int) -> int:
    """Rosser's bound: ``p_n < n (ln n + ln ln n)`` for ``n >= 6`` (1-indexed ``n``)."""
    if n < 6:
        return 15
    return int(n * (math.log(n) + math.log(math.log(n)))) + 1


@lru_cache(maxsize=8)
def first_primes(count: int) -> np.ndarray:
    """The first ``count`` primes (read-only int64 array), cached per count."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    primes = sieve(_upper_bound_nth_prime(max(count, 1)))[:count]
    if len(primes) != count:  # pragma: no cover - Rosser's bound guarantees enough primes
        raise RuntimeError(f"sieve produced {len(primes)} primes, needed {count}")
    primes.setflags(write=False)
    return primes


def primes_for_ids(token_ids: np.ndarray | list[int], vocab_size: int) -> np.ndarray:
    """Vectorised map token id -> prime for ids in ``[0, vocab_size)``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{ids.min()}, {ids.max()}]")
    return first_primes(vocab_size)[ids]


def log_primes(vocab_size: int) -> np.ndarray:
    """``ln p_i`` for every token id ``i < vocab_size`` (float64)."""
    return np.log(first_primes(vocab_size).astype(np.float64))
