"""The unbiased pass@k estimator of Chen et al. 2021, "Evaluating Large Language Models Trained on
Code" (arXiv:2107.03374, section 2.1 and figure 3).

With ``n`` samples of which ``c`` pass, the probability that at least one of ``k`` samples drawn
without replacement passes is ``1 - C(n-c, k) / C(n, k)``. The paper evaluates it as
``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms the huge binomial coefficients, and
returns 1 when ``n - c < k`` (every draw of ``k`` contains a passing sample).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["estimate_pass_at_k", "pass_at_k", "mean_pass_at_k"]


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with ``n`` samples, ``c`` of them correct.

    Raises:
        ValueError: ``n < 1``, ``c`` outside ``0..n``, or ``k`` outside ``1..n`` (pass@k is not
            defined with fewer than ``k`` samples).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in 0..n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> list[float]:
    """pass@k of each problem from ``(n, c)`` pairs (the paper's ``estimate_pass_at_k``)."""
    return [estimate_pass_at_k(n, c, k) for n, c in counts]


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` for each ``k`` that every problem has enough samples
    for (as human-eval and CodeGeeX report: a ``k`` above some problem's ``n`` is left out)."""
    out: dict[str, float] = {}
    if not counts:
        return out
    for k in ks:
        if all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = float(np.mean(pass_at_k(counts, k)))
    return out
