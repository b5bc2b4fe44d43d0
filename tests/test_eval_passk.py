"""pass@k (Chen et al. 2021) against hand-computed values and the closed form 1 - C(n-c,k)/C(n,k)."""

from __future__ import annotations

from math import comb

import pytest
from hypothesis import given, strategies as st

from aquilachat.evaluation.passk import estimate_pass_at_k, mean_pass_at_k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),          # c/n
    (5, 2, 2, 0.7),          # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 0, 1, 0.0),          # nothing passes
    (5, 0, 5, 0.0),
    (5, 3, 3, 1.0),          # n - c = 2 < k = 3: every draw of 3 has a passing sample
    (5, 5, 1, 1.0),
    (10, 1, 10, 1.0),
    (10, 1, 1, 0.1),
    (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (200, 10, 100, 1 - comb(190, 100) / comb(200, 100)),
])
def test_hand_checked_cases(n, c, k, expected):
    assert estimate_pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_equals_closed_form(nck):
    n, c, k = nck
    closed = 1.0 - comb(n - c, k) / comb(n, k)  # comb(m, k) = 0 for m < k
    assert estimate_pass_at_k(n, c, k) == pytest.approx(closed, rel=1e-9, abs=1e-12)


def test_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not
    value = estimate_pass_at_k(1000, 3, 500)
    assert 0.0 < value <= 1.0
    assert value == pytest.approx(1 - (500 * 499 * 498) / (1000 * 999 * 998), rel=1e-9)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_invalid_arguments_raise(n, c, k):
    with pytest.raises(ValueError):
        estimate_pass_at_k(n, c, k)


def test_mean_over_problems_skips_k_above_n():
    counts = [(5, 2), (5, 0), (5, 5)]
    out = mean_pass_at_k(counts, [1, 2, 10])
    assert out["pass@1"] == pytest.approx((0.4 + 0.0 + 1.0) / 3)
    assert out["pass@2"] == pytest.approx((0.7 + 0.0 + 1.0) / 3)
    assert "pass@10" not in out
