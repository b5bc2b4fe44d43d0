"""Serving: a validated request -> prompt ids and sampling parameters -> engine -> response.

Nothing here touches HTTP; :mod:`aquilachat.server.app` routes requests here and turns
:class:`APIError` into the right error body. Streamed answers are returned as a :class:`Stream`
(server-sent event strings plus a ``close`` that aborts generation), so the router can stop
generation whenever the response ends, even if the stream was never iterated.

Serving needs the tokenizer, the chat template and the :class:`AsyncEngine` (and, for
``response_format``, a :class:`~aquilachat.structured_output.GrammarBackend`), and nothing else.
Requests run as on the offline :class:`~aquilachat.llm.LLM`: prompt ids from the template's
renderer (:func:`~aquilachat.chat_format.render`) or the tokenizer, sampling parameters from the
request's ``to_sampling_params()``, the template's stop strings on chat answers, answer ``i`` of
``n`` seeded with ``seed + i``, and the same :class:`~aquilachat.output_processor.OutputProcessor`
turning tokens into text. So a request with a seed returns what ``LLM.chat`` / ``LLM.generate``
return for the same seed.

Log-probabilities (``logprobs`` / ``top_logprobs`` on chat, ``logprobs: N`` and ``echo`` on
completions) are those of the model's own distribution, before temperature, penalties,
``logit_bias`` and filters (:mod:`aquilachat.sampling`, step 1; OpenAI's and vLLM's definition),
natural logs, ``-inf`` reported as -9999.0 (JSON has no infinity; vLLM's value). An echoed
prompt's log-probabilities come from the same prefill pass that starts the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

from pydantic import BaseModel

from ..chat_format import ChatTemplate, render
from ..errors import ValidationError
from ..output_processor import stop_string_token_ids
from ..outputs import CompletionOutput
from ..sampling import CONSTRAINT_ERROR
from ..sampling_params import SamplingParams
from ..structured_output import GrammarBackend
from ..tokenizer import Tokenizer
from .async_engine import INTERNAL_ERROR, AsyncEngine, ChoiceEvent, QueueFullError, RequestHandle
from .limits import DEFAULT_COMPLETION_MAX_TOKENS, MAX_TOKENS_LIMIT, QUEUE_FULL_RETRY_AFTER_S
from .protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionRequest,
                       ChatCompletionResponse, ChatCompletionStreamChoice, ChatCompletionTokenLogprob,
                       ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                       DeltaMessage, ErrorDetail, ErrorResponse, FlagAICompletion, FlagAIRequest, FlagAIResponse,
                       LegacyRequest, LegacyResponse, ModelCard, ModelList, PromptTokensDetails, TopLogprob,
                       UsageInfo)

__all__ = ["Serving", "APIError", "Stream", "LEGACY_TIME_FORMAT", "FLAGAI_GENERATION_ERROR_STATUS"]

log = logging.getLogger("aquilachat.server")

#: The ``time`` field of the original API.
LEGACY_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Log-probability reported for an impossible token (JSON has no -Infinity; vLLM's value).
MIN_LOGPROB = -9999.0
#: Status of a FlagAI-route request whose generation failed (non-finite logits): FlagAI's routes
#: never answer 500 (the original's failure), so the request is reported as one this model cannot process.
FLAGAI_GENERATION_ERROR_STATUS = 422


class APIError(Exception):
    """An error answer: HTTP ``status``, a readable ``message`` (naming the field in ``param``),
    an OpenAI error ``type`` and ``code``, and extra response ``headers`` (``Retry-After``)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict:
        """The OpenAI error object ``{"error": {...}}``."""
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump(mode="json")

    def legacy_body(self) -> dict:
        """The original API's shape: ``{"response": "", "status": ..., "time": ..., "error": ...}``."""
        return LegacyResponse(response="", status=self.status, time=time.strftime(LEGACY_TIME_FORMAT),
                              error=self.message).model_dump(mode="json")

    def flagai_body(self, model_name: str, input_length: int = 0) -> dict:
        """FlagAI's ``/func`` shape with no completions: ``{"completions": [], "input_length",
        "model_info", "status", "error"}``."""
        return FlagAIResponse(completions=[], input_length=input_length, model_info=model_name, status=self.status,
                              error=self.message).model_dump(mode="json")


@dataclass
class Stream:
    """A streamed answer: ``chunks`` yields server-sent event strings (or plain text with
    ``media_type="text/plain"``); ``close()`` aborts the generation (idempotent, harmless once finished)."""

    chunks: AsyncIterator[str]
    close: Callable[[], None]
    media_type: str = "text/event-stream"


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _validation_error(exc: ValidationError, prompt_param: str) -> APIError:
    """A 400 naming the field the error names; ``prompt_param`` is the request's field for the
    prompt (``messages``, ``prompt``, ``history``), named for errors of the prompt or of no one field."""
    param = prompt_param if exc.field in (None, "prompt") else exc.field
    return APIError(400, str(exc), param=param)


def _generation_error(output: CompletionOutput) -> APIError:
    if output.error == INTERNAL_ERROR:
        return APIError(500, INTERNAL_ERROR, type="internal_error", code="internal_error")
    if output.error == CONSTRAINT_ERROR:  # e.g. min_tokens beyond where the response format's JSON ends
        return APIError(400, f"generation stopped: {output.error}", code="no_valid_token")
    return APIError(500, f"generation failed: {output.error}", type="model_error", code="generation_error")


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


class _TokenSlice:
    """The ids, log-probabilities and alternatives of some of an answer's tokens."""

    def __init__(self, ids: list[int], logprobs: list[float], tops: list | None) -> None:
        self.ids, self.logprobs, self.tops = ids, logprobs, tops


def _event_tokens(handle: RequestHandle, e: ChoiceEvent) -> _TokenSlice:
    """The tokens an event covers (:attr:`ChoiceEvent.tokens`), from the final output once finished,
    else from the running sequence (lists the engine thread only appends to)."""
    start, end = e.tokens
    if e.finished:
        out = e.output
        return _TokenSlice(out.token_ids[start:end], (out.logprobs or [])[start:end],
                           out.top_logprobs[start:end] if out.top_logprobs else None)
    seq = handle.request.choices[e.index].seq
    return _TokenSlice(seq.output_ids[start:end], seq.logprobs[start:end],
                       seq.top_logprobs[start:end] if seq.params.logprobs else None)


class Serving:
    """Serves a model through an :class:`AsyncEngine` (module docstring).

    Args:
        engine: the background engine.
        tokenizer: the model's tokenizer (prompts of ``/v1/completions``).
        template: the chat template (chat prompts and their stop strings).
        model_name: the id clients use (``/v1/models``; other ids -> 404).
        log_prompts: log prompts and answers (off by default: they may be private).
        grammar: compiles ``response_format`` (default: one for ``tokenizer`` and the engine's
            vocabulary, built on first use).
    """

    def __init__(self, engine: AsyncEngine, *, tokenizer: Tokenizer, template: ChatTemplate, model_name: str,
                 log_prompts: bool = False, grammar: GrammarBackend | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.model_name = model_name
        self.log_prompts = log_prompts
        self.created = int(time.time())
        self._grammar = grammar

    @property
    def grammar(self) -> GrammarBackend:
        """The response-format compiler."""
        if self._grammar is None:
            core = self.engine.engine
            self._grammar = GrammarBackend.for_tokenizer(self.tokenizer, core.config.vocab_size,
                                                         sorted(core.eos_token_ids))
        return self._grammar

    # ------------------------------------------------------------------ helpers
    def models(self) -> ModelList:
        """``GET /v1/models``."""
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created,
                                         max_model_len=self.engine.engine.max_model_len)])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of one conversation in the chat template.

        Raises:
            ValidationError: malformed messages (see :func:`~aquilachat.chat_format.render`).
        """
        return render(self.tokenizer, messages, self.template)

    def _check(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    @staticmethod
    def _params(req: ChatCompletionRequest | CompletionRequest | LegacyRequest | FlagAIRequest, *args,
                **overrides) -> SamplingParams:
        try:
            return req.to_sampling_params(*args, **overrides)
        except ValidationError as exc:
            raise _validation_error(exc, "prompt") from None

    async def _encode_chat(self, messages: list[dict], param: str) -> list[int]:
        try:  # tokenizing a long conversation takes a while: not on the event loop
            return await asyncio.to_thread(self.encode_chat, messages)
        except ValidationError as exc:
            raise _validation_error(exc, param) from None

    async def _compile(self, params: SamplingParams, stop: Sequence[str] = ()):
        """The compiled response format of ``params`` (None without one), compiled off the event
        loop (the first request also builds the vocabulary's tables: seconds for 100k ids). With
        ``min_tokens``, the ids that would start one of its stop strings (``stop``: the template's,
        besides ``params.stop``) are found off the loop too (a pass over the vocabulary per new
        stop string; cached)."""
        if params.min_tokens:
            await asyncio.to_thread(stop_string_token_ids, self.tokenizer, [*params.stop, *stop])
        if params.structured_outputs is None:
            return None
        try:
            return await asyncio.to_thread(self.grammar.compile, params.structured_outputs,
                                           "response_format.json_schema.schema")
        except ValidationError as exc:
            raise _validation_error(exc, "response_format") from None

    def _submit(self, prompts: list[list[int]], params: SamplingParams, *, chat: bool, cap_to_context: bool,
                param: str, grammar=None) -> RequestHandle:
        # a response format's grammar ends the answer; the template's "###" inside a JSON string must not
        stop = self.template.stop if chat and params.structured_outputs is None else ()
        try:
            return self.engine.submit(prompts, params, stop=stop, cap_to_context=cap_to_context,
                                      request_id=uuid.uuid4().hex[:16], grammar=grammar)
        except ValidationError as exc:
            raise _validation_error(exc, param) from None
        except QueueFullError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}) from None

    async def _collect(self, handle: RequestHandle) -> list[CompletionOutput]:
        """Wait for every answer; abort the request if the caller is cancelled (client gone)."""
        outputs: list[CompletionOutput | None] = [None] * handle.num_choices
        try:
            async for events in handle.events():
                for event in events:
                    if event.finished:
                        outputs[event.index] = event.output
        finally:
            self.engine.abort(handle)
        for out in outputs:
            if out.finish_reason == "error":
                raise _generation_error(out)
        return outputs  # type: ignore[return-value]

    def _log(self, handle: RequestHandle, kind: str, outputs: list[CompletionOutput], prompt=None) -> None:
        seconds = time.monotonic() - handle.arrival
        log.info("%s %s: %d prompt tokens, %d generated, finish %s, %.3f s", handle.request_id, kind,
                 sum(handle.prompt_lens), sum(len(o.token_ids) for o in outputs if o is not None),
                 ",".join(str(o.finish_reason) for o in outputs if o is not None), seconds)
        if self.log_prompts:
            log.info("%s prompt: %s", handle.request_id, json.dumps(prompt, ensure_ascii=False))
            log.info("%s answers: %s", handle.request_id,
                     json.dumps([o.text for o in outputs if o is not None], ensure_ascii=False))

    def _usage(self, handle: RequestHandle, outputs: list[CompletionOutput], *, generated: bool = True) -> UsageInfo:
        prompt = sum(handle.prompt_lens)
        completion = sum(len(o.token_ids) for o in outputs if o is not None) if generated else 0
        n = handle.request.params.n
        cached = sum(o.num_cached_tokens for o in outputs[::n] if o is not None)  # each prompt once
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    # ------------------------------------------------------------------ log-probabilities
    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def _chat_logprobs(self, tokens: _TokenSlice) -> ChoiceLogprobs:
        """OpenAI's chat ``logprobs``: per token its text, log-probability, bytes and alternatives."""
        content = []
        for i, (tid, lp) in enumerate(zip(tokens.ids, tokens.logprobs)):
            tops = tokens.tops[i] if tokens.tops is not None else []
            content.append(ChatCompletionTokenLogprob(
                token=self._token_str(tid), logprob=_logprob(lp), bytes=list(self.tokenizer.token_bytes(tid)),
                top_logprobs=[TopLogprob(token=self._token_str(t), logprob=_logprob(v),
                                         bytes=list(self.tokenizer.token_bytes(t))) for t, v in tops]))
        return ChoiceLogprobs(content=content)

    def _completion_logprobs(self, ids: list[int], logprobs: list[float | None], tops: list | None,
                             offset: int) -> CompletionLogprobs:
        """OpenAI's legacy completion ``logprobs`` of ``ids`` (a ``None`` log-probability: the
        first token of an echoed prompt); ``tops`` per token ``[(id, logprob)]`` (None: none asked);
        each ``top_logprobs`` dict holds the alternatives and the token itself (OpenAI: "up to
        logprobs + 1 elements"); ``offset``: the text offset of the first token."""
        texts = [self._token_str(t) for t in ids]
        top_dicts: list[dict[str, float] | None] = []
        offsets = []
        for i, (tid, lp) in enumerate(zip(ids, logprobs)):
            offsets.append(offset)
            offset += len(texts[i])
            if lp is None:
                top_dicts.append(None)
                continue
            entry: dict[str, float] = {}
            for t, v in (tops[i] if tops is not None else []):  # most likely first: ids that print
                entry.setdefault(self._token_str(t), _logprob(v))  # alike (U+FFFD) keep the best
            entry.setdefault(texts[i], _logprob(lp))
            top_dicts.append(entry)
        return CompletionLogprobs(tokens=texts, token_logprobs=[None if lp is None else _logprob(lp) for lp in logprobs],
                                  top_logprobs=top_dicts, text_offset=offsets)

    def _echo_logprobs(self, prompt_ids: list[int], output: CompletionOutput) -> CompletionLogprobs:
        """The completion ``logprobs`` of an echoed prompt, from the prefill's prompt log-probabilities."""
        pairs = output.prompt_logprobs or [None] * len(prompt_ids)
        return self._completion_logprobs(prompt_ids, [None if p is None else p[0] for p in pairs],
                                         [[] if p is None else p[1] for p in pairs], 0)

    async def _stream(self, handle: RequestHandle, kind: str, prompt, include_usage: bool,
                      chunk: Callable[..., dict], choice: Callable[[ChoiceEvent], BaseModel],
                      first: Sequence[BaseModel] = (), generated: bool = True) -> AsyncIterator[str]:
        """The server-sent events of a streamed request: ``chunk([c])`` for each of ``first``, then
        ``chunk([choice(event)])`` per event, the usage chunk (``chunk([], usage)``) if asked, and
        ``[DONE]``. An answer that fails ends the stream with an error event. ``generated``
        False: the answers' tokens are not counted (``max_tokens: 0``)."""
        outputs: list[CompletionOutput | None] = [None] * handle.num_choices
        try:
            for c in first:
                yield _sse(chunk([c]))
            async for events in handle.events():
                for e in events:
                    if e.finished and e.output.finish_reason == "error":
                        yield _sse(_generation_error(e.output).openai_body())
                        return
                    if e.finished:
                        outputs[e.index] = e.output
                    yield _sse(chunk([choice(e)]))
            if include_usage:
                yield _sse(chunk([], self._usage(handle, outputs, generated=generated)))
            yield _sse("[DONE]")
            self._log(handle, f"{kind} stream", outputs, prompt)
        finally:
            self.engine.abort(handle)

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | Stream:
        """``POST /v1/chat/completions``.

        Raises:
            APIError: 400 (bad messages or parameters, prompt too long), 404 (unknown model),
                429 (queue full), 500 (generation failed; non-streamed only).
        """
        self._check(req)
        params = self._params(req, MAX_TOKENS_LIMIT)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self._encode_chat(messages, "messages")
        grammar = await self._compile(params, self.template.stop)
        handle = self._submit([ids], params, chat=True, cap_to_context=req.requested_max_tokens() is None,
                              param="messages", grammar=grammar)
        rid = f"chatcmpl-{handle.request_id}"
        want_logprobs = params.logprobs is not None
        if req.stream:
            first = [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(handle.num_choices)]

            def delta(e: ChoiceEvent) -> ChatCompletionStreamChoice:
                return ChatCompletionStreamChoice(
                    index=e.index, delta=DeltaMessage(content=e.text or None),
                    logprobs=self._chat_logprobs(_event_tokens(handle, e)) if want_logprobs else None,
                    finish_reason=e.output.finish_reason if e.finished else None)

            return self._stream_response(req, handle, "chat", messages, ChatCompletionChunk, rid, delta, first)
        outputs = await self._collect(handle)
        self._log(handle, "chat", outputs, messages)
        return ChatCompletionResponse(
            id=rid, model=self.model_name, usage=self._usage(handle, outputs),
            choices=[ChatCompletionChoice(
                index=o.index, message=ChatCompletionMessage(content=o.text), finish_reason=o.finish_reason,
                logprobs=self._chat_logprobs(_TokenSlice(o.token_ids, o.logprobs or [], o.top_logprobs))
                if want_logprobs else None) for o in outputs])

    def _stream_response(self, req: ChatCompletionRequest | CompletionRequest, handle: RequestHandle, kind: str,
                         prompt, chunk: type[BaseModel], rid: str, choice: Callable[[ChoiceEvent], BaseModel],
                         first: Sequence[BaseModel] = (), generated: bool = True) -> Stream:
        """A streamed answer: events of the ``chunk`` model with id ``rid``, ``choice(event)`` as
        each event's one choice, ``first`` before any event (see :meth:`_stream`)."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        def make(choices, usage=None) -> dict:
            return chunk(id=rid, created=created, model=self.model_name, choices=choices,
                         usage=usage).model_dump(mode="json")

        return Stream(self._stream(handle, kind, prompt, include_usage, make, choice, first, generated),
                      lambda: self.engine.abort(handle))

    # ------------------------------------------------------------------ completions
    async def completion(self, req: CompletionRequest) -> CompletionResponse | Stream:
        """``POST /v1/completions`` (raw text, no template). ``echo`` puts the prompt before each
        answer (and, with ``logprobs``, its tokens' log-probabilities, from the prefill pass);
        ``max_tokens: 0`` generates nothing: the engine samples one token, which is dropped (as
        vLLM does), so a prompt is scored in one prefill.

        Raises:
            APIError: 400, 404, 429, 500 as :meth:`chat`.
        """
        self._check(req)
        zero = req.max_tokens == 0
        overrides: dict = {"max_tokens": 1} if zero else {}
        if req.echo and req.logprobs is not None:
            overrides["prompt_logprobs"] = req.logprobs
        params = self._params(req, DEFAULT_COMPLETION_MAX_TOKENS, **overrides)
        prompt = req.prompt
        if isinstance(prompt, str):
            texts: list[str] | None = [prompt]
        elif isinstance(prompt[0], str):
            texts = list(prompt)  # type: ignore[arg-type]
        else:
            texts = None
        if texts is not None:
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(t) for t in texts])
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in prompt]  # type: ignore[union-attr]
        grammar = await self._compile(params)
        handle = self._submit(prompts, params, chat=False, cap_to_context=req.max_tokens is None, param="prompt",
                              grammar=grammar)
        n = params.n
        echoes = None
        if req.echo:
            echoes = texts if texts is not None else [self.tokenizer.decode(ids) for ids in prompts]
        rid = f"cmpl-{handle.request_id}"
        if req.stream:
            started: set[int] = set()
            offsets: dict[int, int] = {}

            def delta(e: ChoiceEvent) -> CompletionChoice:
                text, logprobs = ("" if zero else e.text), None
                tokens = _event_tokens(handle, e) if req.logprobs is not None else None
                if tokens is not None and zero:
                    tokens = _TokenSlice([], [], None)
                if e.index not in started:
                    started.add(e.index)
                    if echoes is not None:
                        p = e.index // n
                        text = echoes[p] + text
                        if tokens is not None:
                            seq = handle.request.choices[e.index].seq
                            logprobs = self._echo_logprobs(prompts[p], CompletionOutput(
                                0, prompt_logprobs=seq.prompt_logprobs))
                            offsets[e.index] = len(echoes[p])
                if tokens is not None:
                    part = self._completion_logprobs(tokens.ids, tokens.logprobs, tokens.tops,
                                                     offsets.get(e.index, 0))
                    offsets[e.index] = (part.text_offset[-1] + len(part.tokens[-1])) if part.tokens else \
                        offsets.get(e.index, 0)
                    logprobs = part if logprobs is None else _join(logprobs, part)
                return CompletionChoice(index=e.index, text=text, logprobs=logprobs,
                                        finish_reason=e.output.finish_reason if e.finished else None)

            return self._stream_response(req, handle, "completion", texts, CompletionResponse, rid, delta,
                                         generated=not zero)
        outputs = await self._collect(handle)
        self._log(handle, "completion", outputs, texts)
        choices = []
        for i, o in enumerate(outputs):
            p = i // n
            text, ids, lps, tops = o.text, o.token_ids, o.logprobs or [], o.top_logprobs
            if zero:
                text, ids, lps, tops = "", [], [], None
            logprobs = None
            if req.logprobs is not None:
                offset = len(echoes[p]) if echoes is not None else 0
                logprobs = self._completion_logprobs(ids, lps, tops, offset)
                if echoes is not None:
                    logprobs = _join(self._echo_logprobs(prompts[p], o), logprobs)
            if echoes is not None:
                text = echoes[p] + text
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=o.finish_reason))
        return CompletionResponse(id=rid, model=self.model_name, choices=choices,
                                  usage=self._usage(handle, outputs, generated=not zero))

    # ------------------------------------------------------------------ the original API
    async def legacy(self, req: LegacyRequest) -> LegacyResponse:
        """``POST /``: the prompt (after ``history``) answered in the chat template; the answer
        ends at ``max_new_tokens`` or at the context window, whichever comes first.

        Raises:
            APIError: as :meth:`chat`.
        """
        params = self._params(req)
        messages: list[dict] = []
        for human, assistant in req.history:
            messages += [{"role": "user", "content": human}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": req.prompt})
        ids = await self._encode_chat(messages, "history")
        handle = self._submit([ids], params, chat=True, cap_to_context=True, param="prompt")
        outputs = await self._collect(handle)
        self._log(handle, "legacy", outputs, messages)
        text = outputs[0].text
        if text.startswith(" "):  # the template's answer prefix, as the original server stripped it
            text = text[1:]
        return LegacyResponse(response=text, status=200, time=time.strftime(LEGACY_TIME_FORMAT))


    # ------------------------------------------------------------------ FlagAI's Aquila server
    async def flagai(self, req: FlagAIRequest, *, stream: bool = False) -> FlagAIResponse | Stream:
        """``POST /func`` (``stream=False``) and ``POST /stream_func``: FlagAI's Aquila server API
        (``examples/Aquila/Aquila-server/aquila_server.py``) on this engine and template.

        ``sft`` (always on ``/stream_func``) answers ``prompt`` after ``history`` in the chat
        template, dropping the oldest messages that do not fit the context window; otherwise the
        prompt is completed as raw text after the BOS token (FlagAI's non-sft path). Either way
        the answer ends at the template's stop strings and loses one leading space, as FlagAI's
        ``predict`` cut it; ``tokens`` are the answer's tokens (FlagAI cut them to the text too),
        ``logprobs`` their log-probabilities. ``/stream_func`` streams the answer as plain text.

        Raises:
            APIError: 400 (bad fields, history that does not alternate), 429, and
                :data:`FLAGAI_GENERATION_ERROR_STATUS` when generation fails.
        """
        params = self._params(req)
        if req.sft or stream:
            ids = await self._flagai_chat_ids(req, params)
        else:  # FlagAI: encode_plus(re.sub('\\n+', '\\n', prompt))["input_ids"][:-1]: BOS + text
            bos = self.tokenizer.bos_token_id
            text = re.sub("\n+", "\n", req.prompt)
            ids = ([bos] if bos is not None else []) + await asyncio.to_thread(self.tokenizer.encode, text)
        await self._compile(params, self.template.stop)
        handle = self._submit([ids], params, chat=True, cap_to_context=True, param="prompt")
        if stream:
            return Stream(self._flagai_stream(handle), lambda: self.engine.abort(handle), media_type="text/plain")
        try:
            outputs = await self._collect(handle)
        except APIError as exc:
            if exc.status == 500 and exc.type == "model_error":
                exc.status = FLAGAI_GENERATION_ERROR_STATUS
            raise
        self._log(handle, "flagai", outputs, req.prompt)
        out = outputs[0]
        text, token_ids, logprobs = out.text, out.token_ids, out.logprobs or []
        # the tokens that spell the text (FlagAI cut its token list to the text's token count)
        target, spelled, keep = len(text.encode("utf-8")), 0, 0
        for tid in token_ids:
            if spelled >= target:
                break
            spelled += len(self.tokenizer.token_bytes(tid, skip_special_tokens=True))
            keep += 1
        token_ids, logprobs = token_ids[:keep], logprobs[:keep]
        if text.startswith(" "):  # the template's answer prefix, as FlagAI stripped it
            text = text[1:]
            if token_ids and self.tokenizer.token_bytes(token_ids[0]) == b" ":
                token_ids, logprobs = token_ids[1:], logprobs[1:]
        tokens = [self.tokenizer.id_to_token(t) or "[unkonwn_token]" for t in token_ids]  # FlagAI's fallback
        values = [_logprob(v) for v in logprobs]
        return FlagAIResponse(
            completions=[FlagAICompletion(text=text, tokens=tokens, logprobs=values,
                                          top_logprobs_dicts=[{t: v} for t, v in zip(tokens, values)],
                                          model_in=self.tokenizer.decode(ids))],
            input_length=len(req.prompt), model_info=self.model_name)

    async def _flagai_chat_ids(self, req: FlagAIRequest, params: SamplingParams) -> list[int]:
        """Prompt ids of ``history`` + ``prompt`` in the template, oldest messages dropped until
        the prompt leaves room for the answer (``max_new_tokens``, at most a quarter of the window)."""
        messages = [{"role": "assistant" if role == "ASSISTANT" else "user", "content": text}
                    for role, text in req.history] + [{"role": "user", "content": req.prompt}]
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")  # leading answers are dropped
        for i in range(first + 1, len(messages)):
            if messages[i]["role"] == messages[i - 1]["role"]:
                where = f"history[{i}]" if i < len(req.history) else "the prompt"
                raise APIError(400, f"history: {where} follows another {messages[i]['role']} message; the user's and "
                                    "the ASSISTANT's messages must alternate, and the history must end with an "
                                    "ASSISTANT message (the prompt is the user's)", param="history")
        window = self.engine.engine.max_model_len
        room = min(params.max_tokens, window // 4)

        def fit() -> list[int]:
            nonlocal messages
            while True:
                while messages[0]["role"] != "user":
                    messages = messages[1:]
                ids = self.encode_chat(messages)
                if len(ids) + room <= window or len(messages) == 1:
                    return ids
                messages = messages[1:]

        try:
            return await asyncio.to_thread(fit)
        except ValidationError as exc:
            raise _validation_error(exc, "history") from None

    async def _flagai_stream(self, handle: RequestHandle) -> AsyncIterator[str]:
        """The answer's text deltas as plain text (a failed generation just ends the stream, as
        FlagAI's did: plain text has no place for an error)."""
        outputs: list[CompletionOutput | None] = [None]
        try:
            async for events in handle.events():
                for e in events:
                    if e.finished:
                        outputs[0] = e.output
                        if e.output.finish_reason == "error":
                            log.warning("%s stream_func: generation failed: %s", handle.request_id, e.output.error)
                            return
                    if e.text:
                        yield e.text
            self._log(handle, "flagai stream", outputs)
        finally:
            self.engine.abort(handle)


def _join(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    """Two runs of completion ``logprobs`` one after the other (an echoed prompt, then its answer)."""
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)
