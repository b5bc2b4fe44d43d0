"""Request and response models of the HTTP API (the limits they enforce are in :mod:`.limits`).

OpenAI models hold the fields of the OpenAI API reference (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``) that this server implements; the fields it does not implement
are left out, so a request that uses them is rejected as an unknown field instead of being
silently ignored. vLLM's extensions ``top_k``, ``min_p``, ``min_tokens``, ``repetition_penalty``
and ``ignore_eos`` are taken too, and ``response_format`` on ``/v1/completions`` as vLLM takes it.

FlagAI's own Aquila server API (``POST /func``, ``POST /stream_func``; FlagAI
``examples/Aquila/Aquila-server/aquila_server.py``) has its models at the end, with FlagAI's field
names and per-route defaults.

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

from ..errors import ValidationError

from ..sampling_params import (LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP, MAX_STOP_CHARS,
                               OPENAI_FIELDS, PARAMS, SamplingParams, StructuredOutputs)
from .limits import (DEFAULT_COMPLETION_MAX_TOKENS, DEFAULT_LEGACY_MAX_NEW_TOKENS, MAX_HISTORY,  # noqa: F401
                     MAX_IMAGE_BODY_BYTES, MAX_IMAGES_N, MAX_MESSAGES, MAX_N, MAX_PROMPTS, MAX_TEXT_CHARS,
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

#: ``logit_bias``: token ids (JSON object keys, so digit strings) -> bias.
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                           Annotated[float, Field(ge=LOGIT_BIAS_RANGE.ge, le=LOGIT_BIAS_RANGE.le)]],
                      Field(max_length=MAX_LOGIT_BIAS)] | None

#: Request types of the list and dict fields of SamplingParams (the number and bool fields map to their kind).
_LIST_TYPES: dict[str, Any] = {"stop": Stop, "stop_token_ids": list[Annotated[int, Field(ge=0)]] | None,
                               "logit_bias": LogitBias}


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


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema`` (OpenAI's structured outputs)."""

    model_config = _STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The schema's name (letters, digits, _ and -).")
    description: str | None = Field(default=None, max_length=MAX_TEXT_CHARS, description="Accepted and ignored.")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", description=(
        "The JSON Schema the answer must validate against (absent: any JSON value). Supported keywords: "
        "aquilachat.structured_output.SUPPORTED_KEYWORDS; others get a 400 naming the schema path."))
    strict: bool | None = Field(default=None, description=(
        "true: objects have only the properties the schema names unless it allows more; false or absent: "
        "extra properties allowed where the schema does not forbid them."))


class ResponseFormat(BaseModel):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (an answer that validates against the schema), enforced with a token mask."""

    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema.")
    json_schema: JSONSchemaFormat | None = Field(default=None, description="Required with type json_schema.")

    def to_structured_outputs(self) -> StructuredOutputs | None:
        """The :class:`~aquilachat.sampling_params.StructuredOutputs` it asks for (None for text).

        Raises:
            ValidationError: ``json_schema`` missing for type json_schema (field ``response_format``).
        """
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is None:
            raise ValidationError("response_format", "response_format.json_schema is required with type json_schema")
        return StructuredOutputs(json=self.json_schema.schema_ if self.json_schema.schema_ is not None else {},
                                 strict=bool(self.json_schema.strict))


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
    response_format: ResponseFormat | None = Field(default=None, description=(
        "Constrain the answer to JSON: {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
        "\"json_schema\": {\"name\", \"schema\", \"strict\"}}; a completed answer always parses and validates."))

    def requested_max_tokens(self) -> int | None:
        """The ``max_tokens`` the request gives (None: not given)."""
        return self.max_tokens

    def sampling_logprobs(self) -> int | None:
        """``SamplingParams.logprobs``: how many alternatives per generated token (None: no logprobs)."""
        return None

    def to_sampling_params(self, default_max_tokens: int, **overrides: Any) -> SamplingParams:
        """The request's :class:`SamplingParams`; ``default_max_tokens`` when it gives no
        ``max_tokens`` (as vLLM's ``to_sampling_params``); ``overrides`` win.

        Raises:
            ValidationError: a value out of range (``.field`` names it); pydantic has checked the
                same ranges already, so only a field added without them, or ``min_tokens`` above
                ``max_tokens``, gets here.
        """
        requested = self.requested_max_tokens()
        fields = {name: getattr(self, name) for name in OPENAI_FIELDS}
        fields.update(n=self.n, max_tokens=default_max_tokens if requested is None else requested,
                      logprobs=self.sampling_logprobs(),
                      structured_outputs=self.response_format.to_structured_outputs() if self.response_format else None)
        return SamplingParams(**{**fields, **overrides})


#: :class:`_OpenAIRequest` with every sampling field both OpenAI routes take
#: (:data:`~aquilachat.sampling_params.OPENAI_FIELDS`), as declared by ``SamplingParams``.
_SamplingRequest = create_model(
    "_SamplingRequest", __base__=_OpenAIRequest, __module__=__name__,
    **{name: (param_type(name), param_field(name)) for name in OPENAI_FIELDS})


#: An image in a JSON body: base64 file bytes, or a ``data:image/...;base64,`` URL.
ImageString = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_BODY_BYTES)]


class AquilaChatOptions(BaseModel):
    """``aquilachat``: this server's own options of a chat completion."""

    model_config = _STRICT
    run_instructions: bool | None = Field(default=None, description=(
        "Carry out a #text2image# or #InstructFace# block in the answer with the server's image backends "
        "and return the images in the response's aquilachat field (default: the server's --run-instructions)."))
    image: ImageString | None = Field(default=None, description=(
        "The image an #InstructFace# answer edits: base64 PNG/JPEG, or a data: URL."))


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: answer a conversation in the model's chat template."""

    model_config = _STRICT
    aquilachat: AquilaChatOptions | None = Field(default=None, description=(
        "This server's extension: image instructions (docs/serving.md, \"Image instructions\")."))
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, description=(
        f"The conversation, 1 to {MAX_MESSAGES} messages."))
    max_completion_tokens: int | None = param_field("max_tokens", default=None, le=MAX_TOKENS_LIMIT, description=(
        "Most tokens to generate (the newer name of max_tokens; wins when both are given)."))
    logprobs: bool = Field(default=False, description=(
        "Return each generated token's log-probability: the model's own distribution, before temperature, "
        "penalties, logit_bias and filters (as OpenAI and vLLM define it)."))
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description=(
        f"With logprobs: also the 0 to {MAX_LOGPROBS} most likely tokens at each position."))

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (None: not given)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_logprobs(self) -> int | None:
        """``top_logprobs`` (0 if not given) when ``logprobs`` is true.

        Raises:
            ValidationError: ``top_logprobs`` without ``logprobs`` (as OpenAI).
        """
        if self.top_logprobs is not None and not self.logprobs:
            raise ValidationError("top_logprobs", "top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class PromptTokensDetails(BaseModel):
    """Where the prompt tokens came from."""

    model_config = _RESPONSE
    cached_tokens: int = Field(description="Prompt tokens whose keys and values came from the prefix cache.")


class UsageInfo(BaseModel):
    """Token counts of a request (the prompt counted once, answers summed)."""

    model_config = _RESPONSE
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletionMessage(BaseModel):
    """The assistant's answer."""

    model_config = _RESPONSE
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    """One alternative at a position: its text, log-probability and UTF-8 bytes (a token may
    hold part of a character: ``token`` then shows U+FFFD, ``bytes`` the exact bytes)."""

    model_config = _RESPONSE
    token: str
    logprob: float
    bytes: list[int] | None


class ChatCompletionTokenLogprob(TopLogprob):
    """One generated token with its ``top_logprobs`` alternatives."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """``choices[].logprobs`` of a chat completion (of the chunk's new tokens when streamed)."""

    model_config = _RESPONSE
    content: list[ChatCompletionTokenLogprob] | None
    refusal: None = None


class ChatCompletionChoice(BaseModel):
    """One answer of a chat completion."""

    model_config = _RESPONSE
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
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
    logprobs: ChoiceLogprobs | None = None
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
    max_tokens: int | None = param_field("max_tokens", default=None, ge=0, le=MAX_TOKENS_LIMIT, description=(
        f"Most tokens to generate per answer (default {DEFAULT_COMPLETION_MAX_TOKENS}, as OpenAI); 0 generates "
        "nothing (with echo and logprobs: score the prompt)."))
    echo: bool = Field(default=False, description=(
        "Return the prompt before the answer (with logprobs: the prompt tokens' log-probabilities too, the first "
        "token's null)."))
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description=(
        f"Return each token's log-probability and the 0 to {MAX_LOGPROBS} most likely alternatives at each position "
        "(the model's own distribution, before temperature, penalties, logit_bias and filters)."))

    def sampling_logprobs(self) -> int | None:
        return self.logprobs


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of a completion (OpenAI's legacy shape): per token its text, its
    log-probability (null for the first token of an echoed prompt), the most likely alternatives
    with the token itself (null for that first token), and its character offset in the text."""

    model_config = _RESPONSE
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One answer of a completion (``index = prompt_index * n + answer_index``)."""

    model_config = _RESPONSE
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


# ---------------------------------------------------------------------------- FlagAI's Aquila server
class FlagAIRequest(BaseModel):
    """``POST /func``: FlagAI's Aquila server API (``aquila_server.py``, port 7860). The body is
    this object, or a JSON *string* holding it (FlagAI's client posts ``json=json.dumps(config)``).

    Defaults are FlagAI's. ``sft`` false (FlagAI's default) completes ``prompt`` as raw text after
    the BOS token, with runs of newlines collapsed (FlagAI's ``re.sub('\\n+', '\\n', ...)``); true
    answers it in the chat template after ``history``. Unknown fields are ignored, as FlagAI's
    server ignores them.
    """

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="The user's message or the raw text.")
    top_p: float = param_field("top_p", default=0.95)
    max_new_tokens: int = param_field("max_tokens", default=DEFAULT_LEGACY_MAX_NEW_TOKENS, le=MAX_TOKENS_LIMIT,
                                      description="Most tokens to generate; the answer ends at the context "
                                                  "window if that comes first.")
    top_k_per_token: int = param_field("top_k", default=1000)
    temperature: float = param_field("temperature", default=0.9)
    history: list[Annotated[list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]], Field(min_length=2, max_length=2)]] = \
        Field(default_factory=list, max_length=2 * MAX_HISTORY, description=(
            "Earlier messages as [role, text] pairs, oldest first; role ASSISTANT is the model's, any other the "
            "user's. The oldest are dropped when the conversation does not fit the context window. With sft only."))
    sft: bool = Field(default=False, description="Answer in the chat template (true) or complete raw text (false).")
    seed: int = param_field("seed", default=1234)

    def to_sampling_params(self) -> SamplingParams:
        """The request's :class:`SamplingParams` (``max_new_tokens`` is ``max_tokens``,
        ``top_k_per_token`` is ``top_k``); every token's log-probability is kept for the reply.

        Raises:
            ValidationError: a value out of range (``.field`` names it).
        """
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k_per_token,
                              max_tokens=self.max_new_tokens, seed=self.seed, logprobs=0)


class FlagAIStreamRequest(FlagAIRequest):
    """``POST /stream_func``: as ``/func`` with FlagAI's stream defaults (``top_k_per_token`` 20,
    ``top_p`` 0.9), always in the chat template; the answer streams as plain text. ``time``
    (FlagAI's generation time limit, which its server overrode with 40 s) is accepted and ignored."""

    top_p: float = param_field("top_p", default=0.9)
    top_k_per_token: int = param_field("top_k", default=20)
    sft: bool = Field(default=True, description="Ignored: /stream_func always answers in the chat template.")
    time: float | None = Field(default=None, description="Accepted and ignored.")


class FlagAICompletion(BaseModel):
    """One answer of ``/func``: ``tokens`` are the vocabulary strings of the answer's tokens (byte-level
    BPE strings, as FlagAI returns them), ``logprobs`` their log-probabilities (natural log, the
    model's distribution), ``top_logprobs_dicts`` ``[{token: logprob}]`` per token, and
    ``model_in`` the prompt text the model saw."""

    model_config = _RESPONSE
    text: str
    tokens: list[str]
    logprobs: list[float]
    top_logprobs_dicts: list[dict[str, float]]
    model_in: str


class FlagAIResponse(BaseModel):
    """The reply of ``/func``; an error has the same shape with no completions, ``status`` and ``error``."""

    model_config = _RESPONSE
    completions: list[FlagAICompletion]
    input_length: int = Field(description="Characters in the prompt (FlagAI's len(prompt)).")
    model_info: str = Field(description="The served model's name.")
    status: int | None = None
    error: str | None = None


# ---------------------------------------------------------------------------- images
ImageSize = Annotated[str, Field(pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description=(
    "WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's own size)."))]


class _ImageRequest(BaseModel):
    """What both OpenAI images requests have (OpenAI API reference, "Images")."""

    model_config = _STRICT
    prompt: Text = Field(min_length=1, description="What to draw; on edits, one edit step per line, applied in order.")
    model: str | None = Field(default=None, max_length=256, description="Accepted and ignored (the server's backend).")
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_N, description=f"Images to make, 1 to {MAX_IMAGES_N}.")
    size: ImageSize | None = None
    response_format: Literal["b64_json", "url"] = Field(default="b64_json", description=(
        "b64_json (default), or url: a link to a copy kept under the server's bounded image directory."))
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description=(
        "Extension: the diffusion noise seed (reproducible on one machine)."))


class ImageGenerationRequest(_ImageRequest):
    """``POST /v1/images/generations``: images drawn from a text prompt."""


class ImageEditRequest(_ImageRequest):
    """``POST /v1/images/edits``: an image edited by the prompt's steps (JSON with a base64
    ``image``, or multipart/form-data with an ``image`` file as the OpenAI client sends it)."""

    image: ImageString = Field(description="The image: base64 PNG/JPEG, or a data: URL.")
    n: int = Field(default=1, ge=1, le=1, description="Always 1.")


class ImageData(BaseModel):
    """One image: ``b64_json`` (a base64 PNG) or ``url``."""

    model_config = _RESPONSE
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """The response of both images routes."""

    model_config = _RESPONSE
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]


class InstructionResult(BaseModel):
    """An instruction block found in answer ``index`` and what came of it."""

    model_config = _RESPONSE
    index: int = Field(description="The choice whose answer held the block.")
    kind: Literal["text2image", "InstructFace"]
    preface: str = Field(description="The answer's text before the marker line.")
    steps: list[str] = Field(description="The image prompt (text2image) or the edit steps (InstructFace).")
    images: list[ImageData] = Field(description="The images made (b64_json PNG); empty on error.")
    error: str | None = Field(default=None, description="Why no image was made (e.g. which option the server lacks).")


class InstructionResults(BaseModel):
    """The ``aquilachat`` field of a chat completion that ran its instructions."""

    model_config = _RESPONSE
    instructions: list[InstructionResult]


class ChatCompletionWithImages(ChatCompletionResponse):
    """A chat completion with ``run_instructions``: the answer's text as generated, and the images."""

    aquilachat: InstructionResults
