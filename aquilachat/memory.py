"""The memory plan: what a model will need, checked against what the machine has, before anything
large is allocated.

A plan counts, for one device, dtype and quantization (all in bytes):

* **weights**: every parameter at the run dtype (tied embeddings once); the linear weights a
  weight-only quantization converts at their quantized size, scales included (:func:`weight_bytes`,
  the formats of :mod:`aquilachat.quantization`);
* **KV cache**: ``slots x tokens x layers x 2 x kv_heads x head_dim x bytes`` (keys and values
  of every layer, :func:`kv_bytes_per_token`), the size :class:`aquilachat.model.KVCache` allocates;
* **workspace**: the activations of the largest step the engine runs (a prefill of
  ``max_num_batched_tokens`` tokens: hidden states, q/k/v, the MLP's two intermediate products,
  attention scores in fp32 as the math attention kernel materialises them) and the fp32 logits and
  sampling buffers of a decode step over every slot (:func:`workspace_bytes`);
* **overhead**: a fixed allowance for the interpreter, torch, the tokenizer and the allocator's
  slack (:data:`CPU_OVERHEAD_BYTES` / :data:`CUDA_OVERHEAD_BYTES`, measured on this project's
  machines and reported with the plan).

and compares the total with what is available (:func:`available_memory`): on the CPU the kernel's
``MemAvailable`` (free memory plus what page cache can give back), lowered to the cgroup's limit
minus its usage when the process runs under one (containers, systemd slices); on CUDA the free
device memory (``torch.cuda.mem_get_info``).

The KV cache is sized the way vLLM sizes its cache from the memory it is given
(``--kv-cache-memory``, ``gpu_memory_utilization``): a budget in bytes, or a fraction of what is left
after weights, workspace and overhead, becomes a number of slots of ``max_model_len`` tokens each;
``max_num_seqs`` is lowered to the slots that fit, and when not even one full-length slot fits a
context window the user did not set is shortened. When nothing fits, :class:`MemoryPlanError` says
the numbers and the options that would fit, in one line.

``dtype="auto"`` (:func:`choose_dtype`): a checkpoint's stored dtype, except that on the CPU a float16
checkpoint runs as bfloat16 where the CPU computes bfloat16 natively (AVX512_BF16 or AMX), as
float32 elsewhere when float32 fits, and as bfloat16 when it does not (float16 arithmetic on x86
CPUs is slow and overflows where bfloat16 does not). With a weight-only quantization the CPU runs
bfloat16 activations (torch's int8/int4 kernels are vectorized for them; float32 input takes their
reference loops).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import AquilaChatError, ConfigError

__all__ = ["MemoryPlan", "MemoryPlanError", "plan_memory", "choose_dtype", "available_memory",
           "weight_bytes", "kv_bytes_per_token", "workspace_bytes", "parse_kv_cache_memory",
           "cpu_has_native_bf16", "format_bytes", "DTYPES"]

log = logging.getLogger("aquilachat.memory")

#: Interpreter + torch + tokenizers + allocator slack on the CPU (a process that imported torch and
#: loaded the 100k Aquila tokenizer holds about 0.35 GB before any weight).
CPU_OVERHEAD_BYTES = 512 * 2**20
#: The CUDA context and cuBLAS workspaces take device memory before any tensor.
CUDA_OVERHEAD_BYTES = 1024 * 2**20
#: Share of the left-over memory the KV cache takes when no ``kv_cache_memory`` is given (the rest
#: stays for the system and other processes; vLLM's default ``gpu_memory_utilization`` is 0.9).
DEFAULT_KV_FRACTION = 0.9
#: Slots the engine runs at once when nothing else is asked (lowered to what fits).
DEFAULT_MAX_NUM_SEQS = 16
#: A context window the plan shortens (because the cache cannot hold the model's full one) is
#: rounded down to a multiple of this, and never below it.
MIN_MODEL_LEN = 256
#: Query rows per attention block in the workspace bound (see :func:`workspace_bytes`).
ATTENTION_BLOCK = 256

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class MemoryPlanError(AquilaChatError, MemoryError):
    """The model, its KV cache and workspace do not fit in the available memory (the message has
    the numbers and the options that would fit)."""


def format_bytes(n: float) -> str:
    """``14.6 GB`` (decimal units, as disk and checkpoint sizes are quoted)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- what is available
def _cgroup_free() -> int | None:
    """Bytes the process's cgroup may still use (limit - usage), or None without a limit."""
    try:
        rel = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in rel:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":  # cgroup v2
            candidates.append((Path("/sys/fs/cgroup") / parts[2].lstrip("/"), "memory.max", "memory.current"))
        elif len(parts) == 3 and "memory" in parts[1].split(","):  # v1
            candidates.append((Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/"),
                               "memory.limit_in_bytes", "memory.usage_in_bytes"))
    candidates += [(Path("/sys/fs/cgroup"), "memory.max", "memory.current"),
                   (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for base, limit_name, usage_name in candidates:
        try:
            limit = (base / limit_name).read_text().strip()
            usage = int((base / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    """Bytes available for a new model on ``device`` and where the figure comes from.

    CPU: ``MemAvailable`` from ``/proc/meminfo``, lowered to the cgroup limit minus its usage when
    there is a limit (outside Linux: ``os.sysconf`` physical pages). CUDA: free device memory.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    avail, source = None, "MemAvailable"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        avail, source = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    cg = _cgroup_free()
    if cg is not None and cg < avail:
        avail, source = cg, "the cgroup memory limit"
    return avail, source


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX512_BF16 or AMX tiles (as torch's cpuinfo
    reports them), so bfloat16 products need no conversion to float32 first."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a probe that fails means "not known to be native"
            pass
    return False


# ---------------------------------------------------------------------------- what is needed
def _linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """``(out, in)`` of every linear weight of one layer (q, k, v, o, gate, up, down)."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv, inter = config.num_key_value_heads * config.head_dim, config.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]


def quantized_linear_bytes(out_features: int, in_features: int, quantization: str, *,
                           group_size: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one ``[out, in]`` linear weight stored with weight-only ``quantization``, its
    scales (and zeros) in ``dtype``; ``group_size``: int4's (default: the quantizer's).

    The formats and their sizes are the quantizer's (:mod:`aquilachat.quantization`, which
    exposes ``METHODS`` and ``weight_bytes(out, in, method)``).

    Raises:
        ConfigError: an unknown quantization method, or none available in this installation.
    """
    if quantization not in quantization_methods():
        raise ConfigError(f"unknown quantization {quantization!r}"
                          + (f"; use one of {', '.join(quantization_methods())}" if quantization_methods()
                             else "; this installation has no weight-only quantization"))
    from . import quantization as q
    return q.weight_bytes(out_features, in_features, quantization, group_size=group_size, dtype=dtype)


def quantization_methods() -> tuple[str, ...]:
    """The weight-only quantization methods this installation can load (``()`` if none)."""
    try:
        from . import quantization as q
    except ImportError:
        return ()
    return tuple(q.METHODS)


def weight_bytes(config: ModelConfig, dtype: torch.dtype, quantization: str | None = None,
                 group_size: int | None = None) -> int:
    """Bytes of all the model's weights at ``dtype`` (tied embeddings once). With a weight-only
    ``quantization``, the linears it converts (:func:`aquilachat.quantization.quantize_plan`: the
    decoder's, and an untied ``lm_head`` in int8) count at their quantized size with scales in
    ``dtype``; the embedding table and the norms stay at ``dtype``.

    Raises:
        ConfigError: an unknown method or group size, or a weight the int4 kernel cannot take.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    h = config.hidden_size
    norms = (2 * config.num_hidden_layers + 1) * h
    if not quantization:
        emb = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
        linear = sum(out_f * in_f for out_f, in_f in _linear_shapes(config))
        return (emb + norms + config.num_hidden_layers * linear) * itemsize
    quantized_linear_bytes(1, 1, quantization)  # the ConfigError of an unknown method
    from . import quantization as q
    plan = q.quantize_plan(config, q.QuantizationConfig.for_model(config, quantization, group_size))
    shapes = dict(zip(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      _linear_shapes(config)))
    shapes["lm_head"] = (config.vocab_size, h)
    total = (config.vocab_size * h + norms) * itemsize  # the embedding table, the norms
    if not config.tie_word_embeddings and "lm_head" not in plan:
        total += config.vocab_size * h * itemsize
    for name, (method, group) in plan.items():
        out_f, in_f = shapes[name.rpartition(".")[2]]
        total += q.weight_bytes(out_f, in_f, method, group_size=group, dtype=dtype)
    return total


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values of one token in every layer (the unit of the KV cache)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * itemsize


def workspace_bytes(config: ModelConfig, dtype: torch.dtype, *, num_slots: int, max_model_len: int,
                    max_num_batched_tokens: int) -> int:
    """Activation and logits memory of the largest engine step (an upper bound, see the module
    docstring): a prefill of ``max_num_batched_tokens`` tokens (each at most ``max_model_len``
    long) and a decode step over ``num_slots`` rows.

    Attention goes through ``scaled_dot_product_attention``, whose CPU kernel works in blocks and
    never holds a whole ``[heads, T, S]`` score matrix (measured: a 2048-token prefill at 32 heads
    of 128 adds under 40 MB); the bound counts blocks of :data:`ATTENTION_BLOCK` queries.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = max_num_batched_tokens
    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    # one layer at a time: residual, norm output, q/k/v, attention output, gate/up and their
    # product, each with one temporary
    hidden = 2 * n * (3 * h + q + 2 * kv + 3 * inter) * itemsize
    scores = 2 * config.num_attention_heads * min(n, ATTENTION_BLOCK) * max_model_len * 4 + n * max_model_len
    # logits [rows, vocab] fp32 for prefill and decode rows + sampling's probability/sort buffers
    logits = 5 * max(num_slots, 1) * config.vocab_size * 4
    return hidden + scores + logits


# ---------------------------------------------------------------------------- sizes from the user
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_kv_cache_memory(value: str | int | float | None) -> tuple[int | None, float | None]:
    """``--kv-cache-memory`` -> ``(bytes, None)`` or ``(None, fraction)``.

    A size with a unit (``4GB``, ``4GiB``, ``512MiB``; decimal ``KB/MB/GB/TB``, binary
    ``KiB/MiB/GiB/TiB``) or a plain number above 1 is bytes; a plain number in ``(0, 1]`` is the
    fraction of the memory left after weights, workspace and overhead.

    Raises:
        ConfigError: anything else, naming the value.
    """
    if value is None:
        return None, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text, number, unit = str(value), float(value), ""
    else:
        m = _SIZE.match(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"kv_cache_memory: {value!r} is not a size (e.g. 4GB, 512MiB) or a fraction in (0, 1]")
        text, number, unit = str(value), float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"kv_cache_memory must be > 0, got {text!r}")
    if unit == "" and number <= 1:
        return None, number
    return int(number * _UNITS[unit]), None


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """Sizes decided before loading (bytes unless stated). ``dtype`` is the run dtype (weights,
    activations and KV cache; quantized linear weights are stored in their own format)."""

    device: str
    dtype: str
    quantization: str | None
    weight_bytes: int
    kv_cache_bytes: int
    num_slots: int
    max_model_len: int
    max_num_batched_tokens: int
    workspace_bytes: int
    overhead_bytes: int
    available_bytes: int
    available_source: str
    dtype_reason: str = ""
    group_size: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.workspace_bytes + self.overhead_bytes

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def summary(self) -> str:
        """One line for logs: weights, KV cache, slots x tokens, workspace, dtype, device."""
        q = f" {self.quantization}" if self.quantization else ""
        q += f" group {self.group_size}" if self.group_size else ""
        return (f"weights {format_bytes(self.weight_bytes)} ({self.dtype}{q}), KV cache "
                f"{format_bytes(self.kv_cache_bytes)} ({self.num_slots} slot{'s' if self.num_slots != 1 else ''} x "
                f"{self.max_model_len} tokens), "
                f"workspace {format_bytes(self.workspace_bytes)}, overhead {format_bytes(self.overhead_bytes)}; "
                f"{format_bytes(self.total_bytes)} of {format_bytes(self.available_bytes)} available "
                f"({self.available_source}) on {self.device}")

    def as_dict(self) -> dict:
        """JSON-ready (the server reports it on ``/health`` and ``/v1/models``)."""
        return {**asdict(self), "total_bytes": self.total_bytes}


def _default_group_size() -> int:
    from .quantization import DEFAULT_GROUP_SIZE
    return DEFAULT_GROUP_SIZE


def _overhead(device: torch.device) -> int:
    return CUDA_OVERHEAD_BYTES if device.type == "cuda" else CPU_OVERHEAD_BYTES


def choose_dtype(stored: torch.dtype, device: torch.device, *, fits_float32: bool,
                 native_bf16: bool | None = None, quantization: str | None = None) -> tuple[torch.dtype, str]:
    """The run dtype for ``dtype="auto"`` and why (module docstring). ``fits_float32``: whether
    the plan fits at float32; ``native_bf16`` (default: :func:`cpu_has_native_bf16`). With a
    weight-only ``quantization`` the activations run in bfloat16 on the CPU: torch's int8/int4
    kernels have vectorized bfloat16 paths, and float32 input takes their reference loops (60-100x
    slower, bench/quantization_speed.py)."""
    if quantization is not None and device.type == "cpu":
        return torch.bfloat16, (f"{quantization} weights: torch's weight-only kernels are fast with bfloat16 "
                                "activations")
    if device.type != "cpu" or stored != torch.float16:
        return stored, f"the checkpoint's dtype ({dtype_name(stored)})"
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    if native_bf16:
        return torch.bfloat16, "float16 checkpoint; this CPU computes bfloat16 natively (AVX512_BF16/AMX)"
    if fits_float32:
        return torch.float32, "float16 checkpoint; no native bfloat16 on this CPU and float32 fits"
    return torch.bfloat16, "float16 checkpoint; float32 does not fit in memory, bfloat16 does"


def plan_memory(config: ModelConfig, *, device: torch.device | str = "cpu", dtype: str | torch.dtype = "auto",
                quantization: str | None = None, group_size: int | None = None, max_num_seqs: int | None = None,
                max_model_len: int | None = None, kv_cache_memory: str | int | float | None = None,
                max_num_batched_tokens: int | None = None, available: int | None = None,
                native_bf16: bool | None = None, what: str = "the model", engine: bool = True) -> MemoryPlan:
    """Decide dtype, slots and context window for ``config`` on ``device`` and check they fit.

    Args:
        dtype: ``"auto"`` (see :func:`choose_dtype`) or a dtype / its name.
        quantization: weight-only method (:func:`quantization_methods`) or None; it runs on the
            CPU, and with ``dtype="auto"`` in bfloat16 (:func:`choose_dtype`).
        group_size: int4's group size (default: the quantizer's).
        max_num_seqs: upper bound on slots (default :data:`DEFAULT_MAX_NUM_SEQS`); lowered to fit.
        max_model_len: tokens per slot (default: the model's context; shortened to fit only when
            not given).
        kv_cache_memory: KV cache budget, see :func:`parse_kv_cache_memory`. A size is a request:
            the cache takes what the slots need up to it, and a size that cannot fit is an error.
            A fraction, or nothing (:data:`DEFAULT_KV_FRACTION`), is a share of what is left after
            weights, workspace and overhead.
        max_num_batched_tokens: most prompt tokens one prefill step takes (default:
            ``max(max_model_len, 2048)``).
        available: bytes available (default :func:`available_memory`; tests inject it).
        native_bf16: whether the CPU computes bfloat16 natively (default: detected).
        what: how the error names the model (its path).
        engine: False plans the weights alone (no KV cache, no workspace: conversion, training's
            own plan, evaluation by forward passes).

    Raises:
        MemoryPlanError: weights + workspace + overhead + one slot do not fit, or an explicit
            budget / context window cannot be met; the message gives the numbers and options.
        ConfigError: an unknown dtype or quantization, a bad ``kv_cache_memory``, or a value < 1.
    """
    device = torch.device(device)
    for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if max_model_len is not None and max_model_len > config.max_position_embeddings:
        raise ConfigError(f"max_model_len {max_model_len} is larger than the model's context window "
                          f"({config.max_position_embeddings} tokens, max_position_embeddings in config.json)")
    if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if quantization is not None:
        if quantization not in quantization_methods():
            quantized_linear_bytes(1, 1, quantization)  # raises the ConfigError naming the methods
        if device.type != "cpu":
            raise ConfigError(f"quantization {quantization!r} runs on the CPU only (torch's _weight_int8pack_mm / "
                              f"_weight_int4pack_mm_for_cpu kernels); use --device cpu")
        weight_bytes(config, torch.bfloat16, quantization, group_size)  # a shape the kernels refuse: ConfigError
    kv_budget = parse_kv_cache_memory(kv_cache_memory)
    if available is None:
        available, source = available_memory(device)
    else:
        source = "given"
    planner = _Planner(config, device, available, source, engine=engine, batched=max_num_batched_tokens,
                       group_size=group_size)
    cap = max_num_seqs or DEFAULT_MAX_NUM_SEQS
    if dtype == "auto":
        stored = DTYPES.get(str(config.torch_dtype), torch.float32)
        fits32 = True
        if device.type == "cpu" and stored == torch.float16:
            # float32 "fits" only with one slot of the whole window: a shortened window is worse
            # than bfloat16's rounding
            fits32 = planner.fits(torch.float32, quantization, 1, max_model_len or config.max_position_embeddings,
                                  kv_budget)
        run_dtype, reason = choose_dtype(stored, device, fits_float32=fits32, native_bf16=native_bf16,
                                         quantization=quantization)
    else:
        run_dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]
        reason = "asked for"
    try:
        plan = planner.build(run_dtype, quantization, cap, max_model_len, kv_budget)
    except _NoFit as nofit:
        raise MemoryPlanError(planner.explain(nofit.plan, what, run_dtype, quantization, cap, max_model_len,
                                              kv_budget)) from None
    plan = replace(plan, dtype_reason=reason)
    if engine:
        if plan.num_slots < cap and max_num_seqs is not None:
            log.warning("max_num_seqs lowered from %d to %d: the KV cache budget holds %d slots of %d tokens",
                        cap, plan.num_slots, plan.num_slots, plan.max_model_len)
        elif plan.num_slots < cap:
            log.info("max_num_seqs %d (of at most %d): what the KV cache budget holds at %d tokens each",
                     plan.num_slots, cap, plan.max_model_len)
        if max_model_len is None and plan.max_model_len < config.max_position_embeddings:
            log.warning("context window shortened to %d tokens (the model has %d): a longer one does not fit; "
                        "see --kv-cache-memory", plan.max_model_len, config.max_position_embeddings)
    return plan


class _NoFit(Exception):
    """Internal: the smallest plan of a setting, which does not fit."""

    def __init__(self, plan: MemoryPlan) -> None:
        super().__init__()
        self.plan = plan


class _Planner:
    """The arithmetic of :func:`plan_memory` for one model, device and available memory."""

    def __init__(self, config: ModelConfig, device: torch.device, available: int, source: str, *,
                 engine: bool, batched: int | None, group_size: int | None = None) -> None:
        self.config, self.device, self.available, self.source = config, device, available, source
        self.engine, self.batched, self.overhead = engine, batched, _overhead(device)
        self.group_size = group_size
        self._weights: dict = {}

    def weight_bytes(self, dtype, quantization) -> int:
        """:func:`weight_bytes` (cached per dtype and method; the group size applies to int4)."""
        key = (dtype, quantization)
        if key not in self._weights:
            self._weights[key] = weight_bytes(self.config, dtype, quantization,
                                              self.group_size if quantization == "int4" else None)
        return self._weights[key]

    def _plan(self, dtype, quantization, slots: int, length: int) -> MemoryPlan:
        per_token = kv_bytes_per_token(self.config, dtype)
        batched = min(self.batched or max(length, 2048), slots * length) if self.engine else 0
        work = workspace_bytes(self.config, dtype, num_slots=slots, max_model_len=length,
                               max_num_batched_tokens=batched) if self.engine else 0
        return MemoryPlan(device=str(self.device), dtype=dtype_name(dtype), quantization=quantization,
                          group_size=(self.group_size or _default_group_size()) if quantization == "int4" else None,
                          weight_bytes=self.weight_bytes(dtype, quantization),
                          kv_cache_bytes=slots * length * per_token, num_slots=slots, max_model_len=length,
                          max_num_batched_tokens=batched, workspace_bytes=work, overhead_bytes=self.overhead,
                          available_bytes=self.available, available_source=self.source)

    def _ok(self, plan: MemoryPlan, kv_budget: tuple[int | None, float | None]) -> bool:
        if plan.total_bytes > self.available:
            return False
        size, fraction = kv_budget
        if size is not None:
            return plan.kv_cache_bytes <= size
        spare = self.available - plan.total_bytes + plan.kv_cache_bytes  # what the cache may take
        return plan.kv_cache_bytes <= spare * (fraction if fraction is not None else DEFAULT_KV_FRACTION)

    def build(self, dtype, quantization, cap: int, model_len: int | None,
              kv_budget: tuple[int | None, float | None]) -> MemoryPlan:
        """The largest plan (most slots of the whole window, else one slot of the longest window
        that fits when ``model_len`` is not fixed); raises _NoFit with the smallest one."""
        full = model_len or self.config.max_position_embeddings
        if not self.engine:
            plan = self._plan(dtype, quantization, 0, full)
            if plan.total_bytes > self.available:
                raise _NoFit(plan)
            return plan
        size = kv_budget[0]
        if size is not None:  # a requested size: the slots it holds, and it must fit
            slots = min(cap, size // (full * kv_bytes_per_token(self.config, dtype)))
            if slots >= 1:
                plan = self._plan(dtype, quantization, slots, full)
                if plan.total_bytes <= self.available:
                    return plan
                raise _NoFit(plan)
        else:
            for slots in range(cap, 0, -1):
                plan = self._plan(dtype, quantization, slots, full)
                if self._ok(plan, kv_budget):
                    return plan
        if model_len is None:  # not even one slot of the model's whole context: shorten the window
            for length in range((full - 1) // MIN_MODEL_LEN * MIN_MODEL_LEN, MIN_MODEL_LEN - 1, -MIN_MODEL_LEN):
                plan = self._plan(dtype, quantization, 1, length)
                if self._ok(plan, kv_budget):
                    return plan
        raise _NoFit(self._plan(dtype, quantization, 1, model_len or min(full, MIN_MODEL_LEN)))

    def fits(self, dtype, quantization, cap, model_len, kv_budget) -> bool:
        try:
            self.build(dtype, quantization, cap, model_len, kv_budget)
        except _NoFit:
            return False
        return True

    def explain(self, plan: MemoryPlan, what: str, dtype, quantization, cap: int, model_len: int | None,
                kv_budget: tuple[int | None, float | None]) -> str:
        """The one-line error: what is needed at each dtype, what is available, and the options
        that would fit (each one checked by planning with it)."""
        q = f" {quantization}" if quantization else ""
        needs = [f"needs {format_bytes(plan.total_bytes)} as {plan.dtype}{q} (weights "
                 f"{format_bytes(plan.weight_bytes)}"
                 + (f", KV cache {format_bytes(plan.kv_cache_bytes)} for {plan.num_slots} x {plan.max_model_len} "
                    f"tokens, workspace {format_bytes(plan.workspace_bytes)}" if self.engine else "")
                 + f", overhead {format_bytes(plan.overhead_bytes)})"]
        options = []
        for alt in (torch.bfloat16, torch.float32):
            if alt != dtype:
                try:
                    smallest = self.build(alt, quantization, 1, model_len, kv_budget)
                    if alt.itemsize < dtype.itemsize:
                        options.append(f"--dtype {dtype_name(alt)}")
                except _NoFit as other:
                    smallest = other.plan
                needs.append(f"{format_bytes(smallest.total_bytes)} as {dtype_name(alt)}{q}")
        for method in quantization_methods() if self.device.type == "cpu" else ():
            try:
                fits = method != quantization and self.fits(torch.bfloat16, method, cap, model_len, kv_budget)
            except ConfigError:  # a width the method's kernel cannot take
                fits = False
            if fits:
                options.append(f"--quantization {method} ({format_bytes(self.weight_bytes(torch.bfloat16, method))} "
                               "of weights in bfloat16)")
        if self.engine:
            if model_len is not None:
                for length in range((model_len - 1) // MIN_MODEL_LEN * MIN_MODEL_LEN, 0, -MIN_MODEL_LEN):
                    if self.fits(dtype, quantization, cap, length, kv_budget):
                        options.append(f"--max-model-len {length}")
                        break
            if kv_budget[0] is not None:
                per_slot = (model_len or self.config.max_position_embeddings) * kv_bytes_per_token(self.config, dtype)
                for slots in range(min(cap, kv_budget[0] // per_slot) - 1, 0, -1):
                    if self.fits(dtype, quantization, slots, model_len, (slots * per_slot, None)):
                        options.append(f"--kv-cache-memory {format_bytes(slots * per_slot).replace(' ', '')}")
                        break
        text = (f"not enough memory for {what}: " + ", ".join(needs) + f"; {format_bytes(self.available)} "
                f"available ({self.source})")
        return text + (". Options that fit: " + ", ".join(dict.fromkeys(options)) if options
                       else ". Nothing smaller fits on this device: free memory or use a machine with more")


# ---------------------------------------------------------------------------- training
#: Values one decoder layer keeps per token for the backward pass, as multiples of the hidden size
#: h, the attention widths q and kv, and the MLP width: the norm inputs and outputs (4h), the
#: residual (h), q/k/v and the rotated q/k (2q + 3kv), the attention and o_proj inputs (2q), gate,
#: up, silu(gate), their product and the down_proj input (5 inter). Attention goes through
#: scaled_dot_product_attention's fused kernel, so no [heads, T, T] scores are kept (the term
#: 5as/h of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
#: Models", vanishes).
def _layer_activation_values(config: ModelConfig) -> int:
    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return 5 * h + 4 * q + 3 * kv + 5 * inter


def lora_parameters(config: ModelConfig, r: int, targets: list[str] | tuple[str, ...]) -> int:
    """Parameters of LoRA adapters of rank ``r`` on the named linear modules of every layer
    (``r * (in + out)`` each: Hu et al. 2021, "LoRA")."""
    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    return config.num_hidden_layers * per_layer


def activation_bytes(config: ModelConfig, *, tokens: int, gradient_checkpointing: bool, bf16: bool) -> int:
    """Activation memory of one micro-batch of ``tokens`` tokens in training: every layer's saved
    values (:func:`_layer_activation_values`), or with gradient checkpointing only each layer's
    fp32 input plus one layer recomputed; plus fp32 logits and their gradient over the tokens."""
    itemsize = 2 if bf16 else 4
    per_layer = tokens * _layer_activation_values(config) * itemsize
    if gradient_checkpointing:
        layers = config.num_hidden_layers * tokens * config.hidden_size * 4 + per_layer
    else:
        layers = config.num_hidden_layers * per_layer
    return layers + 2 * tokens * config.vocab_size * 4


@dataclass(frozen=True)
class TrainingPlan:
    """Memory of one training rank (bytes): fp32 master weights, gradients and AdamW's two
    moments of the trainable parameters (sharded over the ranks with FSDP2, plus one gathered
    layer), activations of one micro-batch, fixed overhead."""

    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    overhead_bytes: int
    available_bytes: int
    available_source: str
    world_size: int
    strategy: str

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes
                + self.overhead_bytes)

    def summary(self) -> str:
        return (f"{format_bytes(self.total_bytes)} per rank (weights {format_bytes(self.weight_bytes)}, gradients "
                f"{format_bytes(self.gradient_bytes)}, AdamW state {format_bytes(self.optimizer_bytes)}, activations "
                f"{format_bytes(self.activation_bytes)}, overhead {format_bytes(self.overhead_bytes)}) of "
                f"{format_bytes(self.available_bytes)} available ({self.available_source}), {self.strategy} over "
                f"{self.world_size} rank{'s' if self.world_size != 1 else ''}")


def plan_training(config: ModelConfig, *, batch_size: int, seq_len: int, lora_r: int | None = None,
                  lora_targets: list[str] | tuple[str, ...] = (), strategy: str = "single", world_size: int = 1,
                  ranks_per_node: int = 1, gradient_checkpointing: bool = False, bf16: bool = False,
                  device: torch.device | str = "cpu", available: int | None = None,
                  what: str = "the model") -> TrainingPlan:
    """Plan one training rank (``aquilachat sft`` / ``pretrain`` check it before the model is
    built) and check it fits.

    Args:
        batch_size, seq_len: the micro-batch (``batch_size`` rows of ``seq_len`` tokens).
        lora_r, lora_targets: LoRA adapters (None: all weights train).
        strategy: ``single``, ``ddp`` (a full replica per rank; DDP's gradient buckets are a
            second copy of the gradients) or ``fsdp`` (weights, gradients and optimizer state
            sharded over ``world_size`` ranks).
        ranks_per_node: processes sharing this machine's memory on the CPU (each gets its share).
        available: bytes available to the node (default :func:`available_memory`).

    Raises:
        MemoryPlanError: it does not fit; the message gives the numbers and which of LoRA, a
            smaller batch, gradient checkpointing or more ranks (FSDP2) would fit.
    """
    device = torch.device(device)
    if available is None:
        available, source = available_memory(device)
    else:
        source = "given"
    if device.type == "cpu" and ranks_per_node > 1:
        available, source = available // ranks_per_node, f"{source}, shared by {ranks_per_node} ranks"

    def build(batch: int, lora: int | None, strat: str, ranks: int, checkpointing: bool) -> TrainingPlan:
        params = config.num_parameters()
        trainable = lora_parameters(config, lora, lora_targets) if lora else params
        shard = ranks if strat == "fsdp" else 1
        layer = params // max(config.num_hidden_layers, 1) if strat == "fsdp" else 0
        weights = 4 * (params + (trainable if lora else 0)) // shard + 4 * layer
        grads = 4 * trainable // shard * (2 if strat == "ddp" else 1)
        return TrainingPlan(weight_bytes=weights, gradient_bytes=grads, optimizer_bytes=8 * trainable // shard,
                            activation_bytes=activation_bytes(config, tokens=batch * seq_len,
                                                              gradient_checkpointing=checkpointing, bf16=bf16),
                            overhead_bytes=_overhead(device), available_bytes=available, available_source=source,
                            world_size=ranks, strategy=strat)

    plan = build(batch_size, lora_r, strategy, world_size, gradient_checkpointing)
    if plan.total_bytes <= available:
        return plan
    options = []

    def first_fit(desc: str, batch: int, lora: int | None, strat: str, ranks: int) -> bool:
        """Add the option (with gradient checkpointing too if it needs it); whether it fits."""
        for checkpointing in dict.fromkeys((gradient_checkpointing, True)):
            p = build(batch, lora, strat, ranks, checkpointing)
            if p.total_bytes <= available:
                extra = (", gradient_checkpointing: true" if checkpointing and not gradient_checkpointing
                         and "gradient_checkpointing" not in desc else "")
                options.append(f"{desc}{extra} ({format_bytes(p.total_bytes)} per rank)")
                return True
        return False

    if lora_r is None:
        first_fit("lora: true (lora_r 8)", batch_size, 8, strategy, world_size)
    if not gradient_checkpointing:
        first_fit("gradient_checkpointing: true", batch_size, lora_r, strategy, world_size)
    for batch in range(batch_size - 1, 0, -1):
        if first_fit(f"batch_size: {batch} and more gradient_accumulation_steps", batch, lora_r, strategy,
                     world_size):
            break
    for ranks in (2, 4, 8, 16, 32, 64, 128, 256):
        if not (ranks <= world_size and strategy == "fsdp") and first_fit(
                f"strategy: fsdp over {ranks} ranks of this memory each (--nproc-per-node, --hostfile)",
                batch_size, lora_r, "fsdp", ranks):
            break
    text = f"not enough memory to train {what}: needs {plan.summary()}"
    return_text = text + (". Options that fit: " + "; ".join(options) if options else
                          ". None of LoRA, a smaller batch, gradient checkpointing or up to 256 FSDP2 ranks "
                          "fits: use machines with more memory")
    raise MemoryPlanError(return_text)
