"""Request and response models of the HTTP API (the limits they enforce are in :mod:`.limits`).

OpenAI models follow the field order of the OpenAI API reference (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``); the fields this server does not implement are left out, so a
request that uses them is rejected as an unknown field instead of being silently ignored.
Extensions (vLLM's names) come last in each request: ``top_k``, ``repetition_penalty``,
``ignore_eos``.

Every request model forbids unknown fields and validates strictly: ``"0.5"`` is not a number,
``true`` is not an integer, ``NaN`` and ``Infinity`` are not accepted. Ranges are checked here so
that a 400 names the field; :class:`~aquilachat.sampling.SamplingParams` checks them again.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .limits import (DEFAULT_COMPLETION_MAX_TOKENS, DEFAULT_LEGACY_MAX_NEW_TOKENS, MAX_HISTORY,  # noqa: F401
                     MAX_MESSAGES, MAX_N, MAX_PROMPTS, MAX_SEED, MAX_STOP, MAX_STOP_CHARS, MAX_TEXT_CHARS,
                     MAX_TOKENS_LIMIT)

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_RESPONSE = ConfigDict(extra="forbid")

#: A message or prompt string.
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
#: One stop string.
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
#: ``stop``: one string or a list of them.
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None
#: A prompt given as token ids.
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def _stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# ---------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    """The OpenAI error object."""

    model_config = _RESPONSE
    message: str = Field(description="What went wrong, naming the offending field where there is one.")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                                  "rate_limit_error, service_unavailable, model_error or internal_error.")
    param: str | None = Field(default=None, description="The offending request field, dotted (messages.0.content).")
    code: str | None = Field(default=None, description="A machine-readable code (model_not_found, queue_full, ...).")


class ErrorResponse(BaseModel):
    """``{"error": {...}}``: every OpenAI-route error body."""

    model_config = _RESPONSE
    error: ErrorDetail


# ---------------------------------------------------------------------------- chat completions
class TextContentPart(BaseModel):
    """One part of a message's content list; only text parts are supported."""

    model_config = _STRICT
    type: Literal["text"] = Field(description="Always \"text\".")
    text: Text = Field(description="The text.")


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = _STRICT
    role: Literal["system", "user", "assistant"] = Field(
        description="system (optional, first only), then user and assistant alternating, ending with user.")
    content: Text | list[TextContentPart] = Field(
        description="The text, or a list of text parts (joined with newlines).")
    name: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    model_config = _STRICT
    include_usage: bool = Field(default=False, description=(
        "Send one more chunk before [DONE] with empty choices and the request's usage."))


class _SamplingRequest(BaseModel):
    """Sampling fields shared by chat and text completions (OpenAI names; vLLM extensions)."""

    model_config = _STRICT
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description=(
        "Subtracted from a token's logit once per previous occurrence in the answer."))
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description=(
        "Subtracted from a token's logit if it already occurs in the answer."))
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description=(
        "Seeds the sampler: the same seed gives the same answer, alone or among concurrent requests."))
    stop: Stop = Field(default=None, description=(
        f"Up to {MAX_STOP} strings that end the answer; the stop string itself is not returned."))
    stream: bool = Field(default=False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy (argmax).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables.")
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")
    # extensions (vLLM names)
    top_k: int = Field(default=0, ge=-1, description="Keep the k most likely tokens; 0 or -1 disables. Extension.")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description=(
        "CTRL repetition penalty on tokens of the prompt and answer; 1 disables. Extension."))
    ignore_eos: bool = Field(default=False, description="Keep generating after the end-of-answer token (benchmarks). Extension.")


    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        return _stop_list(self.stop)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: answer a conversation in the model's chat template."""

    model_config = _STRICT
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, description=(
        f"The conversation, 1 to {MAX_MESSAGES} messages."))
    model: str | None = Field(default=None, description="A model id from /v1/models (default: the served model).")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, description=(
        "Most tokens to generate (the newer name of max_tokens; wins when both are given)."))
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, description=(
        "Most tokens to generate; default: up to the end of the context window."))
    n: int = Field(default=1, ge=1, le=MAX_N, description=f"Answers to generate, 1 to {MAX_N} (answer i uses seed + i).")

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (None: not given)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class UsageInfo(BaseModel):
    """Token counts of a request (the prompt counted once, answers summed)."""

    model_config = _RESPONSE
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(BaseModel):
    """The assistant's answer."""

    model_config = _RESPONSE
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    """One answer of a chat completion."""

    model_config = _RESPONSE
    index: int
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    """The response of a non-streamed chat completion."""

    model_config = _RESPONSE
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """New text of one streamed answer (the first chunk carries the role)."""

    model_config = _RESPONSE
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    """One answer's part of a streamed chunk."""

    model_config = _RESPONSE
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    model_config = _RESPONSE
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------- completions
class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: continue raw text (no chat template)."""

    model_config = _STRICT
    model: str | None = Field(default=None, description="A model id from /v1/models (default: the served model).")
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(description=(
        f"A string, a list of up to {MAX_PROMPTS} strings, token ids, or a list of token-id lists."))
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, description=(
        f"Most tokens to generate per answer (default {DEFAULT_COMPLETION_MAX_TOKENS}, as OpenAI)."))
    n: int = Field(default=1, ge=1, le=MAX_N, description=f"Answers per prompt, 1 to {MAX_N} (answer i uses seed + i).")


class CompletionChoice(BaseModel):
    """One answer of a completion (``index = prompt_index * n + answer_index``)."""

    model_config = _RESPONSE
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """The response of ``/v1/completions``; each streamed event has the same shape with the new text."""

    model_config = _RESPONSE
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------- models
class ModelCard(BaseModel):
    """One served model."""

    model_config = _RESPONSE
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aquilachat"
    max_model_len: int | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    model_config = _RESPONSE
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------- the original API
class LegacyRequest(BaseModel):
    """``POST /``: the original AquilaChat API; the prompt is answered in the aquila-chat template.

    Defaults are the original server's (temperature 0.9, top_p 0.95, top_k 100, 256 new tokens),
    except that without ``seed`` each request is sampled with a fresh seed.
    """

    model_config = _STRICT
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="The user's message.")
    temperature: float = Field(default=0.9, ge=0.0, le=2.0, description="0 is greedy (argmax).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables.")
    top_k: int = Field(default=100, ge=-1, description="Keep the k most likely tokens; 0 or -1 disables.")
    max_new_tokens: int = Field(default=DEFAULT_LEGACY_MAX_NEW_TOKENS, ge=1, le=MAX_TOKENS_LIMIT, description=(
        "Most tokens to generate; the answer ends at the context window if that comes first."))
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seeds the sampler.")
    history: list[tuple[str, str]] = Field(default_factory=list, max_length=MAX_HISTORY, description=(
        "Earlier turns as [human, assistant] pairs, oldest first."))


class LegacyResponse(BaseModel):
    """The original response: ``status`` mirrors the HTTP status; ``error`` is set on errors."""

    model_config = _RESPONSE
    response: str
    status: int
    time: str = Field(description="Local time of the answer, %Y-%m-%d %H:%M:%S.")
    error: str | None = None
