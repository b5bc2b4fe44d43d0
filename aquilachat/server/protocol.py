"""Request and response models of the HTTP API (the limits they enforce are in :mod:`.limits`).

OpenAI models hold the fields of the OpenAI API reference (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``) that this server implements; the fields it does not implement
are left out, so a request that uses them is rejected as an unknown field instead of being
silently ignored. vLLM's extensions ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are taken
too.

The sampling fields are not declared here but derived from
:class:`~aquilachat.sampling_params.SamplingParams` (:func:`param_field`): each has its name,
default, range and description from there, so a field added there is taken by both OpenAI routes.
Each request turns into sampling parameters with ``to_sampling_params()``, as vLLM's do.

Every request model forbids unknown fields and validates strictly: ``"0.5"`` is not a number,
``true`` is not an integer, ``NaN`` and ``Infinity`` are not accepted. Pydantic enforces the ranges
too, so a 400 names the field with its dotted location (``stop.1``); ``SamplingParams`` applies the
same ranges to every other caller.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..sampling_params import MAX_STOP, MAX_STOP_CHARS, OPENAI_FIELDS, PARAMS, SamplingParams
from .limits import (DEFAULT_COMPLETION_MAX_TOKENS, DEFAULT_LEGACY_MAX_NEW_TOKENS, MAX_HISTORY,  # noqa: F401
                     MAX_MESSAGES, MAX_N, MAX_PROMPTS, MAX_TEXT_CHARS, MAX_TOKENS_LIMIT)

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

#: Request types of the list fields of SamplingParams (the number and bool fields map to their kind).
_LIST_TYPES: dict[str, Any] = {"stop": Stop, "stop_token_ids": list[Annotated[int, Field(ge=0)]] | None}


def param_type(name: str) -> Any:
    """The strict request type of ``SamplingParams.<name>`` with its default."""
    spec = PARAMS[name]
    if spec.kind is list:
        return _LIST_TYPES[name]
    return spec.kind | None if spec.default is None else spec.kind


def param_field(name: str, **overrides: Any) -> Any:
    """A request field for ``SamplingParams.<name>``: its default, its range (as bounds that
    pydantic enforces and the JSON schema shows) and its meaning. ``overrides`` win: a route's own
    default, a server limit (``le=MAX_N``), a description."""
    spec = PARAMS[name]
    bounds = {} if spec.range is None else {
        key: value for key in ("ge", "gt", "le") if (value := getattr(spec.range, key)) is not None}
    return Field(**{"default": spec.default, **bounds, "description": spec.doc, **overrides})


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


class _OpenAIRequest(BaseModel):
    """What both OpenAI requests have besides the sampling fields they share."""

    model_config = _STRICT
    model: str | None = Field(default=None, description="A model id from /v1/models (default: the served model).")
    max_tokens: int | None = param_field("max_tokens", default=None, le=MAX_TOKENS_LIMIT, description=(
        "Most tokens to generate per answer; default: up to the end of the context window on chat, "
        f"{DEFAULT_COMPLETION_MAX_TOKENS} on completions (as OpenAI)."))
    n: int = param_field("n", le=MAX_N, description=f"Answers per prompt, 1 to {MAX_N} (answer i uses seed + i).")
    stream: bool = Field(default=False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream.")
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")

    def requested_max_tokens(self) -> int | None:
        """The ``max_tokens`` the request gives (None: not given)."""
        return self.max_tokens

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request's :class:`SamplingParams`; ``default_max_tokens`` when it gives no
        ``max_tokens`` (as vLLM's ``to_sampling_params``).

        Raises:
            ValidationError: a value out of range (``.field`` names it); pydantic has checked the
                same ranges already, so only a field added without them gets here.
        """
        requested = self.requested_max_tokens()
        return SamplingParams(**{name: getattr(self, name) for name in OPENAI_FIELDS}, n=self.n,
                              max_tokens=default_max_tokens if requested is None else requested)


#: :class:`_OpenAIRequest` with every sampling field both OpenAI routes take
#: (:data:`~aquilachat.sampling_params.OPENAI_FIELDS`), as declared by ``SamplingParams``.
_SamplingRequest = create_model(
    "_SamplingRequest", __base__=_OpenAIRequest, __module__=__name__,
    **{name: (param_type(name), param_field(name)) for name in OPENAI_FIELDS})


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: answer a conversation in the model's chat template."""

    model_config = _STRICT
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, description=(
        f"The conversation, 1 to {MAX_MESSAGES} messages."))
    max_completion_tokens: int | None = param_field("max_tokens", default=None, le=MAX_TOKENS_LIMIT, description=(
        "Most tokens to generate (the newer name of max_tokens; wins when both are given)."))

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
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(description=(
        f"A string, a list of up to {MAX_PROMPTS} strings, token ids, or a list of token-id lists."))


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
    temperature: float = param_field("temperature", default=0.9)
    top_p: float = param_field("top_p", default=0.95)
    top_k: int = param_field("top_k", default=100)
    max_new_tokens: int = param_field("max_tokens", default=DEFAULT_LEGACY_MAX_NEW_TOKENS, le=MAX_TOKENS_LIMIT,
                                      description="Most tokens to generate; the answer ends at the context "
                                                  "window if that comes first.")
    seed: int | None = param_field("seed")
    history: list[tuple[str, str]] = Field(default_factory=list, max_length=MAX_HISTORY, description=(
        "Earlier turns as [human, assistant] pairs, oldest first."))

    def to_sampling_params(self) -> SamplingParams:
        """The request's :class:`SamplingParams` (``max_new_tokens`` is ``max_tokens``).

        Raises:
            ValidationError: a value out of range (``.field`` names it).
        """
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_new_tokens, seed=self.seed)


class LegacyResponse(BaseModel):
    """The original response: ``status`` mirrors the HTTP status; ``error`` is set on errors."""

    model_config = _RESPONSE
    response: str
    status: int
    time: str = Field(description="Local time of the answer, %Y-%m-%d %H:%M:%S.")
    error: str | None = None
