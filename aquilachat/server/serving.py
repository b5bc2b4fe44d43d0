"""Serving: a validated request -> prompt ids and sampling parameters -> engine -> response.

Nothing here touches HTTP; :mod:`aquilachat.server.app` routes requests here and turns
:class:`APIError` into the right error body. Streamed answers are returned as a :class:`Stream`
(server-sent event strings plus a ``close`` that aborts generation), so the router can stop
generation whenever the response ends, even if the stream was never iterated.

Serving needs the tokenizer, the chat template and the :class:`AsyncEngine`, and nothing else.
Requests run as on the offline :class:`~aquilachat.llm.LLM`: prompt ids from the template's
renderer (:func:`~aquilachat.chat_format.render`) or the tokenizer, sampling parameters from the
request's ``to_sampling_params()``, the template's stop strings on chat answers, answer ``i`` of
``n`` seeded with ``seed + i``, and the same :class:`~aquilachat.output_processor.OutputProcessor`
turning tokens into text. So a request with a seed returns what ``LLM.chat`` / ``LLM.generate``
return for the same seed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

from pydantic import BaseModel

from ..chat_format import ChatTemplate, render
from ..errors import ValidationError
from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from .async_engine import INTERNAL_ERROR, AsyncEngine, ChoiceEvent, QueueFullError, RequestHandle
from .limits import DEFAULT_COMPLETION_MAX_TOKENS, MAX_TOKENS_LIMIT, QUEUE_FULL_RETRY_AFTER_S
from .protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionRequest,
                       ChatCompletionResponse, ChatCompletionStreamChoice, CompletionChoice, CompletionRequest,
                       CompletionResponse, DeltaMessage, ErrorDetail, ErrorResponse, LegacyRequest,
                       LegacyResponse, ModelCard, ModelList, UsageInfo)

__all__ = ["Serving", "APIError", "Stream", "LEGACY_TIME_FORMAT"]

log = logging.getLogger("aquilachat.server")

#: The ``time`` field of the original API.
LEGACY_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


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


@dataclass
class Stream:
    """A streamed answer: ``chunks`` yields server-sent event strings; ``close()`` aborts the
    generation (idempotent, harmless once finished)."""

    chunks: AsyncIterator[str]
    close: Callable[[], None]


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
    return APIError(500, f"generation failed: {output.error}", type="model_error", code="generation_error")


def _chat_delta(e: ChoiceEvent) -> ChatCompletionStreamChoice:
    return ChatCompletionStreamChoice(index=e.index, delta=DeltaMessage(content=e.text or None),
                                      finish_reason=e.output.finish_reason if e.finished else None)


def _completion_delta(e: ChoiceEvent) -> CompletionChoice:
    return CompletionChoice(index=e.index, text=e.text, finish_reason=e.output.finish_reason if e.finished else None)


class Serving:
    """Serves a model through an :class:`AsyncEngine` (module docstring).

    Args:
        engine: the background engine.
        tokenizer: the model's tokenizer (prompts of ``/v1/completions``).
        template: the chat template (chat prompts and their stop strings).
        model_name: the id clients use (``/v1/models``; other ids -> 404).
        log_prompts: log prompts and answers (off by default: they may be private).
    """

    def __init__(self, engine: AsyncEngine, *, tokenizer: Tokenizer, template: ChatTemplate, model_name: str,
                 log_prompts: bool = False) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.model_name = model_name
        self.log_prompts = log_prompts
        self.created = int(time.time())

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
    def _params(req: ChatCompletionRequest | CompletionRequest | LegacyRequest, *args) -> SamplingParams:
        try:
            return req.to_sampling_params(*args)
        except ValidationError as exc:
            raise _validation_error(exc, "prompt") from None

    async def _encode_chat(self, messages: list[dict], param: str) -> list[int]:
        try:  # tokenizing a long conversation takes a while: not on the event loop
            return await asyncio.to_thread(self.encode_chat, messages)
        except ValidationError as exc:
            raise _validation_error(exc, param) from None

    def _submit(self, prompts: list[list[int]], params: SamplingParams, *, chat: bool, cap_to_context: bool,
                param: str) -> RequestHandle:
        try:
            return self.engine.submit(prompts, params, stop=self.template.stop if chat else (),
                                      cap_to_context=cap_to_context, request_id=uuid.uuid4().hex[:16])
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

    def _usage(self, handle: RequestHandle, outputs: list[CompletionOutput]) -> UsageInfo:
        prompt = sum(handle.prompt_lens)
        completion = sum(len(o.token_ids) for o in outputs if o is not None)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def _stream(self, handle: RequestHandle, kind: str, prompt, include_usage: bool,
                      chunk: Callable[..., dict], choice: Callable[[ChoiceEvent], BaseModel],
                      first: Sequence[BaseModel] = ()) -> AsyncIterator[str]:
        """The server-sent events of a streamed request: ``chunk([c])`` for each of ``first``, then
        ``chunk([choice(event)])`` per event, the usage chunk (``chunk([], usage)``) if asked, and
        ``[DONE]``. An answer that fails ends the stream with an error event."""
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
                yield _sse(chunk([], self._usage(handle, outputs)))
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
        handle = self._submit([ids], params, chat=True, cap_to_context=req.requested_max_tokens() is None,
                              param="messages")
        rid = f"chatcmpl-{handle.request_id}"
        if req.stream:
            first = [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(handle.num_choices)]
            return self._stream_response(req, handle, "chat", messages, ChatCompletionChunk, rid, _chat_delta, first)
        outputs = await self._collect(handle)
        self._log(handle, "chat", outputs, messages)
        return ChatCompletionResponse(
            id=rid, model=self.model_name, usage=self._usage(handle, outputs),
            choices=[ChatCompletionChoice(index=o.index, message=ChatCompletionMessage(content=o.text),
                                          finish_reason=o.finish_reason) for o in outputs])

    def _stream_response(self, req: ChatCompletionRequest | CompletionRequest, handle: RequestHandle, kind: str,
                         prompt, chunk: type[BaseModel], rid: str, choice: Callable[[ChoiceEvent], BaseModel],
                         first: Sequence[BaseModel] = ()) -> Stream:
        """A streamed answer: events of the ``chunk`` model with id ``rid``, ``choice(event)`` as
        each event's one choice, ``first`` before any event (see :meth:`_stream`)."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        def make(choices, usage=None) -> dict:
            return chunk(id=rid, created=created, model=self.model_name, choices=choices,
                         usage=usage).model_dump(mode="json")

        return Stream(self._stream(handle, kind, prompt, include_usage, make, choice, first),
                      lambda: self.engine.abort(handle))

    # ------------------------------------------------------------------ completions
    async def completion(self, req: CompletionRequest) -> CompletionResponse | Stream:
        """``POST /v1/completions`` (raw text, no template).

        Raises:
            APIError: 400, 404, 429, 500 as :meth:`chat`.
        """
        self._check(req)
        params = self._params(req, DEFAULT_COMPLETION_MAX_TOKENS)
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
        handle = self._submit(prompts, params, chat=False, cap_to_context=req.max_tokens is None, param="prompt")
        rid = f"cmpl-{handle.request_id}"
        if req.stream:
            return self._stream_response(req, handle, "completion", texts, CompletionResponse, rid, _completion_delta)
        outputs = await self._collect(handle)
        self._log(handle, "completion", outputs, texts)
        return CompletionResponse(
            id=rid, model=self.model_name, usage=self._usage(handle, outputs),
            choices=[CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason)
                     for i, o in enumerate(outputs)])

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
