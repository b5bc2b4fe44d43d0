"""Weight-only quantization of the linear layers: int8 and int4, converted from outside the model
(the shape of gpt-fast's ``quantize.py``: module classes that replace ``nn.Linear``, a function that
swaps them in).

Activations stay in the run dtype (bfloat16 or float32); only the weights are stored in fewer bits
and expanded inside the weight-only kernels (ours in :mod:`aquilachat.backends.cpu_kernels`, else
torch's).

**int8** (``Int8Linear``): per output channel, symmetric, as llama.cpp's ``q8_0`` but with one scale
per row instead of per 32 weights. For a row ``w [K]``::

    scale = max_k |w_k| / 127        (rounded to the run dtype first)
    q_k   = round(w_k / scale)        in [-127, 127], int8
    w_k  ~= q_k * scale               |error| <= scale / 2

Products (:class:`Int8Linear`'s ``layout``, chosen at load): with AVX512_BF16 and bfloat16
activations, :func:`aquilachat.backends.cpu_kernels.linear_int8_blocked` on the codes repacked
into our kernel's blocked layout (each code's two nibbles made exact bfloat16 values by one
shift and one bitwise op, both products added by one ``VDPBF16PS``: on this project's Zen 4,
1.2-1.5x the fp32 kernel at one row, 0.8-0.95x at four: docs/generation.md); otherwise
:func:`aquilachat.backends.cpu_kernels.linear_int8` on the plain codes (fp32 sums). Both read
the weight once for up to ``MAX_ROWS`` rows; more rows: the weight dequantized in blocks through
torch's float product. Without the CPU kernels (no compiler, ``AQUILACHAT_CPU_KERNELS=0``):
``torch.ops.aten._weight_int8pack_mm(x [M, K], q [N, K] int8, scales [N])`` with ``scales`` in
``x``'s dtype.

**int4** (``Int4Linear``): groups of ``group_size`` consecutive inputs of one output row,
asymmetric min/max (the convention of torch's tinygemm kernels and gpt-fast's
``get_group_qparams``). For a group ``w [g]`` with ``lo = min w``, ``hi = max w``::

    scale = (hi - lo) / 15                                        (rounded to the run dtype)
    zero  = the run-dtype value nearest to (lo + hi) / 2 + scale / 2
    q_k   = round((w_k - zero) / scale) + 8     in [0, 15]
    w_k  ~= (q_k - 8) * scale + zero            |error| <= scale / 2

``zero`` is the centre of the values it may take for ``[zero - 8.5 scale, zero + 7.5 scale]`` to
hold the whole group (an interval ``16 scale - (hi - lo)`` wide). Rounding ``zero`` to the run
dtype moves it by up to ``eps / 2 * |zero|``; for a group far from zero compared with its spread
(in bfloat16, ``|lo + hi| / 2`` above about 3 ``(hi - lo)``; trained weights are near-centred)
the scale is widened to ``(hi - lo + 2 e) / 16`` so that the rounded ``zero`` still keeps every
element within half a step of the stored scale. A constant group is stored exactly (zero = its
value, q = 8) up to the dtype's rounding of that value.

Products: with the CPU kernels, :func:`aquilachat.backends.cpu_kernels.linear_int4` on our own
layout (:class:`Int4Linear`, built at load by :func:`_kernel_nibbles`; up to ``MAX_ROWS`` rows our
kernel, more rows the weight dequantized in blocks through torch's float product). Without them
``torch.ops.aten._convert_weight_to_int4pack_for_cpu(q [N, K] int32, 1)`` packs the codes into
torch's layout (``uint8 [N, K/2]``; the byte order depends on the CPU's instruction set) and
``torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros
[K/group_size, N, 2])`` multiplies, ``scales_and_zeros`` in ``x``'s dtype. Neither layout is
written to disk.

Group size: 32 (:data:`DEFAULT_GROUP_SIZE`) or 128 (also 64, 256: the kernel's sizes). Group 32
stores 5 bits per weight in bfloat16 (4 + a 16-bit scale and zero per 32), group 128 4.25 bits.
Measured on this project's 2-core Zen4 (bench/quantization_speed.py, bench/quantization_quality.py,
figures in docs/generation.md): the kernel takes about the same time per product for both, so 128's
15 % fewer bytes pay only where a product is at the bandwidth bound; group 32's error is smaller
(held-out perplexity of aquila-tiny +0.39 % vs +0.87 % at group 64), and 32 divides every width of
the bundled aquila-tiny (hidden size 192; 128 does not). Default: 32 (llama.cpp's ``q4_0`` also
uses blocks of 32); ``--group-size 128`` for 7B-class models.

What is quantized (:func:`quantize_plan`): the seven linear weights of every decoder layer with the
chosen method; ``lm_head`` with int8 under both methods when it is its own weight (the output
projection sets the logits directly; int8's error is ~16x smaller than int4's; llama.cpp likewise
keeps ``output.weight`` at more bits under its 4-bit types; and torch's int4 packing needs rows in
multiples of 16, which Aquila's 100008-token vocabulary is not). A
``lm_head`` tied to the embedding stays tied and float; the embedding table always stays float (a
lookup reads one row per token, no product).

Checkpoints (``aquilachat quantize``, :func:`aquilachat.checkpoint.quantize_checkpoint`): Hugging Face layout with a
``quantization_config`` in ``config.json`` (:class:`QuantizationConfig`; field names as
transformers' GPTQ/AWQ configs: ``quant_method``, ``bits``, ``group_size`` (-1 = per channel, as
GPTQ), ``sym``, ``zero_point``, ``lm_head``, ``modules_to_not_convert``) and these tensors per
quantized linear (portable: no kernel layout on disk)::

    int8: <name>.weight  int8  [N, K]          <name>.scales [N]
    int4: <name>.weight  uint8 [N, K/2]        (input 2j in the low nibble, 2j+1 in the high one)
          <name>.scales  [N, K/g]              <name>.zeros  [N, K/g]

scales and zeros in the checkpoint's ``torch_dtype`` (the dtype the codes were computed for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError

__all__ = ["METHODS", "DEFAULT_GROUP_SIZE", "GROUP_SIZES", "QuantizationConfig", "Int8Linear", "Int4Linear",
           "QuantizedLinear", "quantize_weight", "dequantize", "weight_bytes", "quantize_plan", "quantize_model",
           "quantized_module", "checkpoint_tensors", "is_quantized", "QuantizedLoader"]

#: The weight-only methods, by the name ``--quantization`` takes.
METHODS = ("int8", "int4")
#: int4 group sizes torch's CPU kernel takes (``_weight_int4pack_mm_for_cpu``).
GROUP_SIZES = (32, 64, 128, 256)
#: Default int4 group size (module docstring: why 32).
DEFAULT_GROUP_SIZE = 32
#: The method of an untied ``lm_head`` under every method (module docstring).
LM_HEAD_METHOD = "int8"
#: Rows converted at a time when quantizing a float weight: bounds the fp32 workspace to about
#: ``QUANTIZE_CHUNK_ELEMENTS`` x 4 bytes x a few temporaries, whatever the tensor's size.
QUANTIZE_CHUNK_ELEMENTS = 1 << 22
#: ``quant_method`` of our checkpoints' ``quantization_config``.
QUANT_METHOD = "aquilachat"
#: Layout version of the tensors on disk (bumped if the layout above ever changes).
FORMAT_VERSION = 1
#: Byte alignment the kernels' operands get: torch 2.13's bfloat16 ``_weight_int8pack_mm`` reads its
#: input and weight with aligned vector loads and crashes (SIGSEGV) on addresses that are not
#: (measured: an input 16 bytes off, or an int8 weight 8 bytes off, e.g. as it lies in a
#: safetensors file). torch's CPU allocator gives 64-byte aligned memory.
ALIGNMENT = 64
_BITS = {"int8": 8, "int4": 4}
_DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _check_method(method: str, what: str = "quantization") -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown {what} {method!r}; use one of {', '.join(METHODS)}")


def _check_group_size(group_size: int, what: str = "group_size") -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, GROUP_SIZES))} (torch's int4 CPU kernel), "
                          f"got {group_size!r}")


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class QuantizationConfig:
    """What a quantized model holds: ``method`` (``int8`` | ``int4``) for the decoder's linear
    weights, ``group_size`` (int4; None for int8's per-channel scales) and ``lm_head`` (the
    method of the output projection, None when it stays float: tied to the embedding).

    Raises:
        ConfigError: an unknown method or group size.
    """

    method: str
    group_size: int | None = None
    lm_head: str | None = LM_HEAD_METHOD

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.method == "int4":
            _check_group_size(self.group_size)
        elif self.group_size is not None:
            raise ConfigError(f"group_size applies to int4 only (int8 has one scale per output channel), "
                              f"got {self.group_size!r}")
        if self.lm_head is not None:
            _check_method(self.lm_head, "lm_head quantization")

    @classmethod
    def for_model(cls, config: ModelConfig, method: str, group_size: int | None = None) -> "QuantizationConfig":
        """The configuration :func:`quantize_plan` applies to a model of ``config``: int4's
        ``group_size`` defaults to :data:`DEFAULT_GROUP_SIZE`; ``lm_head`` is int8 unless tied."""
        _check_method(method)
        if method == "int4" and group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if method == "int8" and group_size is not None:
            raise ConfigError("--group-size applies to int4 only (int8 has one scale per output channel)")
        return cls(method, group_size, None if config.tie_word_embeddings else LM_HEAD_METHOD)

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` of ``config.json`` (field names as transformers')."""
        return {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "method": self.method,
                "bits": _BITS[self.method], "group_size": self.group_size if self.group_size else -1,
                "sym": self.method == "int8", "zero_point": self.method == "int4",
                "lm_head": self.lm_head is not None, "lm_head_bits": _BITS[self.lm_head] if self.lm_head else None,
                "modules_to_not_convert": ["model.embed_tokens"] + ([] if self.lm_head else ["lm_head"])}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "QuantizationConfig":
        """Read a ``quantization_config`` written by :meth:`to_dict`.

        Raises:
            ConfigError: not ours, or a field that is missing or inconsistent, naming ``source`` and
                the field (``quantization_config.bits``, ...).
        """
        where = f"{source}: quantization_config"
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be an object, got {type(data).__name__}")
        if data.get("quant_method") != QUANT_METHOD:
            raise ConfigError(f"{where}.quant_method is {data.get('quant_method')!r}; aquilachat loads only its own "
                              f"weight-only checkpoints ({QUANT_METHOD!r}, written by aquilachat quantize)")
        if data.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{where}.version is {data.get('version')!r}; this aquilachat reads version "
                              f"{FORMAT_VERSION}")
        bits = data.get("bits")
        method = {8: "int8", 4: "int4"}.get(bits) if isinstance(bits, int) else None
        if method is None:
            raise ConfigError(f"{where}.bits must be 8 or 4, got {bits!r}")
        if data.get("method", method) != method:
            raise ConfigError(f"{where}.method {data.get('method')!r} does not match bits {bits}")
        if data.get("sym") is not (method == "int8"):
            raise ConfigError(f"{where}.sym must be {str(method == 'int8').lower()} for {bits}-bit weights, "
                              f"got {data.get('sym')!r}")
        group = data.get("group_size")
        if method == "int8":
            if group not in (-1, None):
                raise ConfigError(f"{where}.group_size must be -1 (per channel) for 8-bit weights, got {group!r}")
            group = None
        elif not isinstance(group, int) or group not in GROUP_SIZES:
            raise ConfigError(f"{where}.group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group!r}")
        lm_head = data.get("lm_head")
        if not isinstance(lm_head, bool):
            raise ConfigError(f"{where}.lm_head must be true or false, got {lm_head!r}")
        head_method = None
        if lm_head:
            head_bits = data.get("lm_head_bits")
            head_method = {8: "int8", 4: "int4"}.get(head_bits) if isinstance(head_bits, int) else None
            if head_method is None:
                raise ConfigError(f"{where}.lm_head_bits must be 8 or 4, got {head_bits!r}")
        return cls(method, group, head_method)

    @property
    def description(self) -> str:
        """``int4 (group 32, lm_head int8)``."""
        parts = [f"group {self.group_size}"] if self.group_size else []
        parts.append(f"lm_head {self.lm_head or 'float'}")
        return f"{self.method} ({', '.join(parts)})"


# ---------------------------------------------------------------------------- formats
def _round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (fp32) rounded to ``dtype``'s values, kept in fp32 for the arithmetic."""
    return t.to(dtype).to(torch.float32)


def _quantize_int8_rows(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [n, K]`` fp32 -> codes int8 ``[n, K]``, scales fp32 ``[n]`` (values of ``dtype``)."""
    amax = w.abs().amax(dim=1)
    # an all-zero row keeps a positive scale (its codes are all 0 whatever the scale)
    scale = _round_to(torch.where(amax > 0, amax / 127, torch.ones_like(amax)), dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a scale below dtype's range
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _quantize_int4_rows(w: torch.Tensor, group_size: int, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [n, K]`` fp32 -> codes int32 ``[n, K]`` in 0..15, scales and zeros fp32 ``[n, K/g]``."""
    n, k = w.shape
    groups = w.view(n, k // group_size, group_size)  # (n, K/g, g)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    spread, mid = hi - lo, (lo + hi) / 2
    # rounding zero to dtype moves it by at most e; a scale of at least (spread + 2e) / 16 keeps
    # [zero - 8.5 scale, zero + 7.5 scale] around the group whatever the roundings (module docstring)
    eps = torch.finfo(dtype).eps
    e = eps / 2 * (mid.abs() + spread)
    scale = torch.maximum(spread / 15, (spread + 2 * e) / 16 * (1 + eps))
    scale = _round_to(torch.where(spread > 0, scale, torch.ones_like(scale)), dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # a constant group is its value (q = 8)
    zero = _round_to(torch.where(spread > 0, mid + scale / 2, lo), dtype)
    q = torch.round((groups - zero[..., None]) / scale[..., None]).add_(8).clamp_(0, 15)
    return q.view(n, k).to(torch.int32), scale, zero


def _float_rows(weight: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, fp32 copy of weight[start:start + rows])`` over the rows of ``weight``."""
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start:start + rows].to(torch.float32)


def _chunk_rows(in_features: int) -> int:
    """Rows per conversion chunk: a multiple of 64 (the int4 packing's row block) near
    :data:`QUANTIZE_CHUNK_ELEMENTS` elements."""
    return max(64, QUANTIZE_CHUNK_ELEMENTS // max(in_features, 1) // 64 * 64)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[n, K]`` (0..15) -> uint8 ``[n, K/2]``: input 2j low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles`: uint8 ``[n, K/2]`` -> int32 codes ``[n, K]``."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1).to(torch.int32)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned copy of it when its data does not start on :data:`ALIGNMENT` bytes."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone(memory_format=torch.contiguous_format)


def _check_shape(method: str, out_features: int, in_features: int, group_size: int | None, name: str) -> None:
    """Raise ConfigError when the kernels cannot take an ``[out, in]`` weight with this method."""
    what = f"{name}: " if name else ""
    if method == "int4":
        if in_features % group_size:
            raise ConfigError(f"{what}in_features {in_features} is not a multiple of the int4 group size "
                              f"{group_size}; use another --group-size ({', '.join(map(str, GROUP_SIZES))}) "
                              "or int8 (--quantization int8 at load, --method int8 with aquilachat quantize)")
        if out_features % 16:
            raise ConfigError(f"{what}out_features {out_features} is not a multiple of 16, which the int4 CPU "
                              "kernels need (rows in blocks of 16); use int8 (--quantization int8 at load, "
                              "--method int8 with aquilachat quantize)")


def quantize_weight(weight: torch.Tensor, method: str, *, group_size: int | None = None,
                    dtype: torch.dtype = torch.bfloat16, name: str = "") -> dict[str, torch.Tensor]:
    """Quantize one linear weight ``[out, in]`` (any float dtype, CPU, e.g. memory-mapped) into the
    checkpoint tensors of the module docstring, converting :data:`QUANTIZE_CHUNK_ELEMENTS`
    elements at a time (no fp32 copy of the whole weight).

    Args:
        method: ``int8`` or ``int4``; group_size: int4's (default :data:`DEFAULT_GROUP_SIZE`).
        dtype: the run dtype the scales (and zeros) are rounded to and stored in; the codes are
            computed for the rounded values, so the half-step bound holds as they are used.
        name: the module's name, for errors.

    Returns:
        int8: ``{"weight": int8 [out, in], "scales": dtype [out]}``; int4: ``{"weight": uint8
        [out, in/2], "scales": dtype [out, in/g], "zeros": dtype [out, in/g]}``.

    Raises:
        ConfigError: unknown method or group size, or a shape the kernels cannot take, naming it.
    """
    _check_method(method)
    if weight.dim() != 2:
        raise ConfigError(f"{name or 'weight'}: expected a 2-d [out, in] weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if method == "int4":
        group_size = group_size or DEFAULT_GROUP_SIZE
        _check_group_size(group_size)
    _check_shape(method, n, k, group_size, name)
    rows = _chunk_rows(k)
    if method == "int8":
        codes = torch.empty(n, k, dtype=torch.int8)
        scales = torch.empty(n, dtype=dtype)
        for start, w in _float_rows(weight.detach(), rows):
            q, s = _quantize_int8_rows(w, dtype)
            codes[start:start + len(w)], scales[start:start + len(w)] = q, s
        return {"weight": codes, "scales": scales}
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=dtype)
    zeros = torch.empty(n, k // group_size, dtype=dtype)
    for start, w in _float_rows(weight.detach(), rows):
        q, s, z = _quantize_int4_rows(w, group_size, dtype)
        end = start + len(w)
        packed[start:end], scales[start:end], zeros[start:end] = _pack_nibbles(q), s, z
    return {"weight": packed, "scales": scales, "zeros": zeros}


def dequantize(tensors: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    """The fp32 weight ``[out, in]`` that checkpoint ``tensors`` (:func:`quantize_weight`) stand
    for: int8 ``q * scale``; int4 ``(q - 8) * scale + zero`` per group."""
    _check_method(method)
    scales = tensors["scales"].to(torch.float32)
    if method == "int8":
        return tensors["weight"].to(torch.float32) * scales[:, None]
    q = _unpack_nibbles(tensors["weight"]).to(torch.float32)
    n, k = q.shape
    g = k // scales.shape[1]
    w = (q.view(n, -1, g) - 8) * scales[..., None] + tensors["zeros"].to(torch.float32)[..., None]
    return w.view(n, k)


def weight_bytes(out_features: int, in_features: int, method: str, *, group_size: int | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one ``[out, in]`` linear weight takes in memory with ``method``: the codes (1 or 1/2
    byte per weight; int8's blocked layout, where this machine uses it, pads ``out`` to a multiple
    of 16) plus the scales (and int4's zeros) in ``dtype``, i.e. the tensors of
    :class:`Int8Linear` / :class:`Int4Linear` as built here.

    Raises:
        ConfigError: an unknown method or group size.
    """
    _check_method(method)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if method == "int8":  # the blocked layout pads the rows to a multiple of 16
        rows = -(-out_features // 16) * 16 if _default_int8_layout(dtype, in_features) == "aquilachat" else out_features
        return rows * in_features + out_features * itemsize
    group_size = group_size or DEFAULT_GROUP_SIZE
    _check_group_size(group_size)
    return out_features * in_features // 2 + 2 * out_features * (in_features // group_size) * itemsize


# ---------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """Base of the weight-only linear modules: ``forward(x [..., in]) -> [..., out]`` in ``x``'s
    dtype, no bias, no autograd (inference only). Built from checkpoint tensors with
    :meth:`from_tensors` or from a float weight with :meth:`from_float`; ``method`` names the
    format."""

    method: str = ""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype the kernels run in (that of the scales)."""
        return self.scale_tensor().dtype

    def scale_tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        dtype = self.dtype
        x2 = x.reshape(-1, self.in_features)  # (M, in): the kernels take 2-d, row-contiguous input
        if x2.dtype != dtype:  # the kernels want x in the scales' dtype (e.g. fp32 input to a bf16 model)
            x2 = x2.to(dtype)
        y = self._product(_aligned(x2.contiguous()))  # (M, out)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, dtype: torch.dtype, group_size: int | None = None,
                   name: str = "") -> "QuantizedLinear":
        """Quantize a float ``[out, in]`` weight (:func:`quantize_weight`) into a module whose
        kernels run in ``dtype``."""
        out_features, in_features = weight.shape
        return cls.from_tensors(quantize_weight(weight, cls.method, group_size=group_size, dtype=dtype, name=name),
                                in_features=in_features, out_features=out_features, dtype=dtype)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, in_features: int, out_features: int,
                     dtype: torch.dtype) -> "QuantizedLinear":
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


class Int8Linear(QuantizedLinear):
    """int8 weight ``[out, in]`` with one scale per output channel (module docstring); buffers
    ``weight`` (uint8 or int8 codes in the kernel's ``layout``) and ``scales`` (``[out]``, the
    activation dtype).

    ``layout`` (default: ``"aquilachat"`` where it runs, :func:`_default_int8_layout`, else
    ``"plain"``):

    * ``"plain"``: the checkpoint's int8 ``[out, in]`` as it is (our fp32 kernel, or torch's
      ``_weight_int8pack_mm`` without the CPU kernels);
    * ``"aquilachat"``: the blocked layout of our AVX512_BF16 kernel (``cpu_kernels.cpp``,
      ``q8_bf16_block``), uint8 ``[out rounded up to 16, in]``: codes ``u = q + 128`` split into
      nibbles; rows in blocks of 16; for block ``b`` and inputs ``4c .. 4c + 3``, 16 little-endian
      32-bit lanes, lane ``l`` holding the low nibbles of row ``16b + l`` in its low 16-bit word
      and the high nibbles in its high word, input ``4c + p`` in nibble ``p`` of each. Rows past
      ``out`` are padding (``q = 0``). Needs bfloat16, ``in % 32 == 0`` and a CPU with AVX512_BF16.
    """

    method = "int8"

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, layout: str | None = None) -> None:
        super().__init__(in_features, out_features)
        if layout not in (None, "aquilachat", "plain"):
            raise ValueError(f"Int8Linear: layout must be 'aquilachat' or 'plain', got {layout!r}")
        self.layout = layout or _default_int8_layout(dtype, in_features)
        if self.layout == "aquilachat":
            if not _blocked_int8_fits(dtype, in_features):
                raise ValueError(f"Int8Linear: layout 'aquilachat' needs bfloat16 and in_features % 32 == 0, "
                                 f"got {dtype} and {in_features}")
            rows = -(-out_features // 16) * 16
            self.register_buffer("weight", torch.empty(rows, in_features, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def scale_tensor(self) -> torch.Tensor:
        return self.scales

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        from .backends import cpu_kernels  # not at import: the backends import the model
        if self.layout == "aquilachat":
            return cpu_kernels.linear_int8_blocked(x2, self.weight, self.scales)
        return cpu_kernels.linear_int8(x2, self.weight, self.scales)

    @classmethod
    def from_tensors(cls, tensors, *, in_features, out_features, dtype, layout: str | None = None) -> "Int8Linear":
        """From checkpoint tensors ``weight`` int8 ``[out, in]`` and ``scales`` ``[out]``: layout
        ``"plain"`` uses them as they are when already int8 / ``dtype`` and aligned
        (:data:`ALIGNMENT`); ``"aquilachat"`` repacks the codes :func:`_chunk_rows` rows at a time
        (a small workspace)."""
        m = cls(in_features, out_features, dtype=dtype, device="meta", layout=layout)
        m.scales = _aligned(tensors["scales"].to(dtype).contiguous())
        q = tensors["weight"]
        if m.layout == "plain":
            m.weight = _aligned(q.contiguous())
            return m
        packed = torch.empty(m.weight.shape, dtype=torch.uint8)
        rows = _chunk_rows(in_features)  # a multiple of 16
        for start in range(0, packed.shape[0], rows):
            packed[start:start + rows] = _blocked_int8_codes(q[start:start + rows], min(rows, len(packed) - start))
        m.weight = packed
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout}"


def _blocked_int8_fits(dtype: torch.dtype, in_features: int) -> bool:
    """Whether a weight of ``in_features`` inputs run in ``dtype`` fits the blocked int8 layout (its
    kernel takes bfloat16 and removes its offset per 32 inputs)."""
    return dtype == torch.bfloat16 and in_features % 32 == 0


def _default_int8_layout(dtype: torch.dtype, in_features: int) -> str:
    """``"aquilachat"`` where its kernel runs (the CPU kernels built, AVX512_BF16 at the kernels'
    level, bfloat16, ``in_features % 32 == 0``), else ``"plain"``."""
    if not _blocked_int8_fits(dtype, in_features):
        return "plain"
    from .backends import cpu_kernels
    return "aquilachat" if cpu_kernels.load() is not None and cpu_kernels.level() >= 3 else "plain"


def _blocked_int8_codes(q: torch.Tensor, rows: int) -> torch.Tensor:
    """int8 codes ``q [n, K]`` (``n <= rows``, ``rows`` a multiple of 16; missing rows are padded
    with ``q = 0``) -> uint8 ``[rows, K]`` in :class:`Int8Linear`'s ``"aquilachat"`` layout: for
    row block ``b``, inputs ``4c .. 4c + 3`` and lane ``l``, the 4 bytes ``(lo[0] | lo[1] << 4,
    lo[2] | lo[3] << 4, hi[0] | hi[1] << 4, hi[2] | hi[3] << 4)`` with ``lo[p] | hi[p] << 4 =
    q[16b + l, 4c + p] + 128``."""
    n, K = q.shape
    u = torch.full((rows, K), 128, dtype=torch.uint8)
    u[:n] = (q.to(torch.int16) + 128).to(torch.uint8)
    nib = torch.stack((u & 15, u >> 4), dim=-1).view(rows // 16, 16, K // 4, 4, 2)  # (b, l, c, p, half)
    byte = nib[:, :, :, 0::2] | (nib[:, :, :, 1::2] << 4)  # (b, l, c, j, half): nibbles p = 2j, 2j + 1
    return byte.permute(0, 2, 1, 4, 3).reshape(rows, K)  # (b, c, l, half, j)


class Int4Linear(QuantizedLinear):
    """int4 weight ``[out, in]`` in groups of ``group_size`` inputs with a scale and zero each
    (module docstring); buffers ``weight`` (uint8 ``[out, in/2]``, the codes in the kernel's
    layout, rebuilt from the portable codes at load) and ``scales_and_zeros`` (the activation
    dtype).

    ``layout`` (default: ``"aquilachat"`` when this machine has the CPU kernels
    (:func:`aquilachat.backends.cpu_kernels.load`), else ``"torch"``):

    * ``"aquilachat"``: our kernel's layout (``cpu_kernels_int4_body.h``): rows in blocks of 16,
      for each block and 8 inputs 32 little-endian 16-bit words, word ``2l + t`` holding in its
      nibble ``p`` the code of row ``16b + l``, input ``8c + 2p + t``; ``scales_and_zeros``
      ``[out/16, in/group_size, 16, 2]`` (lane ``l``: scale, zero);
    * ``"torch"``: ``_convert_weight_to_int4pack_for_cpu``'s (it depends on the CPU's instruction
      set); ``scales_and_zeros`` ``[in/group_size, out, 2]``.
    """

    method = "int4"

    def __init__(self, in_features: int, out_features: int, *, group_size: int = DEFAULT_GROUP_SIZE,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 layout: str | None = None) -> None:
        super().__init__(in_features, out_features)
        _check_group_size(group_size)
        if layout not in (None, "aquilachat", "torch"):
            raise ValueError(f"Int4Linear: layout must be 'aquilachat' or 'torch', got {layout!r}")
        self.group_size = group_size
        self.layout = layout or _default_int4_layout()
        groups = in_features // group_size
        sz_shape = (out_features // 16, groups, 16, 2) if self.layout == "aquilachat" else (groups, out_features, 2)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(sz_shape, dtype=dtype, device=device))

    def scale_tensor(self) -> torch.Tensor:
        return self.scales_and_zeros

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.layout == "aquilachat":
            from .backends import cpu_kernels  # not at import: the backends import the model
            return cpu_kernels.linear_int4(x2, self.weight, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)

    @classmethod
    def from_tensors(cls, tensors, *, in_features, out_features, dtype, layout: str | None = None) -> "Int4Linear":
        """From checkpoint tensors ``weight`` uint8 ``[out, in/2]`` (portable nibbles), ``scales``
        and ``zeros`` ``[out, in/g]``: the codes are repacked for the kernel (``layout``, class
        docstring) :func:`_chunk_rows` rows at a time, so the workspace stays small."""
        scales, zeros = tensors["scales"], tensors["zeros"]
        group_size = in_features // scales.shape[1]
        m = cls(in_features, out_features, group_size=group_size, dtype=dtype, device="meta", layout=layout)
        portable = tensors["weight"]
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        rows = _chunk_rows(in_features)
        for start in range(0, out_features, rows):
            chunk = portable[start:start + rows]
            if m.layout == "aquilachat":
                packed[start:start + len(chunk)] = _kernel_nibbles(chunk)
            else:
                packed[start:start + len(chunk)] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    _unpack_nibbles(chunk), 1)
        m.weight = packed
        pairs = torch.stack((scales.to(dtype), zeros.to(dtype)), dim=-1)  # (N, K/g, 2)
        if m.layout == "aquilachat":  # (N/16, K/g, 16, 2)
            m.scales_and_zeros = pairs.view(out_features // 16, 16, -1, 2).transpose(1, 2).contiguous()
        else:  # (K/g, N, 2): scale and zero of group j of output n at [j, n]
            m.scales_and_zeros = pairs.transpose(0, 1).contiguous()
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, layout={self.layout}"


def _default_int4_layout() -> str:
    """``"aquilachat"`` when the CPU kernels are available here, else ``"torch"``."""
    from .backends import cpu_kernels
    return "aquilachat" if cpu_kernels.load() is not None else "torch"


def _kernel_nibbles(portable: torch.Tensor) -> torch.Tensor:
    """Portable int4 codes uint8 ``[n, K/2]`` (n a multiple of 16) -> the same codes in the
    kernel's layout (:class:`Int4Linear`), uint8 ``[n, K/2]``: for row block ``b`` and inputs
    ``8c .. 8c + 7``, word ``2l + t`` = bytes ``(q[p=0] | q[p=1] << 4, q[p=2] | q[p=3] << 4)``
    with ``q[p] = code(16b + l, 8c + 2p + t)``."""
    n, half = portable.shape
    q = _unpack_nibbles(portable).to(torch.uint8).view(n // 16, 16, half // 4, 4, 2)  # (b, l, c, p, t)
    byte = q[:, :, :, 0::2] | (q[:, :, :, 1::2] << 4)  # (b, l, c, byte, t): nibbles p = 2 byte, 2 byte + 1
    return byte.permute(0, 2, 1, 4, 3).reshape(n, half)  # (b, c, l, t, byte)


_MODULES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a weight-only quantized linear."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


# ---------------------------------------------------------------------------- whole models
def quantize_plan(config: ModelConfig, qconfig: QuantizationConfig) -> dict[str, tuple[str, int | None]]:
    """Module name -> ``(method, group_size)`` of every linear ``qconfig`` quantizes in a model of
    ``config`` (module docstring: the decoder's linears, and an untied ``lm_head`` in int8).

    Raises:
        ConfigError: a weight the kernels cannot take (its width vs the group size), naming it.
    """
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = dict(zip(_DECODER_LINEARS, [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]))
    plan = {}
    for i in range(config.num_hidden_layers):
        for suffix, (out_f, in_f) in shapes.items():
            name = f"model.layers.{i}.{suffix}"
            _check_shape(qconfig.method, out_f, in_f, qconfig.group_size, name)
            plan[name] = (qconfig.method, qconfig.group_size)
    if qconfig.lm_head is not None and not config.tie_word_embeddings:
        head_group = qconfig.group_size if qconfig.lm_head == "int4" else None
        _check_shape(qconfig.lm_head, config.vocab_size, h, head_group, "lm_head")
        plan["lm_head"] = (qconfig.lm_head, head_group)
    return plan


def quantized_module(method: str, in_features: int, out_features: int, *, dtype: torch.dtype,
                     group_size: int | None = None, device: torch.device | str = "meta") -> QuantizedLinear:
    """An empty module of ``method`` (on ``meta`` by default: a placeholder whose shapes the
    loader checks before reading anything)."""
    if method == "int4":
        return Int4Linear(in_features, out_features, group_size=group_size or DEFAULT_GROUP_SIZE, dtype=dtype,
                          device=device)
    return Int8Linear(in_features, out_features, dtype=dtype, device=device)


def checkpoint_tensors(method: str, out_features: int, in_features: int, *, group_size: int | None,
                       dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Suffix -> ``(shape, dtype)`` of the tensors a quantized checkpoint stores for one linear
    (module docstring): what the loader checks each file's headers against."""
    if method == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "scales": ((out_features,), dtype)}
    groups = in_features // group_size
    return {"weight": ((out_features, in_features // 2), torch.uint8),
            "scales": ((out_features, groups), dtype), "zeros": ((out_features, groups), dtype)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, method: str | QuantizationConfig, *, group_size: int | None = None,
                   dtype: torch.dtype | None = None) -> QuantizationConfig:
    """Replace the linear layers of an :class:`~aquilachat.model.AquilaForCausalLM` in place by
    quantized modules (:func:`quantize_plan`), one at a time: each float weight is dropped as its
    module is replaced. Kernels run in ``dtype`` (default: the embedding's dtype, which stays).

    Returns the :class:`QuantizationConfig` applied.

    Raises:
        ConfigError: unknown method, group size, a weight the kernels cannot take, or a model that
            is already quantized.
    """
    qconfig = method if isinstance(method, QuantizationConfig) else QuantizationConfig.for_model(
        model.config, method, group_size)
    if is_quantized(model):
        raise ConfigError("the model is already quantized")
    if dtype is None:
        dtype = model.model.embed_tokens.weight.dtype
    plan = quantize_plan(model.config, qconfig)
    with torch.no_grad():
        for name, (m, g) in plan.items():
            linear = model.get_submodule(name)
            set_module(model, name, _MODULES[m].from_float(linear.weight, dtype=dtype, group_size=g, name=name))
    return qconfig


class QuantizedLoader:
    """The quantized side of loading a checkpoint into a model built on ``meta``
    (:meth:`aquilachat.checkpoint.Checkpoint.load_model`): replaces the linears ``qconfig``
    converts by empty quantized modules, says which stored tensors they are built from, and builds
    each one as its tensors arrive, one module at a time.

    ``stored``: the checkpoint holds quantized tensors (``aquilachat quantize``: ``weight``,
    ``scales``, ``zeros`` per module), else each module is quantized from its float ``weight``.
    """

    def __init__(self, model: nn.Module, qconfig: QuantizationConfig, *, dtype: torch.dtype, stored: bool) -> None:
        self.model, self.dtype, self.stored = model, dtype, stored
        self.plan = quantize_plan(model.config, qconfig)
        self._shapes: dict[str, tuple[int, int]] = {}  # name -> (out, in)
        self._parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.plan}
        for name, (method, group) in self.plan.items():
            linear = model.get_submodule(name)
            self._shapes[name] = (linear.out_features, linear.in_features)
            set_module(model, name, quantized_module(method, linear.in_features, linear.out_features, dtype=dtype,
                                                     group_size=group))

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Tensor name -> ``(shape, dtype)`` the checkpoint must hold for the quantized modules
        (dtype None: any float dtype)."""
        out = {}
        for name, (method, group) in self.plan.items():
            out_f, in_f = self._shapes[name]
            if not self.stored:
                out[f"{name}.weight"] = ((out_f, in_f), None)
                continue
            for suffix, (shape, dtype) in checkpoint_tensors(method, out_f, in_f, group_size=group,
                                                             dtype=self.dtype).items():
                out[f"{name}.{suffix}"] = (shape, dtype if suffix == "weight" else None)
        return out

    def owns(self, name: str) -> bool:
        """Whether the tensor ``name`` belongs to a quantized module."""
        return name.rpartition(".")[0] in self.plan

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
        """Take the tensor ``name`` (as stored, float weights in Hugging Face row order). When its
        module has all its tensors, build it, put it in the model and return the tensors it was
        built from, each with whether the module keeps it as it is (int8 codes that lie in the
        file); until then ``[]``."""
        module_name, _, suffix = name.rpartition(".")
        method, group = self.plan[module_name]
        out_f, in_f = self._shapes[module_name]
        parts = self._parts[module_name]
        parts[suffix] = tensor
        if self.stored and len(parts) < (2 if method == "int8" else 3):  # weight, scales (, zeros)
            return []
        cls = _MODULES[method]
        if self.stored:
            module = cls.from_tensors(parts, in_features=in_f, out_features=out_f, dtype=self.dtype)
        else:
            module = cls.from_float(tensor, dtype=self.dtype, group_size=group, name=module_name)
        set_module(self.model, module_name, module)
        kept = {b.data_ptr() for b in module.buffers()}
        sources = list(self._parts.pop(module_name).values())
        return [(t, t.data_ptr() in kept) for t in sources]

