"""The Aquila / LLaMA decoder, with Hugging Face parameter names and a KV cache owned outside it.

Parameter names are those of transformers' ``modeling_llama.py`` (``model.embed_tokens``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``), so a Hugging Face
checkpoint's state dict loads with no rename table and ours loads in ``LlamaForCausalLM``.

Numerics follow ``modeling_llama.py``: RMSNorm in fp32 (Zhang & Sennrich 2019), rotary embedding
(Su et al. 2021, "RoFormer") in the ``rotate_half`` layout computed once per forward in fp32,
SwiGLU MLP (Shazeer 2020), attention through ``torch.nn.functional.scaled_dot_product_attention``.
Logits are returned in fp32 whatever the weight dtype.

The KV cache (:class:`KVCache`) is preallocated and written by index at the positions the caller
passes; the model never advances it. The engine decides which cache slot and positions each
row uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import cpu_blas
from .config import ModelConfig

__all__ = ["AquilaForCausalLM", "KVCache", "Linear", "RMSNorm", "rotary_cos_sin", "apply_rotary"]

# A weight at least this large (elements) takes the split matrix product for a few rows (Linear):
# measured on 2 cores with weights cold in cache, one row, 2 threads: 448 x 448 136 vs 150 us,
# 256 x 256 73 vs 63 us (split vs plain).
SPLIT_LINEAR_MIN_ELEMENTS = 1 << 17
# Largest number of rows (tokens in the batch) that take the split product.
SPLIT_LINEAR_MAX_ROWS = 32


def linear_no_bias(x: torch.Tensor, weight: torch.Tensor, split: bool = False) -> torch.Tensor:
    """``x @ weight.T`` for ``x [..., in]`` and ``weight [out, in]`` -> ``[..., out]``.

    ``split`` marks a large weight stored column-major (``weight.t()`` contiguous, ``[in, out]``;
    see :meth:`AquilaForCausalLM.prepare_for_cpu_decode`). For at most
    :data:`SPLIT_LINEAR_MAX_ROWS` rows such a product then runs:

    * with ``k > 1`` torch threads, in fp32 (low-precision partial sums would be rounded twice),
      as ``k`` partial products over slices of the input dimension in one batched matrix
      multiply, summed (split-K): ``y = sum_c x[:, c] @ W^T[c]``. BLAS runs
      a matrix-vector product on one thread; the batched product runs the ``k`` slices on ``k``
      threads (measured on 2 cores: 13.7 -> 9.4 ms for a 100008 x 448 output projection at one
      row, 63 -> 35 ms at 8 rows);
    * with one torch thread, in fp32 without autograd, through numpy's OpenBLAS when
      :func:`aquilachat.cpu_blas.enable` found it (its few-row kernels are up to 2x faster than
      MKL's here: see :mod:`aquilachat.cpu_blas`; with two threads split-K was as fast or faster
      at 8 and 16 rows, so OpenBLAS is kept to the one-thread case).

    Results equal ``F.linear`` up to summation order (~1e-6 relative in fp32).
    """
    if split:
        out_features, in_features = weight.shape
        rows = x.numel() // in_features
        wt = weight.t()  # [in, out], contiguous when the weight is stored column-major
        if rows <= SPLIT_LINEAR_MAX_ROWS and wt.is_contiguous():
            k = torch.get_num_threads()
            if k == 1 and cpu_blas.enabled() and x.dtype == torch.float32 == weight.dtype \
                    and x.device.type == "cpu" and not torch.is_grad_enabled():
                return cpu_blas.matmul(x.reshape(rows, in_features), wt).view(*x.shape[:-1], out_features)
            if k > 1 and in_features % k == 0 and x.dtype == torch.float32:
                x2 = x.reshape(rows, k, in_features // k).transpose(0, 1)  # [k, rows, in/k]
                parts = torch.bmm(x2, wt.view(k, in_features // k, out_features))  # [k, rows, out]
                y = torch.add(parts[0], parts[1])  # 2-3x faster than parts.sum(0) (a strided reduction)
                for i in range(2, k):
                    y += parts[i]
                return y.view(*x.shape[:-1], out_features)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose product switches to
    :func:`linear_no_bias`'s split form when ``split_rows`` is set (by
    :meth:`AquilaForCausalLM.prepare_for_cpu_decode`, for large weights).

    Input ``[..., in]``, output ``[..., out]``.
    """

    split_rows: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return linear_no_bias(x, self.weight, self.split_rows)
        return F.linear(x, self.weight, self.bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`RMSNorm` as a function (also used by the decode plan): ``x [..., hidden]``
    normalised in fp32, cast back to ``x``'s dtype, then scaled by ``weight`` (as
    ``LlamaRMSNorm``)."""
    dtype = x.dtype
    x32 = x if dtype == torch.float32 else x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (y if dtype == torch.float32 else y.to(dtype))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 and cast back (as ``LlamaRMSNorm``).

    ``y = weight * (x / sqrt(mean(x^2) + eps))``; input and output ``[..., hidden]``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.variance_epsilon)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` ``[B, T]`` (int): ``cos, sin`` each ``[B, T, head_dim]``.

    Computed in fp32 and cast to ``dtype`` (as ``LlamaRotaryEmbedding``), in the ``rotate_half``
    layout: frequency ``i`` appears at columns ``i`` and ``i + head_dim / 2``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .to(torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by the tables ``cos, sin`` ``[B, T, D]`` (rotate_half layout)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D) broadcast over heads
    return x * cos + _rotate_half(x) * sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` for ``x [B, T, heads, D]`` and tables ``[B, T, 1, D]`` (broadcast over
    heads) where ``signed_sin = cat(-sin[:D/2], sin[D/2:])``: ``rotate_half(x) * sin`` equals
    ``roll(x, D/2) * signed_sin`` element for element (a sign moved between exact factors), so
    the result is bit-identical in 4 ops instead of 8."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


@dataclass
class KVCache:
    """Preallocated key/value cache for every layer, written by index.

    ``k[layer]`` and ``v[layer]`` are ``[num_slots, num_key_value_heads, max_seq_len, head_dim]``.
    A *slot* is one sequence's row; the engine assigns slots and positions, the model writes the
    keys/values of position ``p`` of the sequence in slot ``s`` at ``[s, :, p]`` and never moves
    anything. Entries beyond a sequence's current position may be stale (a previous occupant's);
    the causal mask built from positions hides them, so freeing a slot needs no clearing.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, config: ModelConfig, num_slots: int, max_seq_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """Zero-filled cache; memory is ``2 * layers * slots * kv_heads * max_seq_len * head_dim`` elements."""
        shape = (num_slots, config.num_key_value_heads, max_seq_len, config.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        return cls(k, v)

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        """Total cache size in bytes."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _fuse_column_major(linears: list[nn.Linear]) -> torch.Tensor:
    """Store the weights ``[out_i, in]`` of ``linears`` in one column-major ``[sum out_i, in]``
    tensor and make each module's weight a view of its rows (values and shapes unchanged);
    return the fused weight."""
    wt = torch.cat([m.weight.data.t() for m in linears], dim=1).contiguous()  # [in, sum out]
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = wt[:, start:start + n].t()
        start += n
    return wt.t()


def _global_hooks() -> bool:
    """Whether any forward hook is registered for all modules
    (``torch.nn.modules.module.register_module_forward_hook`` / ``..._pre_hook``)."""
    mod = torch.nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None))


class _Fused:
    """A weight fused from several :class:`Linear` modules for the decode path (not a parameter:
    the modules' own weights are views of it, so the state dict is unchanged). ``usable`` is False
    with autograd on, or once a module was replaced (e.g. wrapped by peft) or given other storage;
    the caller then runs the separate modules."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.weight = _fuse_column_major(linears)  # [sum out, in], column-major
        self.sizes = [m.weight.shape[0] for m in linears]
        self.ptrs = [m.weight.data_ptr() for m in linears]
        self.split = self.weight.numel() >= SPLIT_LINEAR_MIN_ELEMENTS

    def usable(self, linears: list[nn.Module]) -> bool:
        # the fused tensor is no parameter: with autograd on, the modules run (their gradients);
        # modules with forward hooks run too (the hooks would not see a fused product)
        return not torch.is_grad_enabled() and not _global_hooks() and all(
            type(m) is Linear and m.weight.data_ptr() == p and not (m._forward_hooks or m._forward_pre_hooks)
            and "forward" not in m.__dict__ for m, p in zip(linears, self.ptrs))

    def _backs(self, linears: list[nn.Module]) -> list[bool]:
        """Per module: whether its weight is still the view of the fused tensor."""
        return [getattr(m, "weight", None) is not None and m.weight.data_ptr() == ptr
                for m, ptr in zip(linears, self.ptrs)]

    def stale(self, linears: list[nn.Module]) -> bool:
        """Whether no module weight is a view of the fused tensor any more (e.g. after ``.to()``)."""
        return not any(self._backs(linears))

    def release(self, linears: list[nn.Module]) -> None:
        """Give each module still viewing the fused tensor its own dense copy of its weight (the
        parameter objects stay, so optimizers keep them). Optimizers with fused kernels treat a
        parameter as a dense block: on a view of the shared tensor they would write into its
        neighbours."""
        with torch.no_grad():
            for m, backed in zip(linears, self._backs(linears)):
                if backed:
                    m.weight.data = m.weight.data.t().contiguous().t()  # column-major, dense

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., sum out]``: the modules' outputs side by side."""
        return linear_no_bias(x, self.weight, self.split)


class Attention(nn.Module):
    """Grouped-query self-attention (Ainslie et al. 2023) with rotary positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(h, q, bias=False)
        self.k_proj = Linear(h, kv, bias=False)
        self.v_proj = Linear(h, kv, bias=False)
        self.o_proj = Linear(q, h, bias=False)
        self.fused_qkv: _Fused | None = None  # set by AquilaForCausalLM.prepare_for_cpu_decode

    def train(self, mode: bool = True) -> "Attention":
        if mode and self.fused_qkv is not None:
            self.fused_qkv.release([self.q_proj, self.k_proj, self.v_proj])
            self.fused_qkv = None
        return super().train(mode)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, cache_index: tuple | None,
                mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_qkv is not None and self.fused_qkv.usable(projs):
            qkv = self.fused_qkv.product(x)  # (B, T, (H + 2 Hkv) D): q and k rotate in one go
            qk = _rotate(qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
            v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
        else:
            q = _rotate(self.q_proj(x).view(B, T, H, D), cos, sin)  # (B, T, H, D)
            k = _rotate(self.k_proj(x).view(B, T, Hkv, D), cos, sin)  # (B, T, Hkv, D)
            v = self.v_proj(x).view(B, T, Hkv, D)
        q = q.transpose(1, 2)  # (B, H, T, D)
        gqa = Hkv != H
        if cache is None:
            # Whole sequences, no cache: plain causal attention (right padding never affects real tokens).
            out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=T > 1,
                                                 enable_gqa=gqa)
        else:
            k_cache, v_cache = cache
            # rows: slots (slice or [B]); flat_index [B * T * Hkv]; slot_ids [B]; positions [B, T]
            rows, flat_index, slot_ids, positions = cache_index
            if k.dtype != k_cache.dtype:  # (under autocast k and v can differ: both are checked)
                k = k.to(k_cache.dtype)
            if v.dtype != v_cache.dtype:
                v = v.to(v_cache.dtype)
            if k_cache.is_contiguous() and v_cache.is_contiguous():
                # (slot s, head h, position p) is row (s * Hkv + h) * S + p of the cache viewed as
                # [slots * Hkv * S, D]; sources in (b, t, h) order
                k_cache.view(-1, D).index_copy_(0, flat_index, k.reshape(-1, D))
                v_cache.view(-1, D).index_copy_(0, flat_index, v.reshape(-1, D))
            else:  # a cache built from views: indexed assignment, shape (B, T, Hkv, D)
                k_cache[slot_ids[:, None], :, positions] = k
                v_cache[slot_ids[:, None], :, positions] = v
            # (B, Hkv, S, D): views for a slice of slots, a gather for a slot tensor
            k_all, v_all = k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]
            if k_all.dtype != q.dtype:
                k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused_gate_up: _Fused | None = None  # set by AquilaForCausalLM.prepare_for_cpu_decode

    def train(self, mode: bool = True) -> "MLP":
        if mode and self.fused_gate_up is not None:
            self.fused_gate_up.release([self.gate_proj, self.up_proj])
            self.fused_gate_up = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projs = (self.gate_proj, self.up_proj)
        if self.fused_gate_up is not None and self.fused_gate_up.usable(projs):
            gate, up = self.fused_gate_up.product(x).split(self.fused_gate_up.sizes, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, cache_index, mask, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_index, mask, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class _DecodePlan:
    """The decoder layers' inference forward over a KV cache as one function over the layers'
    tensors (built by :meth:`AquilaForCausalLM.prepare_for_cpu_decode`).

    Same arithmetic as :meth:`DecoderLayer.forward` with fused q/k/v and gate/up products, minus
    what costs time when a step moves a few tokens: module calls, per-layer checks, 3-d
    reshapes around each product (hidden states stay ``[tokens, hidden]``; small products are one
    ``mm``, the residual add rides in ``addmm``). On a 2-core CPU a single-token step of a 4-layer,
    96-wide model went from ~2.4 to ~1.4 ms for the layers. Results equal the module path up to
    summation order (``addmm``).

    :meth:`usable` says whether the plan still describes the model: the same module and
    parameter objects in the same places, of the same classes, with no instance-level
    ``forward`` (accelerate's hooks) and no forward hooks (module or global), the weights at the
    same addresses (the fused ones still backing q/k/v and gate/up), autograd and autocast off,
    eval mode, a cache with the model's layer count, contiguous and of the model's dtype.
    Otherwise the model runs its modules (peft wrappers, hooks, training, gradients, other
    caches). A plan that no longer describes the model is dropped by ``train()``, ``.to()`` and
    an assigning ``load_state_dict`` (:meth:`AquilaForCausalLM._drop_stale_plan`).
    """

    @staticmethod
    def supports(model: "AquilaForCausalLM") -> bool:
        """Whether every layer is made of this module's own classes with fused weights in use."""
        def plain(layer: nn.Module) -> bool:
            attn, mlp = layer.self_attn, layer.mlp
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            return (type(layer) is DecoderLayer and type(attn) is Attention and type(mlp) is MLP
                    and attn.fused_qkv is not None and attn.fused_qkv.usable(projs)
                    and mlp.fused_gate_up is not None and mlp.fused_gate_up.usable((mlp.gate_proj, mlp.up_proj))
                    and all(type(m) is Linear and m.bias is None for m in projs + (attn.o_proj, mlp.down_proj))
                    and all(type(m) is RMSNorm for m in (layer.input_layernorm, layer.post_attention_layernorm)))
        return len(model.model.layers) > 0 and all(plain(layer) for layer in model.model.layers)

    def __init__(self, model: "AquilaForCausalLM") -> None:
        self.layers_list = model.model.layers
        self.num_layers = len(model.model.layers)
        # (parent._modules, name, child, its class, its __dict__, its forward hooks, its pre-hooks)
        self.checks: list[tuple[dict, str, nn.Module, type, dict, dict, dict]] = []
        self.params: list[tuple[dict, nn.Parameter, int | None]] = []  # (module._parameters, weight, ptr)
        self.layers = []
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for parent, names in ((self.layers_list, (str(i),)),
                                  (layer, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
                                  (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    child = parent._modules[name]
                    self.checks.append((parent._modules, name, child, type(child), child.__dict__,
                                        child._forward_hooks, child._forward_pre_hooks))
            # linear weights: the plan holds views of their storage (checked by address); the norm
            # weights are used as they are
            for mod in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                self.params.append((mod._parameters, mod.weight, mod.weight.data_ptr()))
            for mod in (layer.input_layernorm, layer.post_attention_layernorm):
                self.params.append((mod._parameters, mod.weight, None))
            fused_qkv, fused_gu = attn.fused_qkv, mlp.fused_gate_up
            self.layers.append((layer.input_layernorm, _Product(fused_qkv.weight, fused_qkv.split),
                                _Product(attn.o_proj.weight.detach(), attn.o_proj.split_rows),
                                layer.post_attention_layernorm, _Product(fused_gu.weight, fused_gu.split),
                                fused_gu.sizes[0], _Product(mlp.down_proj.weight.detach(), mlp.down_proj.split_rows)))
        self.heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        self.dtype = model.dtype

    def describes(self, model: "AquilaForCausalLM") -> bool:
        """The structural part of :meth:`usable`: same modules (objects, classes, no instance
        ``forward`` such as accelerate's hooks set, no forward hooks), same parameters at the same
        addresses."""
        if len(self.layers_list) != self.num_layers or model.model._modules.get("layers") is not self.layers_list \
                or _global_hooks():
            return False
        for modules, name, child, cls, attrs, hooks, pre_hooks in self.checks:
            if modules.get(name) is not child or type(child) is not cls or "forward" in attrs or hooks \
                    or pre_hooks or child._forward_hooks is not hooks or child._forward_pre_hooks is not pre_hooks:
                return False
        for params, weight, ptr in self.params:
            if params.get("weight") is not weight or params.get("bias") is not None or (
                    ptr is not None and weight.data_ptr() != ptr):
                return False
        return True

    def usable(self, model: "AquilaForCausalLM", cache: "KVCache") -> bool:
        """Whether :meth:`run` may replace the layers' modules for a forward over ``cache``."""
        if torch.is_grad_enabled() or model.training or torch.is_autocast_enabled(model.device.type) \
                or not len(cache.k) == len(cache.v) == self.num_layers:
            return False
        return self.describes(model) and all(t.dtype == self.dtype and t.is_contiguous() for t in cache.k + cache.v)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache",
            cache_index: tuple, mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        """``x [B, T, hidden]`` after every layer (as the loop over :class:`DecoderLayer` in
        :meth:`AquilaForCausalLM.forward_hidden`); writes the keys/values into ``cache``."""
        B, T, hidden = x.shape
        H, Hkv, D = self.heads
        nq, nqk = H * D, (H + Hkv) * D
        rows, flat_index = cache_index[0], cache_index[1]
        x = x.reshape(B * T, hidden)
        for (norm1, qkv_proj, o_proj, norm2, gate_up_proj, inter, down_proj), k_cache, v_cache in zip(
                self.layers, cache.k, cache.v):
            qkv = qkv_proj(_rms_norm(x, norm1.weight, norm1.variance_epsilon))
            qk = qkv[:, :nqk].view(B, T, H + Hkv, D)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)  # _rotate
            k_cache.view(-1, D).index_copy_(0, flat_index, qk[:, :, H:].reshape(-1, D))
            v_cache.view(-1, D).index_copy_(0, flat_index, qkv[:, nqk:].reshape(-1, D))
            out = F.scaled_dot_product_attention(qk[:, :, :H].transpose(1, 2), k_cache[rows, :, :kv_len],
                                                 v_cache[rows, :, :kv_len], attn_mask=mask, enable_gqa=Hkv != H)
            x = o_proj(out.transpose(1, 2).reshape(B * T, nq), residual=x)
            gate_up = gate_up_proj(_rms_norm(x, norm2.weight, norm2.variance_epsilon))
            x = down_proj(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), residual=x)
        return x.view(B, T, hidden)


class _Product:
    """``x [N, in] @ weight.T`` (+ ``residual [N, out]``) for a decode plan: large weights through
    :func:`linear_no_bias`'s split products, others as one ``mm`` / ``addmm`` on the transposed
    view made once."""

    __slots__ = ("weight", "wt", "split")

    def __init__(self, weight: torch.Tensor, split: bool) -> None:
        self.weight, self.wt, self.split = weight, weight.t(), split

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.split:
            y = linear_no_bias(x, self.weight, True)
            return y if residual is None else residual + y
        return torch.mm(x, self.wt) if residual is None else torch.addmm(residual, x, self.wt)


class AquilaModel(nn.Module):
    """Embedding, decoder layers and final norm (``LlamaModel``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def _drop_stale_plan_after_load(model: "AquilaForCausalLM", incompatible_keys) -> None:
    """``load_state_dict`` post-hook (a module-level function, so the model still pickles)."""
    model._drop_stale_plan()


class AquilaForCausalLM(nn.Module):
    """The decoder with its language-model head; state dict keys equal ``LlamaForCausalLM``'s.

    ``forward(input_ids [B, T])`` returns logits ``[B, T, vocab]`` in fp32. With a
    :class:`KVCache`, ``positions [B, T]`` and ``slots [B]`` say where each token's keys and values
    are written; attention then covers cache positions ``0 .. kv_len - 1`` with a causal mask built
    from ``positions`` (key ``j`` is visible to a query at position ``p`` iff ``j <= p``), so rows of
    different lengths share one batch with no padding artefacts.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = AquilaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._rotary_tables: dict = {}  # (device, dtype) -> (cos, signed sin) [positions, head_dim]
        self._decode_plan: _DecodePlan | None = None  # set by prepare_for_cpu_decode
        self._cache_row_tables: dict = {}  # see _cache_rows
        # a plan that no longer describes the model would keep its old tensors alive
        self.register_load_state_dict_post_hook(_drop_stale_plan_after_load)

    def _drop_stale_plan(self) -> None:
        """Forget a decode plan, and fused weights, that no longer back the modules (after
        ``.to()``, an assigning ``load_state_dict``, ``train()``): they would only keep the old
        tensors alive. :meth:`prepare_for_cpu_decode` builds them again."""
        plan = self._decode_plan
        if plan is not None and (self.training or not plan.describes(self)):
            self._decode_plan = None
        for owner, name, group in self._fused_groups():
            fused = getattr(owner, name)
            if fused is not None and fused.stale(group):
                setattr(owner, name, None)

    def _fused_groups(self) -> list[tuple[nn.Module, str, list[nn.Module]]]:
        """(owner, attribute of its :class:`_Fused`, the modules it fuses) for every layer."""
        groups = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups.append((attn, "fused_qkv", [attn.q_proj, attn.k_proj, attn.v_proj]))
            groups.append((mlp, "fused_gate_up", [mlp.gate_proj, mlp.up_proj]))
        return groups

    def train(self, mode: bool = True) -> "AquilaForCausalLM":
        """``nn.Module.train``; training also drops the decode plan (and the layers give their
        fused weights their own storage: see :meth:`prepare_for_cpu_decode`)."""
        super().train(mode)
        self._drop_stale_plan()
        return self

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .share_memory() ...: drop a decode plan left describing old tensors
        result = super()._apply(fn, recurse)
        self._drop_stale_plan()
        return result

    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, ones for norms (as HF)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                    module.weight.copy_(w)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The run dtype: the embedding's (it stays float when the linears are quantized)."""
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, *, slots: torch.Tensor | None = None,
                kv_len: int | None = None, logits_index: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder.

        Args:
            input_ids: ``[B, T]`` token ids (int64).
            positions: ``[B, T]`` absolute positions; default ``arange(T)`` for every row.
            kv_cache: when given, keys/values are written into it and attention reads from it.
            slots: ``[B]`` cache slot of each row, or a ``slice`` of contiguous slots (read as a
                view, no gather); default ``slice(0, B)``; only with ``kv_cache``.
            kv_len: number of cache positions attention reads, ``> positions.max()``; default
                ``positions.max() + 1`` (a device sync; the engine passes it from host state).
            logits_index: ``[B]`` index along T of the single position whose logits are wanted
                (e.g. the last prompt token of each right-padded row); returns ``[B, 1, V]``.
            logits_mask: ``[B, T]`` bool; only the logits of the True positions are computed,
                returned as ``[N, V]`` in row-major order (training computes the vocabulary
                projection only where a loss is taken).

        Returns:
            Logits ``[B, T, vocab]`` (``[B, 1, vocab]`` with ``logits_index``, ``[N, vocab]`` with
            ``logits_mask``), fp32.

        Raises:
            ValueError: positions outside the cache or the model's context window; a cache with
                another number of layers than the model.
        """
        return self.compute_logits(self.forward_hidden(
            input_ids, positions, kv_cache, slots=slots, kv_len=kv_len, logits_index=logits_index,
            logits_mask=logits_mask))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vocabulary projection: final-norm hidden states ``[..., hidden]`` (from
        :meth:`forward_hidden`) -> fp32 logits ``[..., vocab]``. Rows of several forward passes
        may be concatenated first (the engine projects prefill and decode rows in one product)."""
        return self.lm_head(hidden).float()

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       kv_cache: KVCache | None = None, *, slots: torch.Tensor | None = None,
                       kv_len: int | None = None, logits_index: torch.Tensor | None = None,
                       logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` up to the final norm: hidden states ``[B, T, hidden]`` (``[B, 1,
        hidden]`` with ``logits_index``, ``[N, hidden]`` with ``logits_mask``) in the model's
        dtype; arguments and errors as :meth:`forward`."""
        B, T = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        first, last = (int(v) for v in positions.aminmax())
        if first < 0:
            raise ValueError(f"positions must be >= 0, got {first}")
        cos, sin = self._rotary(positions, x.dtype, last)
        mask = cache_index = None
        if kv_cache is not None:
            num_layers = len(self.model.layers)
            if not len(kv_cache.k) == len(kv_cache.v) == num_layers:
                raise ValueError(f"the KV cache has {len(kv_cache.k)} key and {len(kv_cache.v)} value layers; "
                                 f"the model has {num_layers} layers")
            if kv_len is None:
                kv_len = last + 1
            if kv_len > kv_cache.max_seq_len:
                raise ValueError(f"position {kv_len - 1} is outside the KV cache ({kv_cache.max_seq_len} positions)")
            if last >= kv_len:
                raise ValueError(f"position {last} is not below kv_len={kv_len}")
            slots, slot_ids = self._slot_rows(slots, B, kv_cache.num_slots, device)
            # row of (slot, head, position) in a layer's cache viewed as [slots * Hkv * S, head_dim]
            base = self._cache_rows(kv_cache, device)  # (slots, Hkv): row of position 0
            base = base[slots] if isinstance(slots, slice) else base.index_select(0, slot_ids)
            flat_index = (base[:, None, :] + positions[:, :, None]).view(-1)  # (B * T * Hkv)
            cache_index = (slots, flat_index, slot_ids, positions)
            if not (B == 1 and T == 1 and kv_len == last + 1):
                # (a single row decoding at the end of its cache attends to everything: no mask)
                key_pos = torch.arange(kv_len, device=device)
                mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S) True = attend
        plan = self._decode_plan
        if plan is not None and kv_cache is not None and plan.usable(self, kv_cache):
            x = plan.run(x, cos, sin, kv_cache, cache_index, mask, kv_len)
        else:
            for i, layer in enumerate(self.model.layers):
                cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
                if self.gradient_checkpointing and self.training and cache is None:
                    x = checkpoint(layer, x, cos, sin, None, None, None, 0, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, cache, cache_index, mask, kv_len or 0)
        if logits_index is not None:
            x = x[torch.arange(B, device=device), logits_index][:, None]  # (B, 1, hidden)
        elif logits_mask is not None:
            x = x[logits_mask]  # (N, hidden): the selected positions only
        return self.model.norm(x)

    @staticmethod
    def _slot_rows(slots, B: int, num_slots: int, device) -> tuple[slice | torch.Tensor, torch.Tensor]:
        """``slots`` (None, a slice or ``[B]`` ids) -> (a step-1 slice or an id tensor, ids ``[B]``).

        Raises:
            ValueError: not ``B`` slots, or an id outside ``0 .. num_slots - 1``.
        """
        if slots is None:
            slots = slice(0, B)
        if isinstance(slots, slice):
            start, stop, step = slots.indices(num_slots)
            ids = torch.arange(start, stop, step, device=device)
            if step == 1:
                slots = slice(start, stop)
            else:
                slots = ids
        else:
            ids = slots
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_slots):
                raise ValueError(f"slot ids must be in 0..{num_slots - 1}, got {ids.tolist()}")
        if ids.shape != (B,):
            raise ValueError(f"{B} rows need {B} cache slots, got {tuple(ids.shape)} ({slots})")
        return slots, ids

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype,
                last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see :func:`_rotate`) ``[B, T, 1, head_dim]`` looked up in a table of
        all positions (``last`` = ``positions.max()``), built once per device and dtype (the same
        fp32 values :func:`rotary_cos_sin` computes per call)."""
        key = (positions.device, dtype)
        table = self._rotary_tables.get(key)  # (positions, 2, 1, head_dim): cos, signed sin
        n = self.config.max_position_embeddings
        if table is None or last >= table.shape[0]:
            size = max(n, last + 1)
            pos = torch.arange(size, device=positions.device)[None]
            cos, sin = rotary_cos_sin(pos, self.config.head_dim, self.config.rope_theta, dtype)
            half = self.config.head_dim // 2
            signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
            table = torch.stack((cos[0], signed_sin), dim=1)[:, :, None]
            self._rotary_tables[key] = table
        B, T = positions.shape
        both = table.index_select(0, positions.reshape(-1)).view(B, T, 2, 1, -1)
        return both[:, :, 0], both[:, :, 1]

    def _cache_rows(self, cache: KVCache, device) -> torch.Tensor:
        """``[slots, Hkv]`` int64: the row of position 0 of each (slot, kv head) in a layer's cache
        viewed as ``[slots * Hkv * max_seq_len, head_dim]``; cached per cache shape."""
        hkv, num_slots, S = self.config.num_key_value_heads, cache.num_slots, cache.max_seq_len
        key = (device, num_slots, hkv, S)
        rows = self._cache_row_tables.get(key)
        if rows is None:
            rows = (torch.arange(num_slots, device=device)[:, None] * hkv + torch.arange(hkv, device=device)) * S
            self._cache_row_tables[key] = rows
        return rows

    def prepare_for_cpu_decode(self) -> None:
        """Re-lay the weights for fast few-token steps on the CPU, in place (the engine calls it).

        Every linear weight ``[out, in]`` is stored column-major (same shape, values and
        state-dict keys; strides ``(1, out)``): BLAS multiplies a vector by a weight about twice as
        fast in that layout (measured: 13 vs 30 ms for a 100008 x 448 output projection at one
        row; equal from 8 rows up). The q/k/v projections of each layer share one
        ``[q + 2 kv, hidden]`` weight, and so do the gate/up projections (one product instead of
        three or two; the modules' weights become views of it). Weights of at least
        :data:`SPLIT_LINEAR_MIN_ELEMENTS` elements also take :func:`linear_no_bias`'s few-row
        products (which may limit numpy's OpenBLAS to one thread: :func:`aquilachat.cpu_blas.enable`).
        Calling it again changes nothing. Results equal the row-major ones up to
        summation order (~1e-6 relative in fp32). ``model.train()`` gives the fused weights
        their own dense storage again (optimizers with fused kernels treat each parameter as a
        dense block and would otherwise write into its neighbours); gradients keep the
        parameters' layout; :func:`~aquilachat.checkpoint.save_hf` writes contiguous tensors.
        """
        cpu_blas.enable()
        with torch.no_grad():
            for owner, name, group in self._fused_groups():
                done = getattr(owner, name)
                if all(type(m) is Linear for m in group) and not (done and done.usable(group)):
                    setattr(owner, name, _Fused(group))
            for module in self.modules():
                if isinstance(module, nn.Linear) and module.weight.stride(0) != 1:
                    module.weight.data = module.weight.data.t().contiguous().t()
                if isinstance(module, Linear):
                    module.split_rows = module.weight.numel() >= SPLIT_LINEAR_MIN_ELEMENTS
            self._decode_plan = _DecodePlan(self) if _DecodePlan.supports(self) else None

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def param_bytes(model: nn.Module) -> int:
    """Bytes of all distinct parameters (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

