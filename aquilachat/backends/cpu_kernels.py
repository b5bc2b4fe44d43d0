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
* int8 weights with one scale per output row (for :class:`aquilachat.quantization.Int8Linear`):
  with AVX512_BF16 and bfloat16 input, in the kernel's own blocked layout
  (:func:`linear_int8_blocked`): each code's two nibbles become two exact bfloat16 values by a
  shift and one bitwise op (16 + lo and 256 + 16 hi) and ``VDPBF16PS`` adds both products at once;
  otherwise (:func:`linear_int8`, the plain ``[out, in]`` codes) codes widened to fp32 in
  registers, inputs to fp32 once per call, AVX-512 / AVX2 FMA / generic;
* int4 weights in groups, in the kernel's own layout (:func:`linear_int4`, for
  :class:`aquilachat.quantization.Int4Linear`): one output row per vector lane; with AVX512_BF16
  and bfloat16 input the codes become bfloat16 by one bitwise op (``0x4300 | q`` = 128 + q) for
  ``VDPBF16PS``, else fp32 multiply-adds (AVX-512 / AVX2 / generic);
* for more rows than :data:`MAX_ROWS` (a prompt), the quantized weights dequantized in blocks
  (:func:`dequantized_product`) for torch's blocked float product.

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

__all__ = ["DEQUANT_ROWS", "MAX_ROWS", "decode_attend", "dequantized_product", "linear", "linear_int4", "linear_int8", "linear_int8_blocked", "load", "load_error", "level", "rms_norm", "rotate"]

log = logging.getLogger(__name__)

#: Most input rows the kernel takes (a decode step's batch, a step's vocabulary projection); more
#: rows go to torch's blocked products (oneDNN / MKL), which reuse each weight block for many
#: rows from cache. Each row's result is the same whatever the other rows, up to this many.
MAX_ROWS = 64

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_NAME = "aquilachat_cpu_kernels_v14"
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
        # -ffp-contract=off: the plain C++ bodies fuse multiply-adds only where written (std::fma), so
        # every instantiation of a body rounds alike (a row's bits do not depend on the batch)
        ext = load_extension(name=_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
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

    With the kernel (float32 / bfloat16 CPU input, a contiguous ``q``, no autograd): up to
    :data:`MAX_ROWS` rows our kernel (fp32 sums over the inputs in a fixed order, times the row's
    scale once: each row's result is the same whatever the other rows); more rows (a prompt) a
    blocked float product of the weight dequantized :data:`DEQUANT_ROWS` rows at a time by the
    extension (:func:`dequantized_product`). Without the kernel:
    ``torch.ops.aten._weight_int8pack_mm`` (which wants ``scales`` in ``x``'s dtype and 64-byte
    aligned operands: the module's business), except bfloat16 input of a width that is not a
    multiple of 64, which torch's kernel gets wrong (NaN, or a crash): that takes a float product
    of the dequantized weight.
    """
    ext = load()
    usable = (ext is not None and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16)
              and q.dtype == torch.int8 and q.is_contiguous() and x.device.type == "cpu"
              and q.device.type == "cpu" and scales.device.type == "cpu"
              and not (torch.is_grad_enabled() and x.requires_grad))
    if usable:
        if x.shape[0] <= MAX_ROWS:
            return ext.linear_int8(x.contiguous(), q, scales, level())
        return dequantized_product(x, q.shape[0], lambda n0, n1: ext.dequantize_int8(q, scales.to(x.dtype), n0, n1))
    # torch 2.13's bfloat16 _weight_int8pack_mm reads rows with aligned vector loads: with an input
    # width that is not a multiple of 64 its later rows are misaligned and it returns NaN or
    # crashes (SIGSEGV); those shapes never go to it
    if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and q.shape[-1] % 64):
        return torch.ops.aten._weight_int8pack_mm(x, q, scales)
    return dequantized_product(x, q.shape[0], lambda n0, n1: (q[n0:n1].float() * scales[n0:n1, None].float()))


def linear_int8_blocked(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x [M, in] @ q.T) * scales`` -> ``[M, out]`` bfloat16 for int8 codes in the kernel's blocked
    layout (:class:`aquilachat.quantization.Int8Linear`, layout ``"aquilachat"``): ``w`` uint8
    ``[out rounded up to 16, in]``, ``scales [out]`` bfloat16.

    Up to :data:`MAX_ROWS` rows our AVX512_BF16 kernel (``VDPBF16PS`` on codes made bfloat16 by
    one shift and one bitwise op per 16 codes; fp32 sums; each row's result the same whatever the
    other rows); more rows a blocked float product of the weight dequantized :data:`DEQUANT_ROWS`
    rows at a time (:func:`dequantized_product`).

    Raises:
        RuntimeError: no kernel here or no AVX512_BF16 at the kernels' level (the layout is only
            built where it runs), shapes or dtypes that do not match.
    """
    return _own_layout_product("linear_int8_blocked", "an Int8Linear built here uses the plain layout", x,
                               scales.shape[0], lambda ext, xc: ext.linear_int8_blocked(xc, w, scales, level()),
                               lambda ext, n0, n1: ext.dequantize_int8_blocked(w, scales, n0, n1))


def _own_layout_product(what: str, otherwise: str, x: torch.Tensor, out_features: int, product, rows) -> torch.Tensor:
    """The dispatch of a weight kept in one of the kernels' own layouts: ``product(ext, x)`` (our
    few-row kernel) up to :data:`MAX_ROWS` 2-d rows without autograd, else
    :func:`dequantized_product` of ``rows(ext, n0, n1)``; RuntimeError naming ``what`` without
    the kernels (such a layout is only built where they load)."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"{what}: the CPU kernels are not available ({load_error()}); {otherwise}")
    if x.dim() == 2 and x.shape[0] <= MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad):
        return product(ext, x.contiguous())
    return dequantized_product(x, out_features, lambda n0, n1: rows(ext, n0, n1))


def linear_int4(x: torch.Tensor, w: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``x [M, in] @ W.T`` -> ``[M, out]`` in ``x``'s dtype for an int4 weight in the kernel's layout
    (:class:`aquilachat.quantization.Int4Linear`, layout ``"aquilachat"``): codes ``w`` uint8
    ``[out, in/2]``, ``scales_and_zeros [out/16, in/group, 16, 2]`` in ``x``'s dtype.

    Up to :data:`MAX_ROWS` rows our kernel (bfloat16 input with AVX512_BF16: ``VDPBF16PS`` on codes
    made bfloat16 by one bitwise op; else fp32 multiply-adds; fp32 sums, one rounding; each row's
    result the same whatever the other rows); more rows a blocked float product of the weight
    dequantized :data:`DEQUANT_ROWS` rows at a time (:func:`dequantized_product`).

    Raises:
        RuntimeError: no kernel here (the layout is only built when there is one), or shapes that
            do not match.
    """
    return _own_layout_product("linear_int4", "an Int4Linear built here uses torch's layout", x, w.shape[0],
                               lambda ext, xc: ext.linear_int4(xc, w, scales_and_zeros, level()),
                               lambda ext, n0, n1: ext.dequantize_int4(w, scales_and_zeros, n0, n1))


def dequantized_product(x: torch.Tensor, out_features: int, rows) -> torch.Tensor:
    """``x [M, in] @ W.T`` -> ``[M, out]`` in ``x``'s dtype, with ``rows(n0, n1)`` giving rows
    ``n0 .. n1 - 1`` of ``W`` as floats: :data:`DEQUANT_ROWS` rows at a time (a bounded workspace),
    each block multiplied by torch's blocked product (oneDNN, AMX where the CPU has it) in the
    dequantized block's dtype. For products of many rows (a prompt), where the weight is reused
    across rows and the float product's speed, not the weight's bytes, sets the pace."""
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, DEQUANT_ROWS):
        end = min(start + DEQUANT_ROWS, out_features)
        block = rows(start, end)
        out[..., start:end] = F.linear(x.to(block.dtype), block).to(x.dtype)
    return out


#: Weight rows dequantized at a time by :func:`dequantized_product` (a multiple of 16: int4's row
#: block); 1024 rows of a 4096-wide bfloat16 weight are 8 MiB of workspace.
DEQUANT_ROWS = 1024


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
