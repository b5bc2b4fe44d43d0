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

from .config import ModelConfig

__all__ = ["AquilaForCausalLM", "KVCache", "RMSNorm", "rotary_cos_sin", "apply_rotary"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 and cast back (as ``LlamaRMSNorm``).

    ``y = weight * (x / sqrt(mean(x^2) + eps))``; input and output ``[..., hidden]``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


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
    """Grouped-query self-attention (Ainslie et al. 2023) with rotary positions."""

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, cache_index: tuple | None,
                mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if cache is None:
            # Whole sequences, no cache: plain causal attention (right padding never affects real tokens).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            k_cache, v_cache = cache
            rows, pos = cache_index  # slots (slice or [B]) and positions [B, T]
            contiguous = isinstance(rows, slice)
            if contiguous:  # contiguous slots: work on views, no gather
                k_cache, v_cache = k_cache[rows], v_cache[rows]
                rows = torch.arange(B, device=x.device)
            # write position pos[b, t] of slot rows[b]; indexed shape (B, T, Hkv, D)
            k_cache[rows[:, None], :, pos] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows[:, None], :, pos] = v.transpose(1, 2).to(v_cache.dtype)
            if contiguous:
                k_all, v_all = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]  # (B, Hkv, S, D) views
            else:
                k_all, v_all = k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]  # (B, Hkv, S, D)
            out = F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype),
                                                 attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)


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

    def forward(self, x, cos, sin, cache, cache_index, mask, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_index, mask, kv_len)
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
        self._rotary_tables: dict = {}  # (device, dtype) -> (cos, sin) [positions, head_dim]

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
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

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
            ValueError: positions outside the cache or the model's context window.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self._rotary(positions, x.dtype)
        mask = cache_index = None
        if kv_cache is not None:
            if kv_len is None:
                kv_len = int(positions.max()) + 1
            if kv_len > kv_cache.max_seq_len:
                raise ValueError(f"position {kv_len - 1} is outside the KV cache ({kv_cache.max_seq_len} positions)")
            if slots is None:
                slots = slice(0, B)
            cache_index = (slots, positions)
            if not (B == 1 and T == 1 and kv_len == int(positions[0, 0]) + 1):
                # (a single row decoding at the end of its cache attends to everything: no mask)
                key_pos = torch.arange(kv_len, device=device)
                mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S) True = attend
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
        x = self.model.norm(x)
        return self.lm_head(x).float()

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, T, head_dim]`` looked up in a table of all positions, built once per
        device and dtype (the same fp32 values :func:`rotary_cos_sin` computes per call)."""
        key = (positions.device, dtype)
        table = self._rotary_tables.get(key)
        n = self.config.max_position_embeddings
        if table is None or int(positions.max()) >= table[0].shape[0]:
            size = max(n, int(positions.max()) + 1)
            pos = torch.arange(size, device=positions.device)[None]
            cos, sin = rotary_cos_sin(pos, self.config.head_dim, self.config.rope_theta, dtype)
            table = (cos[0], sin[0])
            self._rotary_tables[key] = table
        return table[0][positions], table[1][positions]

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def param_bytes(model: nn.Module) -> int:
    """Bytes of all distinct parameters (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

