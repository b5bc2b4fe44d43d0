"""``LLM``: the offline Python entry point (vLLM's ``LLM`` shape) over the engine."""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence as Seq

import torch

from .chat_format import get_template, render, template_name_of
from .checkpoint import Checkpoint
from .engine import Engine
from .errors import ValidationError
from .output_processor import ChoiceEvent, OutputProcessor, RequestState
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .structured_output import GrammarBackend

__all__ = ["LLM", "DEFAULT_MODEL"]

DEFAULT_MODEL = "aquila-tiny"


class LLM:
    """A loaded model with its tokenizer, chat template and engine.

    Before anything large is allocated, a memory plan (:mod:`aquilachat.memory`) decides the
    dtype, the KV cache slots and the context window from the memory available, and raises one
    clear error when the model cannot fit; :attr:`memory_plan` keeps it.

    Args:
        model: a bundled name (``"aquila-tiny"``), a checkpoint directory (Hugging Face or
            FlagAI layout), a Hugging Face repo id, or an opened
            :class:`~aquilachat.checkpoint.Checkpoint`.
        dtype: ``"auto"`` (the checkpoint's dtype; on the CPU a float16 checkpoint runs as
            bfloat16 where the CPU has native bfloat16, else as float32 when that fits:
            :func:`aquilachat.memory.choose_dtype`), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``, ...
        quantization: ``"int8"`` or ``"int4"``: weight-only quantization of the linear layers at
            load time, tensor by tensor (:mod:`aquilachat.quantization`; CPU only; with
            ``dtype="auto"`` the activations run in bfloat16). A checkpoint written by
            ``aquilachat quantize`` loads quantized without it (asking for another method is an
            error).
        template: chat template name for :meth:`chat` (default: the template of the checkpoint's
            ``chat_template`` when it is one of ours, else ``aquila-chat``).
        max_num_seqs: most sequences decoded together (KV cache slots; default 16, lowered to
            what the KV cache budget holds).
        max_model_len: context window in tokens (default: the model's, shortened when not even
            one slot of it fits).
        kv_cache_tokens: KV-token budget for admitting sequences (default: ``max_num_seqs *
            max_model_len``, i.e. no limit beyond the slots); see :class:`~aquilachat.engine.Engine`.
        kv_cache_memory: KV cache size: bytes or a size string (``"4GB"``, ``"512MiB"``), or a
            fraction in (0, 1] of the memory left after weights and workspace (default: 90 % of
            it, no more than the slots need); see :func:`aquilachat.memory.parse_kv_cache_memory`.
        enable_prefix_caching: reuse the keys and values of prompt prefixes across requests
            (vLLM's name; on by default; outputs are the same without it). See
            :mod:`aquilachat.prefix_cache`.
        num_scheduler_steps: decode steps the engine may run in one call when every running
            answer decodes greedily (vLLM's multi-step decoding; default 1, one token per step):
            the same tokens, faster for small models, in bursts of that many tokens; see
            :class:`~aquilachat.engine.Engine`.

    ``SamplingParams.structured_outputs`` (a JSON schema or any JSON object) is enforced with
    xgrammar (:mod:`aquilachat.structured_output`, the ``structured`` extra); the chat template's
    stop strings then do not apply (the answer ends when the JSON is complete).

    Raises:
        CheckpointError, ConfigError, TokenizerError: the model cannot be loaded (message names the file).
        MemoryPlanError: it does not fit in the available memory (the message has the numbers and
            the options that would fit).
    """

    def __init__(self, model: str | os.PathLike | Checkpoint = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto",
                 device: str = "auto", template: str | None = None, quantization: str | None = None,
                 max_num_seqs: int | None = None,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None,
                 kv_cache_memory: str | int | float | None = None, enable_prefix_caching: bool = True,
                 num_scheduler_steps: int = 1) -> None:
        ckpt = Checkpoint.open(model)
        self.model_name = str(model) if not isinstance(model, Checkpoint) else model.name
        self.memory_plan = ckpt.plan_memory(device=device, dtype=dtype, quantization=quantization,
                                            max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                            kv_cache_memory=kv_cache_memory)
        plan = self.memory_plan
        self.model = ckpt.load_model(dtype=plan.torch_dtype, device=plan.device, check_memory=False,
                                     quantization=quantization)
        self.config = self.model.config
        self.tokenizer = ckpt.load_tokenizer()
        self.template = get_template(template or template_name_of(self.tokenizer.chat_template))
        eos = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.engine = Engine(self.model, eos_token_ids=sorted(eos),
                             allowed=self.tokenizer.decodable_mask(self.config.vocab_size),
                             max_num_seqs=plan.num_slots, max_model_len=plan.max_model_len,
                             kv_cache_tokens=kv_cache_tokens, max_num_batched_tokens=plan.max_num_batched_tokens,
                             enable_prefix_caching=enable_prefix_caching, num_scheduler_steps=num_scheduler_steps)
        self.tokenizer.token_bytes(0)  # builds the detokenizer's byte table now (0.4 s for 100k ids), not in a request
        self._grammar_backend: GrammarBackend | None = None

    @property
    def grammar_backend(self) -> GrammarBackend:
        """Compiles response formats for this model's vocabulary (built on first use)."""
        if self._grammar_backend is None:
            self._grammar_backend = GrammarBackend.for_tokenizer(self.tokenizer, self.config.vocab_size,
                                                                 sorted(self.engine.eos_token_ids))
        return self._grammar_backend

    # ------------------------------------------------------------------ helpers
    def encode_chat(self, messages: Seq[dict]) -> list[int]:
        """Prompt ids of one conversation in this model's template."""
        return render(self.tokenizer, messages, self.template)

    # ------------------------------------------------------------------ running
    def _run(self, prompts: list[tuple[str | None, list[int]]],
             params: SamplingParams | Seq[SamplingParams] | None, *, chat: bool = False,
             on_delta: Callable[[int, int, str], None] | None = None,
             cap_to_context: bool = False) -> list[RequestOutput]:
        """Generate for already tokenized ``(text, ids)`` prompts. ``params``: one for every prompt
        (one request), or one per prompt (one request each, all in the same batches), as vLLM's
        ``LLM.generate``; every request is validated before any is generated. With ``chat``, the
        template's stop strings (:meth:`chat_stop`) end answers besides ``params.stop``;
        ``on_delta(prompt_index, answer_index, text)`` receives streamed text; ``cap_to_context``:
        see :meth:`stream_chat`."""
        per_prompt = _per_prompt_params(params, len(prompts))
        processor = OutputProcessor(self.engine, self.tokenizer)
        if per_prompt is None:
            params = params or SamplingParams()
            groups = [(self._prepare(processor, [ids for _, ids in prompts], params, chat=chat,
                                     cap_to_context=cap_to_context), 0)]
        else:
            groups = [(self._prepare(processor, [ids], p, chat=chat, cap_to_context=cap_to_context), i)
                      for i, ((_, ids), p) in enumerate(zip(prompts, per_prompt))]
        first = {id(request): start for request, start in groups}
        for request, event in self._drive(processor, [request for request, _ in groups]):
            if event.text and on_delta is not None:
                n = request.params.n
                on_delta(first[id(request)] + event.index // n, event.index % n, event.text)
        answers = []  # per prompt, its n answers
        for request, _ in groups:
            outputs, n = request.outputs(), request.params.n
            answers += [outputs[k * n:(k + 1) * n] for k in range(len(request.prompts))]
        return [RequestOutput(request_id=str(p), prompt=text, prompt_token_ids=list(ids), outputs=answers[p])
                for p, (text, ids) in enumerate(prompts)]

    def _prepare(self, processor: OutputProcessor, prompts: list[list[int]], params: SamplingParams, *,
                 chat: bool = False, cap_to_context: bool = False) -> RequestState:
        """Validate a request (:meth:`OutputProcessor.prepare`; a response format is compiled
        first) and return it, not yet added to the engine."""
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammar_backend.compile(params.structured_outputs)
        return processor.prepare(prompts, params, stop=self.chat_stop(params) if chat else (),
                                 cap_to_context=cap_to_context, grammar=grammar)

    def _drive(self, processor: OutputProcessor,
               requests: list[RequestState]) -> Iterator[tuple[RequestState, ChoiceEvent]]:
        """Queue ``requests`` and step the engine until it is idle, yielding each event with its
        request. If a step raises, or the caller stops iterating, the requests are aborted and the
        engine is left empty for the next call."""
        for request in requests:
            processor.add(request)
        try:
            while self.engine.has_unfinished():
                for request, events in processor.process(self.engine.step()):
                    for event in events:
                        yield request, event
        finally:
            if self.engine.has_unfinished():
                for request in requests:
                    processor.abort(request)
                while self.engine.has_unfinished():
                    self.engine.step()

    def generate(self, prompts: list[str] | str, params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """Raw completion (no template) of each prompt; returns one :class:`RequestOutput` per prompt.
        ``params``: one :class:`SamplingParams` for every prompt, or a list of one per prompt (as
        vLLM's ``LLM.generate``).

        Raises:
            ValidationError: a prompt too long for the context window with its ``max_tokens``, an
                empty prompt, or a ``params`` list whose length is not the number of prompts (field
                ``params``), before any generation.
        """
        if prompt_token_ids is not None:
            items = [(None, list(ids)) for ids in prompt_token_ids]
        else:
            if isinstance(prompts, str):
                prompts = [prompts]
            items = [(p, self.tokenizer.encode(p)) for p in prompts]
        return self._run(items, params)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | Seq[SamplingParams] | None = None,
             *, on_delta: Callable[[int, int, str], None] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or several (a list of
        such lists) in the chat template; the template's stop strings end answers besides
        ``params.stop``. ``params``: one for every conversation, or a list of one per conversation.

        Raises:
            ValidationError: malformed messages, a conversation too long for the context window, or
                a ``params`` list whose length is not the number of conversations.
        """
        if not isinstance(messages, list) or not messages:
            raise ValidationError("messages", "messages must be a non-empty list")
        conversations = messages if isinstance(messages[0], list) else [messages]
        items = [(None, self.encode_chat(c)) for c in conversations]
        return self._run(items, params, chat=True, on_delta=on_delta)

    def chat_stop(self, params: SamplingParams) -> tuple[str, ...]:
        """The template's stop strings for a chat answer; none with a response format (the grammar
        ends the answer when the JSON is complete, and a ``###`` inside a JSON string must not)."""
        return () if params.structured_outputs is not None else self.template.stop

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None, *,
                    cap_to_context: bool = False) -> Iterator[str]:
        """Answer one conversation, yielding text deltas as they are generated (never half a
        UTF-8 character, never a piece of a stop string). After the iterator ends,
        :attr:`last_output` holds the :class:`RequestOutput`.

        Raises:
            ValidationError: malformed messages, or prompt + max_tokens beyond the context window
                (with ``cap_to_context``, max_tokens is capped instead: finish_reason "length").
        """
        params = (params or SamplingParams()).replace(n=1)
        ids = self.encode_chat(messages)
        processor = OutputProcessor(self.engine, self.tokenizer)
        request = self._prepare(processor, [ids], params, chat=True, cap_to_context=cap_to_context)
        self.last_output = None
        for _, event in self._drive(processor, [request]):
            if event.text:
                yield event.text
        self.last_output = RequestOutput("0", None, ids, request.outputs())


def _per_prompt_params(params, count: int) -> list[SamplingParams] | None:
    """``None`` for one :class:`SamplingParams` (or none) shared by every prompt; else the list of
    ``count`` per-prompt params.

    Raises:
        ValidationError: (field ``params``) not a SamplingParams or a list of them, or a list whose
            length is not ``count``.
    """
    if params is None or isinstance(params, SamplingParams):
        return None
    if not isinstance(params, (list, tuple)):
        raise ValidationError("params", f"params must be a SamplingParams or a list of them, not {type(params).__name__}")
    if len(params) != count:
        raise ValidationError("params", f"{len(params)} SamplingParams for {count} prompts: give one for all, "
                                        f"or one per prompt")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValidationError("params", f"params[{i}] must be a SamplingParams, not {type(p).__name__}")
    return list(params)
