"""The CPU decode backend: prefill and decode steps of the plain model over the engine's KV cache.

A decode step reads every weight once, so on a CPU its speed limit is memory bandwidth over
weight bytes. What costs time beyond that limit is (a) products that read a weight at less than
the copy bandwidth and (b) per-op overhead, which dominates small models. The backend therefore:

* runs the decoder layers as one loop over ``[tokens, hidden]`` states with the model's own
  functions (:func:`~aquilachat.model.rms_norm`, :func:`~aquilachat.model.rotate`,
  :func:`~aquilachat.model.attend`): no module calls, no 3-d reshapes around products;
* in decode steps and vocabulary projections, multiplies by plain float weights with
  :func:`.cpu_kernels.linear` (a product that streams each row-major weight once for all rows and
  gives each row the same result whatever the batch; see docs/generation.md, "CPU decode
  backend", for the measurements against oneDNN / MKL and their layouts); prefills use torch's
  products (compute-bound, where oneDNN / MKL's blocking wins);
* in decode steps, runs a layer whose every op would take the kernels in one call
  (``decode_layer``: the same ops in the same order from C++, so the same bits);
* calls every other linear through its module (``module(x)``): weight-only quantized linears
  (:mod:`aquilachat.quantization`) and custom classes keep their own arithmetic.

It changes nothing in the model: it reads the modules and parameters at every call, prepares no
copy or layout of any weight and keeps no state in the module tree, so a model that was served
trains exactly as one that never was, and :meth:`CpuDecodeBackend.release` only drops the
backend's references.

It steps aside (the plain modules run) for what it would not see or cannot do: autograd on,
autocast, training mode or global forward hooks send the whole forward to
:meth:`~aquilachat.model.AquilaForCausalLM.forward_hidden`; a decoder layer with a forward
hook anywhere in it, an instance-level ``forward`` (accelerate's hooks), a module of another class
(a swapped class, peft's unmerged LoRA wrappers) or a weight of another dtype runs through its own
module. Results equal the plain model's up to summation order (fp32: ~1e-6 relative).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..model import AquilaForCausalLM, Attention, DecoderLayer, KVCache, MLP, RMSNorm, attend, rms_norm, rotate
from . import cpu_kernels

__all__ = ["BackendUnsupported", "CpuDecodeBackend"]

log = logging.getLogger(__name__)

#: Weight dtypes whose plain linears the backend multiplies itself.
DTYPES = (torch.float32, torch.bfloat16)


class BackendUnsupported(ValueError):
    """The backend cannot serve this model at all (e.g. it is not on the CPU)."""


def _global_hooks() -> bool:
    """Whether a forward hook is registered for all modules
    (``torch.nn.modules.module.register_module_forward_hook`` / ``..._pre_hook``)."""
    mod = torch.nn.modules.module
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks)


def _called_as_is(module: nn.Module, cls: type) -> bool:
    """Whether calling ``module`` would run exactly ``cls.forward``: its class, no forward hook,
    no instance-level ``forward``."""
    return (type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__)


class CpuDecodeBackend:
    """Runs :meth:`forward_hidden` / :meth:`compute_logits` of a CPU :class:`AquilaForCausalLM`
    (same arguments, results and errors as the model's) faster at few tokens per step.

    Args:
        model: the model; float32 and bfloat16 plain linears take the backend's products, any
            other dtype or linear class runs as the model runs it.
        kernels: use the compiled few-row products (:mod:`.cpu_kernels`); default: unless the
            environment sets ``AQUILACHAT_CPU_KERNELS=0``. Without them (or when they fail to
            build) products go through ``torch.nn.functional.linear``.

    Raises:
        BackendUnsupported: the model is not an :class:`AquilaForCausalLM` (e.g. a peft
            ``PeftModel`` wrapper: merge its adapters first), is not on the CPU, or ``kernels=True``
            and they are not available.
    """

    def __init__(self, model: AquilaForCausalLM, *, kernels: bool | None = None) -> None:
        if not isinstance(model, AquilaForCausalLM):
            raise BackendUnsupported(f"the CPU decode backend runs an AquilaForCausalLM, got {type(model).__name__} "
                                     "(for a peft model, merge the adapters first: merge_and_unload())")
        if model.device.type != "cpu":
            raise BackendUnsupported(f"the CPU decode backend runs models on the CPU; this one is on {model.device}")
        self.model: AquilaForCausalLM | None = model
        self._kernels = cpu_kernels.load() if kernels is not False else None
        if kernels and self._kernels is None:
            raise BackendUnsupported(f"the CPU kernels are not available: {cpu_kernels.load_error()}")
        self._reasons: set[str] = set()  # step-aside reasons already logged
        #: Decode steps run a layer of plain float weights in one call (``decode_layer`` of
        #: :mod:`.cpu_kernels`: the same ops in the same order, so the same bits, without the
        #: ~16 calls from Python); False runs the ops one by one (for comparisons).
        self.fuse_layers = True
        #: Greedy decode steps run whole in one call (:meth:`decode_greedy`, which the engine tries
        #: first for plain greedy batches: the same bits); False declines them, so the engine runs
        #: its steps op by op (for comparisons).
        self.fuse_steps = True

    @property
    def uses_kernels(self) -> bool:
        """Whether few-row products go through the compiled kernels (else ``F.linear``)."""
        return self._kernels is not None

    def release(self) -> None:
        """Drop the backend's references: afterwards the model is exactly as if it had never been
        served (the backend never changed it), and this backend refuses further calls."""
        self.model = None
        self._kernels = None

    # ------------------------------------------------------------------ forward
    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       kv_cache: KVCache | None = None, *, slots: torch.Tensor | None = None,
                       kv_len: int | None = None, logits_index: torch.Tensor | None = None,
                       logits_mask: torch.Tensor | None = None, decode: bool | None = None) -> torch.Tensor:
        """:meth:`AquilaForCausalLM.forward_hidden`: hidden states ``[B, T, hidden]`` (``[B, 1,
        hidden]`` with ``logits_index``, ``[N, hidden]`` with ``logits_mask``) after the final norm.

        ``decode``: whether this is a decode step (default: ``T == 1``). Decode steps multiply
        plain weights with the kernels; prefills with torch's products, however few their rows,
        so that a prompt's keys and values are the same numbers whether it was prefilled whole or
        from a cached prefix (the kernels give each row the same result whatever the batch, but
        not the same as torch's products).

        Raises:
            RuntimeError: after :meth:`release`.
            ValueError: as the model's (positions outside the cache, a cache of another depth).
        """
        model = self._model()
        reason = self._whole_model_reason()
        if reason is not None or kv_cache is None:
            self._stepped_aside(reason or "no KV cache")
            return model.forward_hidden(input_ids, positions, kv_cache, slots=slots, kv_len=kv_len,
                                        logits_index=logits_index, logits_mask=logits_mask)
        x, inputs = model.embed(input_ids, positions, kv_cache, slots=slots, kv_len=kv_len)
        B, T, hidden = x.shape
        kernels = self._kernels is not None and (T == 1 if decode is None else decode)
        # one token per row, decoded by the fused ops: rotary tables [B, head_dim] and the rows'
        # slots and positions [B] (the positions are below kv_len: embed checked)
        fused = None
        if kernels and T == 1:
            rows, _, slot_ids, pos = inputs.cache_index
            fused = (inputs.cos.reshape(B, -1), inputs.sin.reshape(B, -1), slot_ids.long(), pos.reshape(B).long())
        x = x.reshape(B * T, hidden)
        for layer, k_cache, v_cache in zip(model.model.layers, kv_cache.k, kv_cache.v):
            parts = self._layer_parts(layer)
            if parts is not None:
                x = self._layer(parts, x, B, T, inputs, (k_cache, v_cache), kernels, fused)
            else:
                self._stepped_aside(f"layer {type(layer).__name__} with hooks or other module classes")
                x = layer(x.view(B, T, hidden), inputs, (k_cache, v_cache)).reshape(B * T, hidden)
        norm = model.model.norm
        if (fused is not None and logits_index is None and logits_mask is None and _called_as_is(norm, RMSNorm)
                and x.dtype in DTYPES and norm._parameters["weight"].dtype == x.dtype):
            # a decode step's last norm as the layers' (one op instead of torch's six); the
            # kernels take float32 and bfloat16 only (a float16 model's layers ran as modules)
            return self._kernels.rms_norm(x, norm._parameters["weight"], norm.variance_epsilon).view(B, T, hidden)
        return model.final_norm(x.view(B, T, hidden), logits_index=logits_index, logits_mask=logits_mask)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`AquilaForCausalLM.compute_logits`: ``[..., hidden]`` -> fp32 logits ``[..., vocab]``
        (through the kernels up to :data:`.cpu_kernels.MAX_ROWS` rows: a row's logits do not
        depend on which other rows share the product)."""
        model = self._model()
        head = model.lm_head
        if self._whole_model_reason() is not None or not self._is_plain_linear(head, hidden.dtype):
            return model.compute_logits(hidden)
        rows = hidden.reshape(-1, hidden.shape[-1])
        return self._linear(rows, head.weight, self._kernels is not None).float().view(*hidden.shape[:-1], -1)

    def max_rows(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``logits.max(dim=-1)`` for float32 CPU logits ``[B, V]`` through the kernels (the
        sampler's greedy pick: values ``[B]``, NaN for a row holding one, and the first index of
        the maximum ``[B]``, as torch gives them) in one op instead of torch's seven; None when
        the kernels are not in use or the logits are not such a tensor."""
        if (self._kernels is None or logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu"
                or logits.requires_grad or not 0 < logits.shape[1] < 2 ** 31):
            return None
        return tuple(self._kernels.max_rows(logits))

    def decode_greedy(self, tokens: list[int], positions: list[int], kv_cache: KVCache, slots: list[int],
                      steps: int, *, allowed: torch.Tensor | None = None,
                      end_ids: list[int] | tuple[int, ...] = ()) -> list[list[int]] | None:
        """Up to ``steps`` greedy decode steps in one call of the kernels (vLLM's multi-step
        decoding): each row's next tokens after ``tokens [B]`` (its last token, at cache position
        ``positions [B]`` of slot ``slots [B]``), the same tokens and cache entries as that many
        :meth:`forward_hidden` / :meth:`compute_logits` steps with the sampler's greedy pick
        (``allowed [V]`` bool: the ids a token may be). Returns ``[B][n]`` token ids: ``n <=
        steps`` is cut short after the step where every row has produced one of ``end_ids``, and
        before a step whose pick is not a plain greedy one (NaN or +inf logits, no allowed id
        above -inf: the sampler decides those; ``n`` may be 0).

        None when the whole step would not run through the kernels (what :meth:`forward_hidden`
        steps aside for; an embedding, layer, norm or head of another class, dtype or with hooks;
        a model whose layers the kernels do not fuse): the caller then runs single steps.

        Raises:
            RuntimeError: after :meth:`release`, or positions beyond the cache (the kernels' check).
        """
        model = self._model()
        ext = self._kernels
        if (ext is None or not self.fuse_steps or self._whole_model_reason() is not None
                or not 0 < len(tokens) <= cpu_kernels.MAX_ROWS):
            return None
        if allowed is not None and (allowed.dtype != torch.bool or allowed.shape != (model.config.vocab_size,)):
            return None
        emb, norm, head = model.model.embed_tokens, model.model.norm, model.lm_head
        table = emb._parameters.get("weight") if _called_as_is(emb, nn.Embedding) else None
        if table is None or emb.max_norm is not None or table.dtype not in DTYPES or not table.is_contiguous():
            return None
        dtype = table.dtype
        if not (_called_as_is(norm, RMSNorm) and norm._parameters["weight"].dtype == dtype
                and self._is_plain_linear(head, dtype) and head.weight.shape == table.shape
                and head.weight.is_contiguous()):
            return None
        if not len(kv_cache.k) == len(kv_cache.v) == len(model.model.layers):
            return None  # the plain model's error for a cache of another depth
        weights, eps = [], []
        for layer, k_cache, v_cache in zip(model.model.layers, kv_cache.k, kv_cache.v):
            parts = self._layer_parts(layer)
            fused = self._fusable(dtype, self._fused_params(parts), (k_cache, v_cache)) if parts is not None else None
            if fused is None:
                return None
            attn, norm1, norm2, _ = parts
            if (attn.num_heads, attn.num_kv_heads) != (model.config.num_attention_heads,
                                                        model.config.num_key_value_heads):
                return None
            weights.extend(fused)
            eps.extend((norm1.variance_epsilon, norm2.variance_epsilon))
        B = len(tokens)
        first = torch.tensor(positions, dtype=torch.long)  # (B,)
        pos = first[:, None] + torch.arange(steps)  # (B, steps)
        cos, sin = model._rotary(pos, dtype, int(pos.max()))  # (B, steps, 1, head_dim) each
        cos, sin = (t.reshape(B, steps, -1).transpose(0, 1).contiguous() for t in (cos, sin))
        out, done = ext.decode_greedy(
            torch.tensor(tokens, dtype=torch.long), table, weights, eps, norm._parameters["weight"],
            norm.variance_epsilon, head.weight, list(kv_cache.k), list(kv_cache.v), cos, sin,
            torch.tensor(slots, dtype=torch.long), first, allowed,
            torch.tensor(sorted(set(end_ids)), dtype=torch.long), model.config.num_attention_heads,
            model.config.num_key_value_heads, cpu_kernels.level())
        return out[:, :int(done)].tolist()

    # ------------------------------------------------------------------ internals
    def _model(self) -> AquilaForCausalLM:
        if self.model is None:
            raise RuntimeError("this CPU decode backend was released; create a new one to serve the model again")
        return self.model

    def _whole_model_reason(self) -> str | None:
        """Why the whole forward must run the plain model, or None."""
        model = self.model
        if torch.is_grad_enabled():
            return "autograd is on"
        if model.training:
            return "training mode"
        if torch.is_autocast_enabled("cpu"):
            return "autocast"
        if _global_hooks():
            return "global forward hooks"
        if model.device.type != "cpu":
            return f"the model moved to {model.device}"
        return None

    def _stepped_aside(self, reason: str) -> None:
        if reason not in self._reasons:
            self._reasons.add(reason)
            log.info("CPU decode backend: plain modules run (%s)", reason)

    @staticmethod
    def _is_plain_linear(module: nn.Module, dtype: torch.dtype) -> bool:
        """A bias-free ``nn.Linear`` (exactly) with no hooks and a ``dtype`` weight in :data:`DTYPES`:
        the backend multiplies its weight itself."""
        return (_called_as_is(module, nn.Linear) and module.bias is None and module.weight.dtype == dtype
                and dtype in DTYPES)

    @staticmethod
    def _linear_ok(module: nn.Module) -> bool:
        """A linear the backend can run: a plain float one (its weight), or a leaf module of
        another class with ``in_features``/``out_features`` (a quantized linear: called as it is,
        its weight never read)."""
        if type(module) is nn.Linear:
            # _is_plain_linear on the module dicts (nn.Linear defines no __getattr__ of its own)
            weight = module._parameters.get("weight")
            return (not module._forward_hooks and not module._forward_pre_hooks and "forward" not in module.__dict__
                    and module._parameters.get("bias") is None and weight is not None and weight.dtype in DTYPES)
        return hasattr(module, "in_features") and hasattr(module, "out_features") and not module._modules

    def _layer_parts(self, layer: nn.Module) -> tuple | None:
        """What :meth:`_layer` needs of ``layer`` when it computes exactly what ``layer(...)``
        would, else None: ``(attention, input norm, post-attention norm, (q, k, v, o, gate, up,
        down) linears)``.

        Checked at every call (one pass per layer and step, reading the module dicts directly: the
        classes are checked first, so no ``__getattr__`` of theirs can differ): a module swapped,
        hooked or retyped since the last step is seen at the next one."""
        if not _called_as_is(layer, DecoderLayer):
            return None
        mods = layer._modules
        attn, mlp = mods.get("self_attn"), mods.get("mlp")
        norm1, norm2 = mods.get("input_layernorm"), mods.get("post_attention_layernorm")
        if not (_called_as_is(attn, Attention) and _called_as_is(mlp, MLP) and _called_as_is(norm1, RMSNorm)
                and _called_as_is(norm2, RMSNorm)):
            return None
        a, m = attn._modules, mlp._modules
        linears = (a.get("q_proj"), a.get("k_proj"), a.get("v_proj"), a.get("o_proj"),
                   m.get("gate_proj"), m.get("up_proj"), m.get("down_proj"))
        for module in linears:
            if not self._linear_ok(module):
                return None
        return attn, norm1, norm2, linears

    def _runs_layer(self, layer: nn.Module) -> bool:
        """Whether :meth:`_layer` computes exactly what ``layer(...)`` would."""
        return self._layer_parts(layer) is not None

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor, kernels: bool) -> torch.Tensor:
        """``x [N, in] @ weight.T`` -> ``[N, out]`` for a plain linear's weight ``[out, in]``."""
        if kernels:
            return cpu_kernels.linear(x, weight)
        return F.linear(x, weight)

    def _project(self, module: nn.Module, x: torch.Tensor, kernels: bool) -> torch.Tensor:
        """A linear module applied to ``x [N, in]``: through the backend's product for a plain float
        ``nn.Linear`` (in the input's dtype), else through the module."""
        if type(module) is nn.Linear:
            weight = module._parameters["weight"]
            if weight.dtype == x.dtype:
                if kernels and weight.is_contiguous() and x.shape[0] <= cpu_kernels.MAX_ROWS:
                    # what cpu_kernels.linear checks of the rest holds here: x is the backend's own
                    # contiguous [N, in] CPU tensor, autograd is off, the dtype one of DTYPES
                    return self._kernels.linear(x, weight, cpu_kernels.level())
                return self._linear(x, weight, kernels)
        return module(x)

    @staticmethod
    def _fusable(dtype: torch.dtype, params: tuple, cache: tuple) -> list | None:
        """The weights for ``decode_layer`` when the op-by-op path would run every op of a layer of
        ``dtype`` states through the kernels (see :meth:`_layer`), else None. ``params``: the two
        norm weights and the seven linears in ``decode_layer``'s order."""
        if not all(c.dtype == dtype and c.is_contiguous() for c in cache):
            return None
        weights = []
        for p in params:
            if isinstance(p, nn.Module):
                if type(p) is not nn.Linear:
                    return None
                p = p._parameters["weight"]
                if not p.is_contiguous():
                    return None
            if p.dtype != dtype:
                return None
            weights.append(p)
        return weights

    @staticmethod
    def _fused_params(parts: tuple) -> tuple:
        """A layer's ``parts`` (:meth:`_layer_parts`) in ``decode_layer``'s order: input norm
        weight, q, k, v, o, post-attention norm weight, gate, up, down."""
        _, norm1, norm2, (q, k, v, o, gate, up, down) = parts
        return norm1._parameters["weight"], q, k, v, o, norm2._parameters["weight"], gate, up, down

    def _layer(self, parts: tuple, x: torch.Tensor, B: int, T: int, inputs, cache, kernels: bool,
               fused: tuple | None = None) -> torch.Tensor:
        """:meth:`DecoderLayer.forward` on ``x [B * T, hidden]`` -> ``[B * T, hidden]`` for the
        layer's ``parts`` (:meth:`_layer_parts`); plain weights multiplied by the kernels when
        ``kernels``, else by ``F.linear``. ``fused`` (decode steps with the kernels: ``(cos, sin
        [B, head_dim], slot_ids, positions [B])``): RMSNorm, rotary and attention by the fused
        ops of :mod:`.cpu_kernels` where their dtypes allow, else the model's functions."""
        attn, norm1, norm2, (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) = parts
        project = self._project
        H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        ext = self._kernels if fused is not None else None
        w1, w2 = norm1._parameters["weight"], norm2._parameters["weight"]
        if (ext is not None and self.fuse_layers and x.is_contiguous() and x.shape[0] <= cpu_kernels.MAX_ROWS
                and fused[0].dtype == x.dtype):
            weights = self._fusable(x.dtype, self._fused_params(parts), cache)
            if weights is not None:
                cos, sin, slot_ids, pos = fused
                return ext.decode_layer(x, weights, norm1.variance_epsilon, norm2.variance_epsilon, cache[0], cache[1],
                                        cos, sin, slot_ids, pos, H, Hkv, cpu_kernels.level())
        if ext is not None and w1.dtype == x.dtype:
            h = ext.rms_norm(x, w1, norm1.variance_epsilon)
        else:
            h = rms_norm(x, w1, norm1.variance_epsilon)
        q, k, v = project(q_proj, h, kernels), project(k_proj, h, kernels), project(v_proj, h, kernels)
        k_cache, v_cache = cache
        if (ext is not None and q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype == fused[0].dtype
                and k_cache.is_contiguous() and v_cache.is_contiguous()):
            cos, sin, slot_ids, pos = fused
            q = ext.rotate(q.reshape(B, H, D), cos, sin)
            k = ext.rotate(k.reshape(B, Hkv, D), cos, sin)
            a = ext.decode_attend(q, k, v.reshape(B, Hkv, D), k_cache, v_cache, slot_ids, pos)  # (B, H * D)
        else:
            q = rotate(q.view(B, T, H, D), inputs.cos, inputs.sin)
            k = rotate(k.view(B, T, Hkv, D), inputs.cos, inputs.sin)
            a = attend(q, k, v.view(B, T, Hkv, D), cache, inputs).view(B * T, H * D)
        x = x + project(o_proj, a, kernels)
        if ext is not None and w2.dtype == x.dtype:
            h = ext.rms_norm(x, w2, norm2.variance_epsilon)
        else:
            h = rms_norm(x, w2, norm2.variance_epsilon)
        gate, up = project(gate_proj, h, kernels), project(up_proj, h, kernels)
        if ext is not None and gate.dtype == up.dtype and gate.dtype in DTYPES:
            act = ext.silu_mul(gate, up)  # decode_layer's silu, element for element
        else:
            act = F.silu(gate) * up
        return x + project(down_proj, act, kernels)
