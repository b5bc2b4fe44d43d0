"""Few-row products ``x [M, in] @ weight.T`` that read a row-major weight once at memory speed.

Why a kernel of our own: a decode step multiplies a few rows by every weight, so it is bound by
how fast the weight streams from memory. Measured on this project's 2-core AMD EPYC (Zen 4) with
``bench/cpu_kernels.py`` (docs/generation.md, "CPU decode backend"), torch's own products read
bfloat16 weights at well under the copy bandwidth at one row (oneDNN), and float32 at a fraction
of it in the checkpoint's row-major layout (MKL). This kernel streams each thread's contiguous
block of weight rows once for all input rows, accumulating in fp32:

* bfloat16 with AVX512_BF16 (``VDPBF16PS``), else widened to fp32 (AVX-512 or AVX2 FMA);
* float32 with AVX-512 or AVX2 FMA;
* a generic C++ loop on any other CPU;
* fused decode-step ops that replace several of torch's small ops each (:func:`rms_norm`,
  :func:`rotate`, :func:`decode_attend`: plain C++, the same at every instruction level; they
  save torch's per-op dispatch, which dominates a small model's decode step);
* int8 weights with one scale per output row (:func:`linear_int8`, for
  :class:`aquilachat.quantization.Int8Linear`): codes widened to fp32 in registers, inputs to fp32
  once per call, AVX-512 / AVX2 FMA / generic.

The instruction level follows torch's own dispatch (``torch.backends.cpu.get_cpu_capability()``,
which ``ATEN_CPU_CAPABILITY`` lowers), capped by what the CPU has. Threads: torch's intra-op pool
(``torch.set_num_threads``), each taking a contiguous range of output rows (the extension is built
with ``-fopenmp``, without which ``at::parallel_for`` runs serially).

The C++ source (``cpu_kernels.cpp``) is compiled on first use with ``torch.utils.cpp_extension``
(a C++ compiler and ninja), cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). When it cannot be built, or ``AQUILACHAT_CPU_KERNELS=0``,
:func:`load` returns None and :func:`linear` uses ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["MAX_ROWS", "decode_attend", "linear", "linear_int8", "load", "load_error", "level", "rms_norm", "rotate"]

log = logging.getLogger(__name__)

#: Most input rows the kernel takes (a decode step's batch, a step's vocabulary projection); more
#: rows go to torch's blocked products (oneDNN / MKL), which reuse each weight block for many
#: rows from cache. Each row's result is the same whatever the other rows, up to this many.
MAX_ROWS = 64

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_NAME = "aquilachat_cpu_kernels_v3"
_state: dict = {}

#: torch.backends.cpu.get_cpu_capability() -> the kernel's instruction level (0 generic C++,
#: 1 AVX2 + FMA, 2 AVX-512, 3 AVX-512 with AVX512_BF16; the CPU may cap it lower)
_LEVELS = {"DEFAULT": 0, "NO AVX": 0, "AVX2": 1, "AVX512": 3, "ZVECTOR": 0, "VSX": 0}


def load():
    """The compiled extension (built once per machine and cached), or None when
    ``AQUILACHAT_CPU_KERNELS=0`` or building failed (:func:`load_error` says why; logged once)."""
    if "ext" not in _state:
        _state["ext"], _state["error"] = _build()
        if _state["error"]:
            log.warning("CPU decode kernels not available, using torch's products: %s", _state["error"])
    return _state["ext"]


def load_error() -> str | None:
    """Why :func:`load` returned None (None when it did not, or was not called)."""
    return _state.get("error")


def level() -> int:
    """The instruction level the kernels run at here (see ``_LEVELS``); needs :func:`load`."""
    if "level" not in _state:
        ext = load()
        wanted = _LEVELS.get(torch.backends.cpu.get_cpu_capability(), 0)
        _state["level"] = min(wanted, ext.cpu_level()) if ext is not None else 0
    return _state["level"]


def _build():
    if os.environ.get("AQUILACHAT_CPU_KERNELS", "1") == "0":
        return None, "disabled by AQUILACHAT_CPU_KERNELS=0"
    if not _SOURCE.exists():
        return None, f"{_SOURCE} is missing"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load as load_extension
        build_dir = Path(_get_build_directory(_NAME, verbose=False))
        if not (build_dir / f"{_NAME}.so").exists():  # the first use on this machine: say why it waits
            log.warning("building the CPU decode kernels once for this machine (about a minute on 2 "
                        "cores; cached in %s; AQUILACHAT_CPU_KERNELS=0 skips them)", build_dir)
        # -fopenmp: at::parallel_for is a header template whose OpenMP body is a serial loop
        # without it (the products would run on one thread whatever torch.get_num_threads() says)
        ext = load_extension(name=_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: torch's products still work
        first = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {first[0] if first else ''}"
    return ext, None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, in] @ weight.T`` -> ``[M, out]`` in ``x``'s dtype, for ``weight [out, in]``.

    Takes the kernel for float32 / bfloat16 CPU tensors of one dtype with at most
    :data:`MAX_ROWS` rows, a contiguous weight and no autograd; anything else (and a machine
    without the kernel) goes to ``F.linear``. Results equal ``F.linear`` up to summation order
    (fp32 accumulation; bf16 results rounded once).
    """
    ext = load()
    if (ext is None or x.dim() != 2 or x.shape[0] > MAX_ROWS or x.dtype != weight.dtype
            or x.dtype not in (torch.float32, torch.bfloat16) or not weight.is_contiguous()
            or x.device.type != "cpu" or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight)
    return ext.linear(x.contiguous(), weight, level())


def linear_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x [M, in] @ q.T) * scales`` -> ``[M, out]`` in ``x``'s dtype, for int8 codes ``q [out, in]``
    and ``scales [out]`` (the weight-only int8 format of :mod:`aquilachat.quantization`).

    Takes the kernel for float32 / bfloat16 CPU input with at most :data:`MAX_ROWS` rows, a
    contiguous ``q`` and no autograd; anything else (and a machine without the kernel) goes to
    ``torch.ops.aten._weight_int8pack_mm`` (which wants ``scales`` in ``x``'s dtype and 64-byte
    aligned operands: the module's business), except bfloat16 input of a width that is not a
    multiple of 64, which torch's kernel gets wrong (NaN, or a crash): that takes our kernel at
    any row count, or without it a float product of the dequantized weight, 1024 rows at a time. The kernel sums in fp32 over the inputs in a fixed
    order and multiplies by the row's scale once: the fp32 product of ``x`` and the dequantized
    weight up to summation order and the final rounding to ``x``'s dtype. Each row's result is
    the same whatever the other rows, up to :data:`MAX_ROWS` rows.
    """
    ext = load()
    usable = (ext is not None and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16)
              and q.dtype == torch.int8 and q.is_contiguous() and x.device.type == "cpu"
              and q.device.type == "cpu" and scales.device.type == "cpu"
              and not (torch.is_grad_enabled() and x.requires_grad))
    # torch 2.13's bfloat16 _weight_int8pack_mm reads rows with aligned vector loads: with an input
    # width that is not a multiple of 64 its later rows are misaligned and it returns NaN or
    # crashes (SIGSEGV); those shapes never go to it
    torch_safe = not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and q.shape[-1] % 64)
    if usable and (x.shape[0] <= MAX_ROWS or not torch_safe):
        return ext.linear_int8(x.contiguous(), q, scales, level())
    if torch_safe:
        return torch.ops.aten._weight_int8pack_mm(x, q, scales)
    return _dequantized_product(x, q, scales)


def _dequantized_product(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x [M, in] @ q.T) * scales`` in fp32 over :data:`_DEQUANT_ROWS` rows of ``q`` at a time
    (bounded workspace), rounded to ``x``'s dtype: for what neither kernel takes."""
    xf = x.float()
    out = torch.empty(*x.shape[:-1], q.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, q.shape[0], _DEQUANT_ROWS):
        rows = slice(start, start + _DEQUANT_ROWS)
        out[..., rows] = (F.linear(xf, q[rows].float()) * scales[rows].float()).to(x.dtype)
    return out


#: Weight rows dequantized at a time by :func:`_dequantized_product`.
_DEQUANT_ROWS = 1024


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`aquilachat.model.rms_norm` for ``x [N, C]`` and ``weight [C]`` -> ``[N, C]``.

    The kernel takes float32 / bfloat16 CPU tensors of one dtype without autograd: fp32 sum of
    squares (8 partial sums: another summation order than torch's, ~1e-7 relative in fp32), the
    normalised value rounded to the dtype before the product with ``weight`` as the model rounds
    it. Anything else (and a machine without the kernel) runs the model's function.
    """
    ext = load()
    if (ext is None or x.dim() != 2 or weight.dim() != 1 or x.dtype != weight.dtype
            or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        from ..model import rms_norm as plain
        return plain(x, weight, eps)
    return ext.rms_norm(x, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`aquilachat.model.rotate` for one token per row: ``x [N, heads, D]`` and tables
    ``[N, D]`` (shared by a row's heads) -> a new ``[N, heads, D]``.

    The kernel takes float32 / bfloat16 CPU tensors of one dtype without autograd and rounds each
    product and the sum as torch's elementwise ops do (bit-identical to the model's function);
    anything else (and a machine without the kernel) runs the model's function.
    """
    ext = load()
    if (ext is None or x.dim() != 3 or cos.dim() != 2 or not x.dtype == cos.dtype == signed_sin.dtype
            or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or cos.device.type != "cpu"
            or signed_sin.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)):
        from ..model import rotate as plain
        N, heads, D = x.shape
        return plain(x[:, None], cos.view(N, 1, 1, D), signed_sin.view(N, 1, 1, D))[:, 0]
    return ext.rotate(x, cos, signed_sin)


def decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decode token per row: writes rotated keys ``k`` and values ``v`` ``[B, Hkv, D]`` into
    the caches ``[slots, Hkv, S, D]`` at ``(slot_ids[b], :, positions[b])``, then grouped-query
    attention of rotated ``q [B, H, D]`` over that slot's positions ``0 .. positions[b]`` ->
    ``[B, H * D]``: what :func:`aquilachat.model.attend` computes for ``T == 1`` with
    ``kv_len > positions.max()`` (its mask is ``key_pos <= position``).

    The kernel (contiguous CPU caches, float32 / bfloat16 tensors all of one dtype, no autograd)
    sums in fp32 (scores, softmax, weighted values; scale ``1 / sqrt(D)`` as SDPA's default) and
    rounds the output once; results equal SDPA's up to summation order. Anything else (and a
    machine without the kernel) runs :func:`aquilachat.model.attend`.

    Raises:
        RuntimeError: (the kernel) a slot or position outside the caches, mismatched shapes.
    """
    ext = load()
    if (ext is None or not (q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype)
            or q.dtype not in (torch.float32, torch.bfloat16) or not k_cache.is_contiguous()
            or not v_cache.is_contiguous() or q.device.type != "cpu" or k_cache.device.type != "cpu"
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        from ..model import LayerInputs, attend
        B, H, D = q.shape
        Hkv, S = k.shape[1], k_cache.shape[2]
        kv_len = int(positions.max()) + 1
        base = (slot_ids[:, None] * Hkv + torch.arange(Hkv, device=q.device)) * S  # (B, Hkv)
        flat_index = (base + positions[:, None]).view(-1)  # (B * Hkv)
        mask = (torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None])[:, None, None]  # (B, 1, 1, S)
        no_table = q.new_empty(0)
        inputs = LayerInputs(no_table, no_table, (slot_ids, flat_index, slot_ids, positions[:, None]), mask, kv_len)
        return attend(q[:, None], k[:, None], v[:, None], (k_cache, v_cache), inputs).view(B, H * D)
    return ext.decode_attend(q, k, v, k_cache, v_cache, slot_ids, positions)
