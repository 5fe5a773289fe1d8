"""Cayley-Dickson algebras of dimension 1, 2, 4, 8 and 16 (reals ... sedenions), in numpy.

An element of the algebra of dimension ``2n`` is a pair ``(a, b)`` of elements of dimension
``n``. With the convention used here

    (a, b) * (c, d) = (a c - d* b,  d a + b c*)          conj((a, b)) = (a*, -b)

starting from the reals (where ``x* = x``). Every doubling loses a property: complex numbers
are not ordered, quaternions (4) not commutative, octonions (8) not associative (only
alternative), sedenions (16) not alternative and they have zero divisors. What stays:
``e_i^2 = -1`` for the imaginary units, ``x x* = |x|^2`` (so ``x^{-1} = x* / |x|^2`` for
``x != 0``), ``Re(x* y) = <x, y>`` and power-associativity.

The 16 sedenion axes carry names (the seed's semantic axes); the memory field stores states
on them.
"""

from __future__ import annotations

import numpy as np

SEDENION_AXES: tuple[str, ...] = (
    "coherence", "identity", "duality", "harmony",
    "truth", "consciousness", "beauty", "compassion",
    "intention", "wisdom", "creativity", "stability",
    "complexity", "connection", "presence", "transcendence",
)
VALID_DIMS = (1, 2, 4, 8, 16)


def _check_dim(x: np.ndarray) -> int:
    n = x.shape[-1]
    if n not in VALID_DIMS:
        raise ValueError(f"Cayley-Dickson elements have dimension 1, 2, 4, 8 or 16, got {n}")
    return n


def conjugate(x: np.ndarray) -> np.ndarray:
    """``x*``: negate every imaginary component (works for any batch shape ``(..., n)``)."""
    x = np.asarray(x, dtype=np.float64)
    _check_dim(x)
    out = -x.copy()
    out[..., 0] = x[..., 0]
    return out


def multiply(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cayley-Dickson product ``x * y`` of arrays ``(..., n)`` (broadcasting over the batch)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = _check_dim(x)
    if y.shape[-1] != n:
        raise ValueError(f"cannot multiply elements of dimension {n} and {y.shape[-1]}")
    return _mul(x, y)


def _mul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    if n == 1:
        return x * y
    h = n // 2
    a, b = x[..., :h], x[..., h:]
    c, d = y[..., :h], y[..., h:]
    left = _mul(a, c) - _mul(_conj(d), b)
    right = _mul(d, a) + _mul(b, _conj(c))
    return np.concatenate([left, right], axis=-1)


def _conj(x: np.ndarray) -> np.ndarray:
    out = -x
    out[..., 0] = x[..., 0]
    return out


def norm(x: np.ndarray) -> np.ndarray:
    """Euclidean norm ``|x| = sqrt(x x*)`` (the algebra's own norm), shape ``(...)``."""
    return np.linalg.norm(np.asarray(x, dtype=np.float64), axis=-1)


def inverse(x: np.ndarray) -> np.ndarray:
    """``x^{-1} = x* / |x|^2`` (two-sided inverse; raises for ``x = 0``)."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.sum(x * x, axis=-1, keepdims=True)
    if np.any(sq == 0):
        raise ZeroDivisionError("the zero element has no inverse")
    return conjugate(x) / sq


def inner(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``Re(x* y)``, which equals the Euclidean inner product ``<x, y>`` in every Cayley-Dickson algebra."""
    return multiply(conjugate(x), y)[..., 0]


def basis(i: int, dim: int = 16) -> np.ndarray:
    """The unit ``e_i`` of the algebra of dimension ``dim`` (``e_0 = 1``)."""
    if dim not in VALID_DIMS or not 0 <= i < dim:
        raise ValueError(f"no unit e_{i} in dimension {dim}")
    e = np.zeros(dim)
    e[i] = 1.0
    return e


def associator(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``(x y) z - x (y z)``: zero for all triples exactly up to the quaternions."""
    return multiply(multiply(x, y), z) - multiply(x, multiply(y, z))


def commutator(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x y - y x``."""
    return multiply(x, y) - multiply(y, x)


def zero_divisor_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two nonzero sedenions whose product is zero: ``(e_1 + e_10) (e_4 - e_15) = 0``.

    The pair is the first one :func:`search_zero_divisors` finds with this module's sign
    convention (other texts' conventions give other index pairs); the tests check both.
    """
    x = basis(1) + basis(10)
    y = basis(4) - basis(15)
    return x, y


def search_zero_divisors() -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive search over pairs ``(e_a + e_b, e_c +/- e_d)`` for a zero product (about 1 s)."""
    units = np.eye(16)
    for a in range(1, 16):
        for b in range(a + 1, 16):
            x = units[a] + units[b]
            for c in range(1, 16):
                for d in range(c + 1, 16):
                    for s in (1.0, -1.0):
                        y = units[c] + s * units[d]
                        if np.allclose(multiply(x, y), 0.0):
                            return x, y
    raise ArithmeticError("no zero divisor of the form (e_a + e_b)(e_c +/- e_d) found")  # pragma: no cover


def axis_vector(values: dict[str, float]) -> np.ndarray:
    """A sedenion from named axes (missing axes are 0); unknown names raise ``KeyError``."""
    out = np.zeros(16)
    for name, value in values.items():
        out[SEDENION_AXES.index(name)] = value
    return out
