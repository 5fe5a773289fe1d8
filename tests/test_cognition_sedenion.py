"""Cayley-Dickson algebra: units square to -1, quaternions associative, octonions alternative but
not associative, sedenions have zero divisors, nothing beyond the reals commutes in general."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core_model.cognition import sedenion as S

finite = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False)


def elements(dim: int):
    return arrays(np.float64, (dim,), elements=finite)


@pytest.mark.parametrize("dim", [2, 4, 8, 16])
def test_imaginary_units_square_to_minus_one(dim):
    for i in range(1, dim):
        e = S.basis(i, dim)
        assert np.allclose(S.multiply(e, e), -S.basis(0, dim))


@pytest.mark.parametrize("dim", [1, 2, 4, 8, 16])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_norm_is_multiplicative_up_to_octonions_and_conjugate_gives_norm(dim, data):
    x, y = data.draw(elements(dim)), data.draw(elements(dim))
    xx = S.multiply(x, S.conjugate(x))
    assert np.allclose(xx[0], np.dot(x, x)) and np.allclose(xx[1:], 0, atol=1e-9)
    assert np.isclose(S.inner(x, y), np.dot(x, y))
    if dim <= 8:  # composition algebras
        assert np.isclose(S.norm(S.multiply(x, y)), S.norm(x) * S.norm(y), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(x=elements(4), y=elements(4), z=elements(4))
def test_quaternions_are_associative(x, y, z):
    assert np.allclose(S.associator(x, y, z), 0, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(x=elements(8), y=elements(8))
def test_octonions_are_alternative(x, y):
    assert np.allclose(S.associator(x, x, y), 0, atol=1e-7)
    assert np.allclose(S.associator(x, y, y), 0, atol=1e-7)
    assert np.allclose(S.associator(x, y, x), 0, atol=1e-7)  # flexible


def test_octonions_are_not_associative():
    e = lambda i: S.basis(i, 8)  # noqa: E731
    assert not np.allclose(S.associator(e(1), e(2), e(4)), 0)


def test_sedenions_are_not_alternative_but_power_associative():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=16), rng.normal(size=16)
    assert not np.allclose(S.associator(x, x, y), 0, atol=1e-6)
    assert np.allclose(S.multiply(S.multiply(x, x), x), S.multiply(x, S.multiply(x, x)))


def test_sedenions_have_zero_divisors():
    x, y = S.zero_divisor_pair()
    assert S.norm(x) > 0 and S.norm(y) > 0
    assert np.allclose(S.multiply(x, y), 0)
    a, b = S.search_zero_divisors()  # the search finds one independently of the stored pair
    assert np.allclose(S.multiply(a, b), 0) and S.norm(a) > 0 and S.norm(b) > 0


@pytest.mark.parametrize("dim", [2, 4, 8, 16])
def test_commutativity_only_for_reals(dim):
    commuting = [S.basis(0, dim)]
    for i in range(1, dim):
        for j in range(1, dim):
            if i != j:
                assert not np.allclose(S.commutator(S.basis(i, dim), S.basis(j, dim)), 0), (i, j)
    if dim == 2:  # complex numbers do commute
        return
    rng = np.random.default_rng(dim)
    x, y = rng.normal(size=dim), rng.normal(size=dim)
    assert not np.allclose(S.commutator(x, y), 0)
    assert np.allclose(S.commutator(commuting[0] * 3.0, y), 0)  # reals commute with everything


@settings(max_examples=40, deadline=None)
@given(x=elements(16))
def test_inverse_is_two_sided_where_defined(x):
    if S.norm(x) < 1e-3:
        return
    one = S.basis(0, 16)
    assert np.allclose(S.multiply(x, S.inverse(x)), one, atol=1e-8)
    assert np.allclose(S.multiply(S.inverse(x), x), one, atol=1e-8)


def test_errors_and_axes():
    with pytest.raises(ValueError):
        S.multiply(np.ones(3), np.ones(3))
    with pytest.raises(ZeroDivisionError):
        S.inverse(np.zeros(16))
    assert len(S.SEDENION_AXES) == 16 and S.SEDENION_AXES[0] == "coherence" and S.SEDENION_AXES[-1] == "transcendence"
    assert S.axis_vector({"truth": 2.0})[4] == 2.0


@settings(max_examples=60, deadline=None)
@given(x=elements(16), dim=st.sampled_from([4, 8, 16]))
def test_only_reals_commute_with_every_unit(x, dim):
    """The centre is the reals: an element with any imaginary part fails to commute with some
    imaginary unit (for quaternions and beyond), and a real one commutes with all of them."""
    x = x[:dim]
    fails = [i for i in range(1, dim) if np.abs(S.commutator(x, S.basis(i, dim))).max() > 1e-12]
    if not x[1:].any():
        assert fails == []
    elif np.abs(x[1:]).max() > 1e-6:
        assert fails, x
