"""Few-row fp32 matrix products on the CPU through numpy's OpenBLAS.

torch's CPU wheels multiply with MKL. For a product with a few rows (the batch of a decode step)
and a large weight, MKL's sgemm on this project's AMD EPYC machine costs almost one pass over the
weight per row: for a 100008 x 96 output projection, 2.8 ms at 1 row, 11 ms at 4 rows, 17 ms at
16 rows (one thread). numpy's wheels carry OpenBLAS, whose kernels reuse each block of the weight
for all rows: 2.3 / 6.4 / 10.5 ms. The engine therefore sends the few-row products of its large
weights here (see :func:`aquilachat.model.linear_no_bias`).

OpenBLAS is limited to one thread, once, when the engine prepares a model (:func:`enable`): its
thread pool and torch's OpenMP pool both spin while they wait for work, and with both at two
threads on two cores a decode step took three times longer. Only numpy's own OpenBLAS
(``libscipy_openblas``) is limited and used; a torch built on OpenBLAS is left alone. Without numpy,
threadpoolctl or an OpenBLAS-backed numpy, :func:`enable` returns False and torch does every
product.

Results equal torch's up to summation order (~1e-6 relative in fp32).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["enable", "enabled", "matmul"]

log = logging.getLogger(__name__)

_state: dict = {}


def enable() -> bool:
    """Find numpy's OpenBLAS and limit it to one thread (idempotent); return whether products
    can go through it. Side effect: numpy's matrix products in this process run on one thread."""
    if "ok" not in _state:
        _state["ok"] = _enable()
    return _state["ok"]


def _enable() -> bool:
    try:
        import numpy  # noqa: F401  (loads its BLAS, so threadpoolctl can see it)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    try:
        pools = ThreadpoolController().select(internal_api="openblas", prefix="libscipy_openblas")
        if not pools.lib_controllers:
            return False
        _state["limits"] = pools.limit(limits=1)  # kept: the limit holds for the process
    except Exception as exc:  # an unexpected BLAS layout: stay on torch's products
        log.debug("numpy's OpenBLAS not usable: %s", exc)
        return False
    return True


def enabled() -> bool:
    """True once :func:`enable` succeeded."""
    return _state.get("ok", False)


def matmul(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``x [rows, in] @ wt [in, out]`` -> ``[rows, out]`` with OpenBLAS; fp32 CPU tensors, no
    autograd (the caller checks). ``wt`` should be contiguous (a column-major weight's ``.t()``)."""
    import numpy as np
    return torch.from_numpy(np.matmul(x.detach().numpy(), wt.detach().numpy()))
