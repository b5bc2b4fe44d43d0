"""The engine: continuous batching over a preallocated KV cache, on token ids only.

Each :meth:`Engine.step` gives every running sequence exactly one new token:

1. admit waiting sequences while a cache slot is free, the KV-token budget allows
   (``prompt + max_tokens`` tokens reserved per sequence) and the step's prefill stays within
   ``max_num_batched_tokens`` padded prompt tokens (the activation memory the memory plan counted;
   one sequence is always admitted), first come first served. With prefix caching
   (:mod:`aquilachat.prefix_cache`, on by default) a sequence goes to a slot that already holds
   the keys and values of its prompt's longest cached prefix, or gets them copied from the slot
   that does;
2. **prefill** the newly admitted ones in one batch (each prompt from its first uncached token,
   right-padded; each row's logits taken at its own last prompt token, padding never reaches a
   real row: attention is causal and the pad positions are overwritten by the row's later tokens
   before they become visible). A sequence that asked for prompt log-probabilities gets them from
   this same pass (:meth:`Engine._prompt_logprobs`);
3. **decode** the sequences that were already running, one token each, in one batch; rows at
   different positions share the step through per-row positions and a causal mask over the cache;
   the final hidden states of steps 2 and 3 go through the vocabulary projection together (one
   product for all rows: for small models it is most of a step's work). When no sequence was
   admitted and every running one decodes plain greedy, steps 3 and 4 run whole in one call of
   the CPU backend (:meth:`CpuDecodeBackend.decode_greedy`: the same tokens), up to
   ``num_scheduler_steps`` steps at a time (:meth:`Engine._decode_greedy`);
4. sample all rows together (:func:`aquilachat.sampling.sample`; a sequence with a response
   format passes its grammar's token mask, one with ``min_tokens`` the ids that would end it),
   append, and retire sequences that hit EOS, a stop id, ``max_tokens``, the context window, the
   end of their grammar, or a sampling error. A retired sequence frees its slot at once; the next
   step can admit a new one.

Text never enters the engine. Stop strings are checked by the caller on detokenized text, which
then calls :meth:`Engine.finish` (see :mod:`aquilachat.output_processor`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .backends import BackendUnsupported, CpuDecodeBackend
from .errors import ValidationError
from .model import AquilaForCausalLM, KVCache
from .prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from .sampling import SamplingParams, plain_greedy, sample, sanitize_logits
from .structured_output import bitmask_to_bool

__all__ = ["Engine", "Sequence", "StepOutput", "EngineStats", "PROMPT_LOGPROBS_CHUNK"]

log = logging.getLogger(__name__)

#: Prompt positions projected onto the vocabulary at once for prompt log-probabilities (bounds the
#: ``[chunk, vocab]`` fp32 logits: 26 MB for the Aquila vocabulary).
PROMPT_LOGPROBS_CHUNK = 64


@dataclass
class Sequence:
    """One answer being generated (a request with ``n`` answers has ``n`` sequences).

    ``constraint``: the answer's grammar state (:class:`~aquilachat.structured_output.GrammarConstraint`)
    when it has a response format; ``end_ids``: ``[n]`` ids that end the answer, held back while it
    is shorter than ``params.min_tokens``; ``prompt_logprobs``: per prompt token, ``(logprob,
    [(id, logprob), ...])`` (None for the first) once prefilled, when ``params.prompt_logprobs``
    is set; ``num_cached_tokens``: leading prompt tokens found in the prefix cache;
    ``cache_end``: cache positions a multi-step burst wrote for it (it may write past the
    sequence's last fed token, ``num_tokens - 1``: see :meth:`Engine._decode_greedy`).
    """

    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    constraint: object | None = None
    end_ids: torch.Tensor | None = None
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    cache_end: int = 0
    slot: int | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class StepOutput:
    """What one step did to one sequence: the token it appended (``None`` if it failed) and
    whether it finished."""

    seq: Sequence
    token_id: int | None
    finished: bool


@dataclass
class EngineStats:
    """Counters since start (the server exports them)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    sampling_errors: int = 0
    steps: int = 0


class Engine:
    """Continuous batching on an :class:`AquilaForCausalLM` (see the module docstring).

    Args:
        model: the model (any device / dtype).
        eos_token_ids: ids that end an answer (unless ``ignore_eos``).
        allowed: ``[vocab]`` bool of ids the tokenizer can decode (``None``: all).
        max_num_seqs: cache slots, i.e. most sequences running at once.
        max_model_len: context window in tokens (prompt + answer); default the model's
            ``max_position_embeddings``.
        kv_cache_tokens: KV-token budget for admission; default ``max_num_seqs * max_model_len``.
        max_num_batched_tokens: most padded prompt tokens (rows x longest prompt) one prefill
            step takes (vLLM's name); default ``max(max_model_len, 2048)``. A longer prompt still
            runs, alone in its step.
        enable_prefix_caching: keep and reuse the keys and values of prompt prefixes across
            requests (vLLM's name; :mod:`aquilachat.prefix_cache`). Outputs are the same with and
            without it.
        prefix_block_size: tokens per cached block.
        num_scheduler_steps: decode steps one :meth:`step` may run at once when every running
            sequence decodes greedily with nothing else to compute (vLLM's multi-step decoding:
            :meth:`CpuDecodeBackend.decode_greedy`, no Python between the steps; the same
            tokens as single steps, each sequence cut at its first stop). Default 1: one token
            per step (such a step still runs whole in one call). More steps make small models
            faster at a cost in latency: streamed text and newly arrived requests wait for the
            whole burst.

    On the CPU, prefill and decode run through :class:`~aquilachat.backends.CpuDecodeBackend`
    (``self.backend``; :meth:`release_backend` lets it go).

    Thread safety: :meth:`add` and :meth:`finish` may be called from other threads while one
    thread calls :meth:`step`.
    """

    def __init__(self, model: AquilaForCausalLM, *, eos_token_ids: list[int] | tuple[int, ...] = (),
                 allowed: torch.Tensor | None = None, max_num_seqs: int = 8,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 prefix_block_size: int = DEFAULT_BLOCK_SIZE, num_scheduler_steps: int = 1) -> None:
        if max_num_seqs < 1:
            raise ValidationError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if num_scheduler_steps < 1:
            raise ValidationError(f"num_scheduler_steps must be >= 1, got {num_scheduler_steps}")
        self.num_scheduler_steps = num_scheduler_steps
        self.model = model.eval()
        # prefill and decode run through the device backend when there is one (it steps aside
        # to the plain modules for what it does not support); the model is never changed by it
        self.backend = None
        if model.device.type == "cpu":
            try:
                self.backend = CpuDecodeBackend(model)
            except BackendUnsupported as exc:  # e.g. a wrapped model: its own forward runs
                log.info("no CPU decode backend: %s", exc)
        self.config = model.config
        self.device = model.device
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens or max_num_seqs * self.max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens or max(self.max_model_len, 2048)
        self.allowed = None if allowed is None or bool(allowed.all()) else allowed.to(self.device)
        self.cache = KVCache.allocate(self.config, max_num_seqs, self.max_model_len,
                                      dtype=model.dtype, device=self.device)
        self.free_slots = list(range(max_num_seqs))
        self.prefix_cache = PrefixCache(max_num_seqs, prefix_block_size) if enable_prefix_caching else None
        self._bitmask: torch.Tensor | None = None  # [max_num_seqs, ceil(V / 32)] int32, for grammars
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._pending_finish: dict[str, tuple[str, str | int | None]] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_ids: list[int], params: SamplingParams, *, cap_to_context: bool = False) -> int:
        """Validate a request before any work; return its effective ``max_tokens``.

        Raises:
            ValidationError: empty prompt, an id outside the vocabulary (in the prompt or
                ``logit_bias``), or prompt + max_tokens beyond the context window (unless
                ``cap_to_context``, which caps ``max_tokens`` so the answer ends with
                ``finish_reason="length"`` at the window).
        """
        if not prompt_ids:
            raise ValidationError("prompt", "the prompt is empty (no tokens)")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValidationError("prompt", f"prompt token id {bad} is outside the model vocabulary (0..{vocab - 1})")
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise ValidationError("logit_bias", f"logit_bias names token id {bad}, outside the model vocabulary "
                                                f"(0..{vocab - 1})")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise ValidationError("prompt", f"the prompt has {n} tokens; the context window is {self.max_model_len} "
                                  "tokens and leaves no room for an answer")
        if n + params.max_tokens > self.max_model_len:
            if not cap_to_context:
                raise ValidationError(
                    "max_tokens", f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context window of "
                    f"{self.max_model_len} tokens; lower max_tokens to at most {self.max_model_len - n}")
            return self.max_model_len - n
        return params.max_tokens

    def add(self, prompt_ids: list[int], params: SamplingParams, *, seq_id: str | None = None,
            seed_offset: int = 0, cap_to_context: bool = False, max_tokens: int | None = None,
            constraint: object | None = None, extra_end_ids: list[int] | tuple[int, ...] = ()) -> Sequence:
        """Queue one sequence; it joins the running batch at the next step with a free slot.

        ``seed_offset`` is added to ``params.seed`` (answer ``i`` of ``n`` uses ``seed + i``).
        ``max_tokens``: what :meth:`check_request` returned for this prompt when the caller has
        validated it already (the request is then not checked again); None checks it here.
        ``constraint``: the answer's own grammar state (a response format), with
        ``fill_bitmask(bitmask, row)``, ``accept(token_id) -> bool`` and ``terminated``.
        ``extra_end_ids``: ids that end the answer besides EOS and ``params.stop_token_ids``
        (tokens that would start a stop string), held back while the answer is shorter than
        ``params.min_tokens``.

        Raises:
            ValidationError: see :meth:`check_request`.
        """
        if max_tokens is None:
            max_tokens = self.check_request(prompt_ids, params, cap_to_context=cap_to_context)
        gen = torch.Generator(device=self.device)
        if params.seed is not None:
            gen.manual_seed(params.seed + seed_offset)
        else:
            gen.seed()
        seq = Sequence(seq_id or f"seq-{next(self._ids)}", list(prompt_ids), params, gen, max_tokens,
                       constraint=constraint)
        if params.min_tokens:
            ends = sorted(self.eos_token_ids | set(params.stop_token_ids) | set(extra_end_ids))
            seq.end_ids = torch.tensor([t for t in ends if t < self.config.vocab_size], device=self.device)
        with self._lock:
            self.waiting.append(seq)
        return seq

    def finish(self, seq: Sequence, reason: str = "abort", stop_reason: str | int | None = None, *,
               num_tokens: int | None = None) -> None:
        """Retire a sequence at the next step boundary (stop string found, client gone, ...).

        ``num_tokens``: where the answer ended when that is before its last output id (a stop
        string completed inside a multi-step burst): the ids after it are dropped and no longer
        counted in ``stats.generated_tokens``, as if single steps had stopped there."""
        with self._lock:
            if num_tokens is not None and 0 <= num_tokens < len(seq.output_ids):
                self.stats.generated_tokens -= len(seq.output_ids) - num_tokens
                for ids in (seq.output_ids, seq.logprobs, seq.top_logprobs):
                    del ids[num_tokens:]
            if seq in self.waiting:
                self.waiting.remove(seq)
                seq.finish_reason, seq.stop_reason = reason, stop_reason
                return
            if not seq.finished:
                self._pending_finish[seq.seq_id] = (reason, stop_reason)

    def release_backend(self) -> None:
        """Release the device backend (:class:`~aquilachat.backends.CpuDecodeBackend`); later steps
        run the plain model's modules. The model is then exactly as if it had never been served."""
        if self.backend is not None:
            self.backend.release()
            self.backend = None

    @property
    def runner(self) -> CpuDecodeBackend | AquilaForCausalLM:
        """What runs the forward passes: the backend, or the model once it is released."""
        return self.backend if self.backend is not None else self.model

    def _forward_hidden(self, decode: bool, *args, **kwargs) -> torch.Tensor:
        """``forward_hidden`` of :attr:`runner`; ``decode`` tells the backend a decode step from a
        prefill (see :meth:`CpuDecodeBackend.forward_hidden`)."""
        if self.backend is not None:
            return self.backend.forward_hidden(*args, decode=decode, **kwargs)
        return self.model.forward_hidden(*args, **kwargs)

    def abort_all(self, reason: str = "error", error: str | None = None) -> list[Sequence]:
        """Retire every waiting and running sequence at once and free all slots; return them.

        For a caller whose :meth:`step` raised (the engine's state is then unknown): the server
        fails the affected requests with ``error`` and keeps serving with a clean engine.
        """
        with self._lock:
            seqs = list(self.waiting) + [s for s in self.running if s not in self.waiting]
            self.waiting.clear()
            for seq in seqs:
                seq.slot = None
                if not seq.finished:
                    seq.finish_reason, seq.error = reason, error
            self.running = []
            self._pending_finish.clear()
            self.free_slots = list(range(self.max_num_seqs))
            for slot in self.free_slots:  # a failed step may have left anything in the cache
                self._clear_slot(slot)
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
        return seqs

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def reserved_tokens(self) -> int:
        """KV tokens reserved by running sequences (prompt + max_tokens each)."""
        return sum(len(s.prompt_ids) + s.max_tokens for s in self.running)

    # ------------------------------------------------------------------ stepping
    def _clear_slot(self, slot: int, num_positions: int | None = None, start: int = 0) -> None:
        """Zero a slot's cache entries (positions ``start .. num_positions - 1``, default all).

        Needed after a sequence failed on non-finite values: the causal mask hides stale entries
        from the next occupant, but masked attention still multiplies their values by 0, and
        0 * NaN is NaN. Finite stale entries need no clearing.
        """
        with torch.inference_mode():
            for k, v in zip(self.cache.k, self.cache.v):
                k[slot, :, start:num_positions].zero_()
                v[slot, :, start:num_positions].zero_()

    def _retire(self, seq: Sequence, reason: str, stop_reason=None, error: str | None = None) -> None:
        seq.finish_reason, seq.stop_reason, seq.error = reason, stop_reason, error
        seq.constraint = None
        if seq.slot is not None:
            if reason == "error":
                self._clear_slot(seq.slot, max(seq.num_tokens, seq.cache_end))
                if self.prefix_cache is not None:
                    self.prefix_cache.drop(seq.slot)
            else:
                if seq.cache_end > seq.num_tokens - 1:
                    # a burst fed this sequence past its end (single steps never do): a non-finite
                    # entry there would reach the slot's next occupant through masked attention
                    self._clear_slot(seq.slot, seq.cache_end, start=seq.num_tokens - 1)
                if self.prefix_cache is not None:
                    # the slot keeps the keys/values of every token but the last (never fed back)
                    self.prefix_cache.record(seq.slot, seq.prompt_ids + seq.output_ids, seq.num_tokens - 1)
            self.free_slots.append(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)

    def _admit(self) -> list[Sequence]:
        new: list[Sequence] = []
        with self._lock:
            for seq in list(self.running):  # finishes requested from outside
                if seq.seq_id in self._pending_finish:
                    self._retire(seq, *self._pending_finish.pop(seq.seq_id))
            # what is left was asked for sequences that ended by themselves in the step during
            # which finish() was called (a client gone as its answer ended): nothing to retire
            self._pending_finish.clear()
            reserved = self.reserved_tokens()
            longest = 0
            while self.waiting and self.free_slots:
                seq = self.waiting[0]
                need = len(seq.prompt_ids) + seq.max_tokens
                if self.running and reserved + need > self.kv_cache_tokens:
                    break
                if new and (len(new) + 1) * max(longest, len(seq.prompt_ids)) > self.max_num_batched_tokens:
                    break  # the prefill batch is right-padded to its longest prompt (at most)
                self.waiting.popleft()
                self._take_slot(seq)
                longest = max(longest, len(seq.prompt_ids) - seq.num_cached_tokens)
                reserved += need
                new.append(seq)
        return new

    def _take_slot(self, seq: Sequence) -> None:
        """Give ``seq`` a free slot: with prefix caching the one the prefix cache chooses (its
        cached prefix copied in first if it lives in another slot), else the first free one."""
        if self.prefix_cache is None:
            seq.slot = self.free_slots.pop(0)
            return
        alloc = self.prefix_cache.allocate(seq.prompt_ids, self.free_slots,
                                           reuse=seq.params.prompt_logprobs is None)
        self.free_slots.remove(alloc.slot)
        seq.slot, seq.num_cached_tokens = alloc.slot, alloc.cached_tokens
        if alloc.source is not None:
            self._copy_prefix(alloc.source, alloc.slot, alloc.cached_tokens)

    @torch.inference_mode()
    def _copy_prefix(self, source: int, target: int, num_positions: int) -> None:
        """Copy the keys/values of the first ``num_positions`` positions from slot ``source`` to ``target``."""
        for k, v in zip(self.cache.k, self.cache.v):
            k[target, :, :num_positions].copy_(k[source, :, :num_positions])
            v[target, :, :num_positions].copy_(v[source, :, :num_positions])

    def _slots_arg(self, slots: list[int]) -> torch.Tensor | slice:
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))  # contiguous: the cache is read as a view
        return torch.tensor(slots, device=self.device)

    @torch.inference_mode()
    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Hidden states ``[B, hidden]`` at each new sequence's last prompt token; fills its cache
        slot from its first uncached position (``num_cached_tokens``); collects prompt
        log-probabilities for the sequences that asked."""
        starts = [s.num_cached_tokens for s in seqs]
        lengths = [len(s.prompt_ids) - start for s, start in zip(seqs, starts)]
        T = max(lengths)
        pad = self.config.pad_token_id or 0
        ids = torch.tensor([s.prompt_ids[start:] + [pad] * (T - n) for s, start, n in zip(seqs, starts, lengths)],
                           device=self.device)
        if any(starts):
            # pad positions past the cache's end all write to its last position: beyond every real
            # token of the row, and overwritten before they become visible
            S = self.cache.max_seq_len
            positions = (torch.tensor(starts, device=self.device)[:, None]
                         + torch.arange(T, device=self.device)).clamp_max(S - 1)
            kv_len = min(max(starts) + T, S)
        else:
            positions = torch.arange(T, device=self.device).expand(len(seqs), T)
            kv_len = T
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        slots = self._slots_arg([s.slot for s in seqs])
        if all(s.params.prompt_logprobs is None for s in seqs):
            hidden = self._forward_hidden(False, ids, positions, self.cache, slots=slots, kv_len=kv_len,
                                          logits_index=last)
            return hidden[:, 0]
        hidden = self._forward_hidden(False, ids, positions, self.cache, slots=slots, kv_len=kv_len)  # (B, T, hidden)
        for row, seq in enumerate(seqs):
            if seq.params.prompt_logprobs is not None:
                seq.prompt_logprobs = self._prompt_logprobs(seq, hidden[row, :lengths[row]])
        return hidden[torch.arange(len(seqs), device=self.device), last]

    @torch.inference_mode()
    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> list:
        """Per prompt token, ``(logprob, top)`` of it given the tokens before it (None for the
        first), from the prefill's hidden states ``[n, hidden]`` of the whole prompt: the
        distribution of :func:`~aquilachat.sampling.sanitize_logits` (the model's, the same as
        generated tokens' logprobs), ``top`` its ``params.prompt_logprobs`` most likely ids."""
        ids = seq.prompt_ids
        k = seq.params.prompt_logprobs
        out: list = [None]
        for begin in range(0, len(ids) - 1, PROMPT_LOGPROBS_CHUNK):
            end = min(begin + PROMPT_LOGPROBS_CHUNK, len(ids) - 1)
            logprobs = sanitize_logits(self.runner.compute_logits(hidden[begin:end]), self.allowed).log_softmax(-1)
            targets = torch.tensor(ids[begin + 1:end + 1], device=self.device)
            chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()  # (end - begin,)
            if k:
                values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
            else:
                tops = [[] for _ in chosen]
            out.extend(zip(chosen, tops))
        return out

    @torch.inference_mode()
    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Hidden states ``[B, hidden]`` after feeding each running sequence's last token."""
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)
        pos = [s.num_tokens - 1 for s in seqs]
        positions = torch.tensor(pos, device=self.device)[:, None]
        hidden = self._forward_hidden(True, ids, positions, self.cache, slots=self._slots_arg([s.slot for s in seqs]),
                                      kv_len=max(pos) + 1)
        return hidden[:, 0]

    @torch.inference_mode()
    def _logits(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, V]`` of the prefill and decode rows, in one vocabulary product."""
        return self.runner.compute_logits(torch.cat(parts) if len(parts) > 1 else parts[0])

    def _token_masks(self, batch: list[Sequence]) -> torch.Tensor | None:
        """``[B, V]`` bool: the ids each row's grammar allows next (all for rows without one);
        None when no row has a grammar."""
        rows = [i for i, s in enumerate(batch) if s.constraint is not None]
        if not rows:
            return None
        V = self.config.vocab_size
        if self._bitmask is None:
            self._bitmask = torch.empty(self.max_num_seqs, (V + 31) // 32, dtype=torch.int32)
        bitmask = self._bitmask[:len(batch)]
        bitmask.fill_(-1)  # all bits set: every id allowed
        for i in rows:
            batch[i].constraint.fill_bitmask(bitmask, i)
        return bitmask_to_bool(bitmask, V).to(self.device)

    def step(self) -> list[StepOutput]:
        """Run one step (module docstring); returns what happened to each sequence it touched,
        including sequences retired from outside since the last step."""
        with self._lock:
            externally = [s for s in self.running if s.seq_id in self._pending_finish]
        new = self._admit()
        outputs = [StepOutput(s, None, True) for s in externally]
        old = sorted(self.running, key=lambda s: s.slot)
        batch = new + old
        if not batch:
            return outputs
        self.running = old + new
        parts = []
        if new:
            parts.append(self._prefill(new))
            self.stats.prompt_tokens += sum(len(s.prompt_ids) for s in new)
            if self.prefix_cache is not None:
                for seq in new:  # concurrent requests with the same prefix can copy it from here
                    self.prefix_cache.record(seq.slot, seq.prompt_ids, len(seq.prompt_ids))
        if not new:
            burst = self._decode_greedy(old)
            if burst is not None:
                return outputs + burst
        if old:
            parts.append(self._decode(old))
        logits = self._logits(parts)
        result = sample(logits, [s.params for s in batch], [s.generator for s in batch], allowed=self.allowed,
                        prompt_ids=[s.prompt_ids for s in batch], output_ids=[s.output_ids for s in batch],
                        token_masks=self._token_masks(batch), end_ids=[s.end_ids for s in batch],
                        max_rows=self.backend.max_rows if self.backend is not None else None)
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist() if any(s.params.logprobs is not None for s in batch) else None
        now = time.monotonic()
        self.stats.steps += 1
        for i, seq in enumerate(batch):
            if i in result.errors:
                self.stats.sampling_errors += 1
                self._retire(seq, "error", error=result.errors[i])
                outputs.append(StepOutput(seq, None, True))
                continue
            tok = token_ids[i]
            seq.output_ids.append(tok)
            self.stats.generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if logprobs is not None:
                seq.logprobs.append(logprobs[i])
                seq.top_logprobs.append(result.top_logprobs[i])
            if seq.constraint is not None:
                if not seq.constraint.accept(tok):
                    self._retire(seq, "error", error=f"the response format's grammar refused token {tok}")
                    outputs.append(StepOutput(seq, tok, True))
                    continue
                if seq.constraint.terminated:  # the JSON is complete and its end token taken
                    self._retire(seq, "stop", stop_reason=tok)
                    outputs.append(StepOutput(seq, tok, True))
                    continue
            self._check_end(seq, tok)
            outputs.append(StepOutput(seq, tok, seq.finished))
        return outputs

    def _check_end(self, seq: Sequence, tok: int) -> None:
        """Retire ``seq`` if its new last token ``tok`` ends it: EOS (unless ``ignore_eos``), a
        stop id, or ``max_tokens`` reached."""
        if tok in self.eos_token_ids and not seq.params.ignore_eos:
            self._retire(seq, "stop", stop_reason=tok)
        elif tok in seq.params.stop_token_ids:
            self._retire(seq, "stop", stop_reason=tok)
        elif len(seq.output_ids) >= seq.max_tokens:
            self._retire(seq, "length")

    def _decode_greedy(self, seqs: list[Sequence]) -> list[StepOutput] | None:
        """Up to :attr:`num_scheduler_steps` decode steps for ``seqs`` (the running sequences, in
        slot order) in one call of the backend when each decodes greedily with nothing else to
        compute (:func:`~aquilachat.sampling.plain_greedy`, no grammar); the same tokens and
        retirements as that many :meth:`step` calls, each sequence cut at its first end. None
        when the step must run op by op instead (another kind of sequence, no backend, or the
        backend cannot run the whole step)."""
        if self.backend is None or not seqs or any(s.constraint is not None or not plain_greedy(s.params, len(s.output_ids))
                                                   for s in seqs):
            return None
        steps = min(self.num_scheduler_steps, *(s.max_tokens - len(s.output_ids) for s in seqs))
        ends = set()
        for s in seqs:
            ends.update(s.params.stop_token_ids)
            if not s.params.ignore_eos:
                ends.update(self.eos_token_ids)
        with torch.inference_mode():
            tokens = self.backend.decode_greedy([s.output_ids[-1] for s in seqs], [s.num_tokens - 1 for s in seqs],
                                                self.cache, [s.slot for s in seqs], steps, allowed=self.allowed,
                                                end_ids=sorted(t for t in ends if 0 <= t < self.config.vocab_size))
        # the burst wrote each row's entries for the steps it took and, when it stopped before a
        # pick that was not plain, for that step too (also for rows that had ended in it)
        written = min(len(tokens[0]) + 1, steps) if tokens is not None else 0  # None: no kernel call
        for s in seqs:
            s.cache_end = max(s.cache_end, s.num_tokens - 1 + written)
        if not tokens or not tokens[0]:
            return None
        self.stats.steps += len(tokens[0])
        outputs = []
        for seq, row in zip(seqs, tokens):
            for tok in row:
                seq.output_ids.append(tok)
                self.stats.generated_tokens += 1
                self._check_end(seq, tok)
                outputs.append(StepOutput(seq, tok, seq.finished))
                if seq.finished:
                    break
        return outputs
