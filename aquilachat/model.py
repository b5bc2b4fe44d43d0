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

The modules are plain: speed on a given device lives beside the model, in
:mod:`aquilachat.backends`, which runs the same functions (:func:`rms_norm`, :func:`rotate`,
:func:`attend`) over the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

__all__ = ["AquilaForCausalLM", "KVCache", "LayerInputs", "RMSNorm", "apply_rotary", "attend", "param_bytes",
           "rms_norm", "rotary_cos_sin", "rotate"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`RMSNorm` as a function: ``x [..., hidden]`` normalised in fp32, cast back to
    ``x``'s dtype, then scaled by ``weight`` (as ``LlamaRMSNorm``)."""
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
        return rms_norm(x, self.weight, self.variance_epsilon)


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


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` for ``x [B, T, heads, D]`` and tables ``[B, T, 1, D]`` (broadcast over
    heads) where ``signed_sin = cat(-sin[:D/2], sin[D/2:])``: ``rotate_half(x) * sin`` equals
    ``roll(x, D/2) * signed_sin`` element for element (a sign moved between exact factors), so
    the result is bit-identical in 4 ops instead of 8."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


@dataclass
class LayerInputs:
    """What every decoder layer of one forward pass shares (built by
    :meth:`AquilaForCausalLM.embed`).

    ``cos``, ``sin``: rotary tables ``[B, T, 1, head_dim]`` (``sin`` signed: see :func:`rotate`);
    ``cache_index``: None without a cache, else ``(rows, flat_index, slot_ids, positions)``:
    the cache rows read (a slice of slots or ids ``[B]``), the row of each (token, kv head) in a
    layer's cache viewed as ``[slots * Hkv * S, head_dim]`` (``[B * T * Hkv]``), slot ids ``[B]``,
    positions ``[B, T]``; ``mask``: ``[B, 1, T, kv_len]`` bool (True = attend) or None (causal
    without a cache, everything with a single row decoding at its cache's end); ``kv_len``:
    cache positions attention reads.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    cache_index: tuple | None = None
    mask: torch.Tensor | None = None
    kv_len: int = 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           cache: tuple[torch.Tensor, torch.Tensor] | None, inputs: LayerInputs) -> torch.Tensor:
    """Grouped-query attention (Ainslie et al. 2023) of rotated ``q [B, T, H, D]`` over ``k, v
    [B, T, Hkv, D]`` -> ``[B, T, H * D]``.

    Without a cache: causal attention within the ``T`` tokens (right padding never affects real
    tokens). With ``cache = (k_cache, v_cache)``, each ``[slots, Hkv, S, D]``: ``k`` and ``v`` are
    written at ``inputs.cache_index`` (cast to the cache's dtype), then attention reads cache
    positions ``0 .. inputs.kv_len - 1`` under ``inputs.mask``.
    """
    B, T, H, D = q.shape
    q = q.transpose(1, 2)  # (B, H, T, D)
    gqa = k.shape[2] != H
    if cache is None:
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=T > 1,
                                             enable_gqa=gqa)
    else:
        k_cache, v_cache = cache
        rows, flat_index, slot_ids, positions = inputs.cache_index
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
        k_all, v_all = k_cache[rows, :, :inputs.kv_len], v_cache[rows, :, :inputs.kv_len]
        if k_all.dtype != q.dtype:
            k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=inputs.mask, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(B, T, H * D)


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


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions: ``o_proj(attend(rotate(q), rotate(k), v))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(q, h, bias=False)

    def forward(self, x: torch.Tensor, inputs: LayerInputs,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x [B, T, hidden]`` -> ``[B, T, hidden]``; ``cache``: this layer's keys and values (see :func:`attend`)."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = rotate(self.q_proj(x).view(B, T, H, D), inputs.cos, inputs.sin)
        k = rotate(self.k_proj(x).view(B, T, Hkv, D), inputs.cos, inputs.sin)
        v = self.v_proj(x).view(B, T, Hkv, D)
        return self.o_proj(attend(q, k, v, cache, inputs))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, inputs: LayerInputs,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class AquilaModel(nn.Module):
    """Embedding, decoder layers and final norm (``LlamaModel``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._rotary_tables: dict = {}  # (device, dtype) -> (cos, signed sin) [positions, 2, 1, head_dim]
        self._cache_row_tables: dict = {}  # see _cache_rows

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
        x, inputs = self.embed(input_ids, positions, kv_cache, slots=slots, kv_len=kv_len)
        for i, layer in enumerate(self.model.layers):
            if kv_cache is not None:
                x = layer(x, inputs, (kv_cache.k[i], kv_cache.v[i]))
            elif self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, inputs, use_reentrant=False)
            else:
                x = layer(x, inputs)
        return self.final_norm(x, logits_index=logits_index, logits_mask=logits_mask)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
              kv_cache: KVCache | None = None, *, slots: torch.Tensor | None = None,
              kv_len: int | None = None) -> tuple[torch.Tensor, LayerInputs]:
        """The start of :meth:`forward_hidden`: token embeddings ``[B, T, hidden]`` and the
        :class:`LayerInputs` every layer shares; arguments and errors as :meth:`forward`."""
        B, T = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        first, last = (int(v) for v in positions.aminmax())
        if first < 0:
            raise ValueError(f"positions must be >= 0, got {first}")
        cos, sin = self._rotary(positions, x.dtype, last)
        if kv_cache is None:
            return x, LayerInputs(cos, sin)
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
        mask = None
        if not (B == 1 and T == 1 and kv_len == last + 1):
            # (a single row decoding at the end of its cache attends to everything: no mask)
            key_pos = torch.arange(kv_len, device=device)
            mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S) True = attend
        return x, LayerInputs(cos, sin, (slots, flat_index, slot_ids, positions), mask, kv_len)

    def final_norm(self, x: torch.Tensor, *, logits_index: torch.Tensor | None = None,
                   logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The end of :meth:`forward_hidden`: the positions asked for (see :meth:`forward`) of the
        last layer's output ``x [B, T, hidden]``, through the final norm."""
        if logits_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_index][:, None]  # (B, 1, hidden)
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
        """cos and signed sin (see :func:`rotate`) ``[B, T, 1, head_dim]`` looked up in a table of
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

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def param_bytes(model: nn.Module) -> int:
    """Bytes of all distinct parameters (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

