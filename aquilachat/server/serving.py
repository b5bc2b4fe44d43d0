"""Serving: a validated request -> prompt ids and sampling parameters -> engine -> response.

Nothing here touches HTTP; :mod:`aquilachat.server.app` routes requests here and turns
:class:`APIError` into the right error body. Streamed answers are returned as a :class:`Stream`
(server-sent event strings plus a ``close`` that aborts generation), so the router can stop
generation whenever the response ends, even if the stream was never iterated.

Sampling follows the offline :class:`~aquilachat.llm.LLM` exactly: chat requests get the
template's stop strings (``LLM.default_params``), answer ``i`` of ``n`` uses ``seed + i``, and the
prompt ids come from ``LLM.encode_chat`` / ``Tokenizer.encode``. So a request with a seed returns
what ``LLM.chat`` / ``LLM.generate`` return for the same seed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..errors import ValidationError
from ..llm import LLM
from ..outputs import CompletionOutput
from ..sampling import SamplingParams
from .async_engine import INTERNAL_ERROR, AsyncEngine, QueueFullError, RequestHandle
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


def _validation_error(exc: ValidationError, default_param: str) -> APIError:
    message = str(exc)
    param = "max_tokens" if "max_tokens" in message else default_param
    return APIError(400, message, param=param)


def _generation_error(output: CompletionOutput) -> APIError:
    if output.error == INTERNAL_ERROR:
        return APIError(500, INTERNAL_ERROR, type="internal_error", code="internal_error")
    return APIError(500, f"generation failed: {output.error}", type="model_error", code="generation_error")


class Serving:
    """Serves one loaded :class:`~aquilachat.llm.LLM` through an :class:`AsyncEngine`.

    Args:
        llm: the model, tokenizer and chat template.
        engine: the background engine around ``llm.engine``.
        model_name: the id clients use (``/v1/models``; other ids -> 404).
        log_prompts: log prompts and answers (off by default: they may be private).
    """

    def __init__(self, llm: LLM, engine: AsyncEngine, *, model_name: str, log_prompts: bool = False) -> None:
        self.llm = llm
        self.engine = engine
        self.model_name = model_name
        self.log_prompts = log_prompts
        self.created = int(time.time())

    # ------------------------------------------------------------------ helpers
    def models(self) -> ModelList:
        """``GET /v1/models``."""
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created,
                                         max_model_len=self.llm.engine.max_model_len)])

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=max_tokens,
                stop=req.stop_list(), seed=req.seed, n=req.n, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                ignore_eos=req.ignore_eos)
        except ValidationError as exc:
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None

    def _submit(self, prompts: list[list[int]], params: SamplingParams, *, cap_to_context: bool,
                param: str) -> RequestHandle:
        try:
            return self.engine.submit(prompts, params, cap_to_context=cap_to_context,
                                      request_id=uuid.uuid4().hex[:16])
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

    async def _encode_chat(self, messages: list[dict]) -> list[int]:
        try:  # tokenizing a long conversation takes a while: not on the event loop
            return await asyncio.to_thread(self.llm.encode_chat, messages)
        except ValidationError as exc:
            raise APIError(400, str(exc), param="messages") from None

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | Stream:
        """``POST /v1/chat/completions``.

        Raises:
            APIError: 400 (bad messages or parameters, prompt too long), 404 (unknown model),
                429 (queue full), 500 (generation failed; non-streamed only).
        """
        self._check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self._encode_chat(messages)
        requested = req.requested_max_tokens()
        params = self.llm.default_params(self._params(req, requested or MAX_TOKENS_LIMIT))
        handle = self._submit([ids], params, cap_to_context=requested is None, param="messages")
        rid = f"chatcmpl-{handle.request_id}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return Stream(self._chat_stream(handle, rid, include_usage, messages), lambda: self.engine.abort(handle))
        outputs = await self._collect(handle)
        self._log(handle, "chat", outputs, messages)
        return ChatCompletionResponse(
            id=rid, model=self.model_name, usage=self._usage(handle, outputs),
            choices=[ChatCompletionChoice(index=o.index, message=ChatCompletionMessage(content=o.text),
                                          finish_reason=o.finish_reason) for o in outputs])

    async def _chat_stream(self, handle: RequestHandle, rid: str, include_usage: bool,
                           prompt) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices,
                                            usage=usage).model_dump(mode="json"))

        outputs: list[CompletionOutput | None] = [None] * handle.num_choices
        try:
            for i in range(handle.num_choices):
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for events in handle.events():
                for e in events:
                    if e.finished and e.output.finish_reason == "error":
                        yield _sse(_generation_error(e.output).openai_body())
                        return
                    if e.finished:
                        outputs[e.index] = e.output
                    delta = DeltaMessage(content=e.text) if e.text else DeltaMessage()
                    yield chunk([ChatCompletionStreamChoice(
                        index=e.index, delta=delta, finish_reason=e.output.finish_reason if e.finished else None)])
            if include_usage:
                yield chunk([], self._usage(handle, outputs))
            yield _sse("[DONE]")
            self._log(handle, "chat stream", outputs, prompt)
        finally:
            self.engine.abort(handle)

    # ------------------------------------------------------------------ completions
    async def completion(self, req: CompletionRequest) -> CompletionResponse | Stream:
        """``POST /v1/completions`` (raw text, no template).

        Raises:
            APIError: 400, 404, 429, 500 as :meth:`chat`.
        """
        self._check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        prompt = req.prompt
        if isinstance(prompt, str):
            texts: list[str] | None = [prompt]
        elif isinstance(prompt[0], str):
            texts = list(prompt)  # type: ignore[arg-type]
        else:
            texts = None
        if texts is not None:
            prompts = await asyncio.to_thread(lambda: [self.llm.tokenizer.encode(t) for t in texts])
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in prompt]  # type: ignore[union-attr]
        params = self._params(req, req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS)
        handle = self._submit(prompts, params, cap_to_context=req.max_tokens is None, param="prompt")
        rid = f"cmpl-{handle.request_id}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return Stream(self._completion_stream(handle, rid, include_usage, texts),
                          lambda: self.engine.abort(handle))
        outputs = await self._collect(handle)
        self._log(handle, "completion", outputs, texts)
        return CompletionResponse(
            id=rid, model=self.model_name, usage=self._usage(handle, outputs),
            choices=[CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason)
                     for i, o in enumerate(outputs)])

    async def _completion_stream(self, handle: RequestHandle, rid: str, include_usage: bool,
                                 prompt) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            return _sse(CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                           usage=usage).model_dump(mode="json"))

        outputs: list[CompletionOutput | None] = [None] * handle.num_choices
        try:
            async for events in handle.events():
                for e in events:
                    if e.finished and e.output.finish_reason == "error":
                        yield _sse(_generation_error(e.output).openai_body())
                        return
                    if e.finished:
                        outputs[e.index] = e.output
                    yield chunk([CompletionChoice(index=e.index, text=e.text,
                                                  finish_reason=e.output.finish_reason if e.finished else None)])
            if include_usage:
                yield chunk([], self._usage(handle, outputs))
            yield _sse("[DONE]")
            self._log(handle, "completion stream", outputs, prompt)
        finally:
            self.engine.abort(handle)

    # ------------------------------------------------------------------ the original API
    async def legacy(self, req: LegacyRequest) -> LegacyResponse:
        """``POST /``: the prompt (after ``history``) answered in the chat template; the answer
        ends at ``max_new_tokens`` or at the context window, whichever comes first.

        Raises:
            APIError: as :meth:`chat`.
        """
        messages: list[dict] = []
        for human, assistant in req.history:
            messages += [{"role": "user", "content": human}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": req.prompt})
        try:
            ids = await asyncio.to_thread(self.llm.encode_chat, messages)
        except ValidationError as exc:
            raise APIError(400, str(exc), param="history") from None
        try:
            params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                    max_tokens=req.max_new_tokens, seed=req.seed)
        except ValidationError as exc:
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
        handle = self._submit([ids], self.llm.default_params(params), cap_to_context=True, param="prompt")
        outputs = await self._collect(handle)
        self._log(handle, "legacy", outputs, messages)
        text = outputs[0].text
        if text.startswith(" "):  # the template's answer prefix, as the original server stripped it
            text = text[1:]
        return LegacyResponse(response=text, status=200, time=time.strftime(LEGACY_TIME_FORMAT))
