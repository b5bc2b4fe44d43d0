"""Sampling parameters: every field with its default, range and meaning, in one place (no torch).

Every entry point converts to :class:`SamplingParams`: ``LLM.generate`` / ``LLM.chat`` take one;
the HTTP requests build one with ``to_sampling_params()`` (:mod:`aquilachat.server.protocol`
derives their sampling fields, ranges and descriptions from the declarations below); the command
line builds one with :func:`aquilachat.commands._common.sampling_params` (its options come from the
same declarations); the evaluations hand one to the local engine or turn it into an OpenAI request
body. This module imports no torch, so the evaluations and the command line load it cheaply; the
sampling functions that give the fields their effect are in :mod:`aquilachat.sampling`.

Adding a field is one declaration here (:func:`_param`: default, range, meaning, and whether the
OpenAI routes and the command line take it), plus its effect in the sampler.

Ranges (one set for Python, the command line, the evaluations and the server; where OpenAI and
vLLM differ, the choice and why):

- ``temperature >= 0``, no upper bound (vLLM). OpenAI caps it at 2, but the sampler is exact at
  any temperature (logits are shifted to their maximum before dividing, and a huge temperature
  gives the uniform distribution), so a cap would only refuse requests that vLLM serves.
- ``top_p`` in ``(0, 1]`` (OpenAI, vLLM); ``top_k >= -1``, 0 or -1 disabling (vLLM's spelling).
- ``max_tokens >= 1``; the context window bounds it per request (``Engine.check_request``).
- ``n >= 1``.
- ``repetition_penalty > 0``, no upper bound (vLLM; OpenAI has no such field). The server used to
  cap it at 10; the sampler is NaN-proof for any positive value (overflow becomes -inf and is
  sanitized), so one range serves every caller.
- ``presence_penalty`` and ``frequency_penalty`` in ``[-2, 2]`` (OpenAI, vLLM).
- ``seed`` in ``[0, 2**63 - 1]``: an int64, as vLLM's server takes, and non-negative so that
  ``seed + i`` (answer ``i`` of ``n``) is always a valid ``torch.Generator`` seed.
- ``logprobs`` and ``prompt_logprobs`` in ``[0, 20]`` (OpenAI's ``top_logprobs``; vLLM's
  ``prompt_logprobs``).
- ``min_p`` in ``[0, 1]`` (vLLM; Nguyen et al. 2024); ``min_tokens >= 0`` and at most
  ``max_tokens`` (vLLM).
- ``logit_bias``: token id -> bias in ``[-100, 100]`` (OpenAI's range; the ids are checked against
  the model's vocabulary when a request is validated), at most :data:`MAX_LOGIT_BIAS` entries. OpenAI
  states no count; the bound keeps the per-step work of a request small.
- ``stop``: at most :data:`MAX_STOP` strings of 1 to :data:`MAX_STOP_CHARS` characters. OpenAI
  takes 4, vLLM any number; 16 leaves room for a code evaluation's stop strings (Python's four)
  plus the user's own, while bounding the per-token cost of matching stop strings on the text and
  the text held back while a stop string may be forming. A chat template's own stop strings are
  not the caller's and do not count (they are added by the output processor).

A server also bounds the *work* one request may ask for (``n``, ``max_tokens``, prompts and
message sizes: :mod:`aquilachat.server.limits`); those are limits of a shared service, not ranges
of the values' meaning, and apply only there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ValidationError

__all__ = ["SamplingParams", "StructuredOutputs", "Range", "ParamSpec", "PARAMS", "OPENAI_FIELDS", "CLI_FIELDS",
           "MAX_LOGPROBS", "MAX_STOP", "MAX_STOP_CHARS", "MAX_SEED", "MAX_LOGIT_BIAS", "LOGIT_BIAS_RANGE"]

#: Most top-logprob alternatives a request may ask for (as the OpenAI API).
MAX_LOGPROBS = 20
#: Most stop strings, and most characters in one (see the module docstring for why).
MAX_STOP = 16
MAX_STOP_CHARS = 256
#: Largest seed: answer ``i`` uses ``seed + i``, which must stay a valid 64-bit generator seed.
MAX_SEED = 2**63 - 1
#: Most ``logit_bias`` entries in one request (see the module docstring).
MAX_LOGIT_BIAS = 1024


@dataclass(frozen=True)
class Range:
    """The valid values of a number field: integers (``integer``) or finite reals, within the
    bounds given (``ge``: >=, ``gt``: >, ``le``: <=; None: unbounded)."""

    integer: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def __str__(self) -> str:
        if self.le is None:
            return f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        return f"in {low}, {self.le}]" if low else f"<= {self.le}"

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`~aquilachat.errors.ValidationError` naming ``name`` if ``value`` is not valid."""
        ok = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or (not self.integer and not math.isfinite(value)):
            kind = "an integer" if self.integer else "a finite number"
            raise ValidationError(name, f"{name} must be {kind}, got {value!r}")
        if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le)):
            raise ValidationError(name, f"{name} must be {self}, got {value!r}")


#: The values of one ``logit_bias`` entry (OpenAI's).
LOGIT_BIAS_RANGE = Range(ge=-100, le=100)


def _param(default: Any, doc: str, range: Range | None = None, *, openai: bool = False, cli: bool = False,
           kind: type | None = None):
    """Declare a :class:`SamplingParams` field.

    Args:
        default: the default value.
        doc: its meaning, one sentence (the HTTP API's description and the command line's help).
        range: the valid values of a number field.
        openai: the OpenAI routes take it under this name with this default (fields whose default
            or bound differs per route, ``max_tokens`` and ``n``, are declared by each request).
        cli: ``aquilachat chat``, ``generate`` and ``eval`` take it as ``--name-with-dashes``.
        kind: the value's type where neither ``range`` nor the default tells it (``dict`` for
            ``logit_bias``; default ``list``).
    """
    return field(default=default, metadata={"doc": doc, "range": range, "openai": openai, "cli": cli,
                                            "kind": kind})


@dataclass(frozen=True)
class StructuredOutputs:
    """Constrain an answer to JSON: vLLM's ``StructuredOutputsParams``, the part behind OpenAI's
    ``response_format`` (:mod:`aquilachat.structured_output` enforces it with a token mask).

    Attributes:
        json: a JSON schema (a dict) the answer must validate against, or None.
        json_object: the answer is any JSON object (OpenAI's ``json_object``).
        strict: with a schema, objects have only the properties it names unless it allows more
            (``additionalProperties`` defaults to false, as OpenAI's ``strict: true``); False (the
            default, as OpenAI's) gives JSON Schema's own meaning: extra properties allowed.

    Raises:
        ValidationError: neither or both of ``json`` and ``json_object``, or a schema that is no
            JSON object (field ``response_format``).
    """

    json: dict | None = None
    json_object: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        if (self.json is None) == (not self.json_object):
            raise ValidationError("response_format", "structured output needs exactly one of a JSON schema "
                                                     "and json_object")
        if self.json is not None and not isinstance(self.json, dict):
            raise ValidationError("response_format", f"the JSON schema must be a JSON object, got {self.json!r:.80}")


@dataclass
class SamplingParams:
    """How to pick tokens; OpenAI / vLLM field names and meanings.

    Each field's default, range and meaning are declared below (the module docstring says where
    each range comes from). ``stop`` is normalized to a list, ``stop_token_ids`` to a list, and a
    ``top_k`` of -1 to 0.

    Raises:
        ValidationError: a field out of range; ``.field`` names it.
    """

    temperature: float = _param(1.0, "Sampling temperature: 0 is greedy (argmax), higher values give more varied text.",
                                Range(ge=0), openai=True, cli=True)
    top_p: float = _param(1.0, "Nucleus sampling: sample from the most likely tokens whose probability mass "
                               "reaches top_p; 1 disables.", Range(gt=0, le=1), openai=True, cli=True)
    top_k: int = _param(0, "Sample from the k most likely tokens only; 0 or -1 disables.",
                        Range(integer=True, ge=-1), openai=True, cli=True)
    max_tokens: int = _param(256, "Most tokens to generate per answer; the context window may end it first.",
                             Range(integer=True, ge=1), cli=True)
    stop: list[str] | str | None = _param(None, f"Up to {MAX_STOP} strings that end the answer; the matched string "
                                                "is not returned.", openai=True, cli=True)
    stop_token_ids: list[int] | None = _param(None, "Token ids that end the answer, besides the model's "
                                                    "end-of-answer ids.")
    seed: int | None = _param(None, "Seeds the sampler: the same seed gives the same answer, alone or among "
                                    "concurrent requests (answer i of n uses seed + i).",
                              Range(integer=True, ge=0, le=MAX_SEED), openai=True, cli=True)
    n: int = _param(1, "Answers to generate per prompt.", Range(integer=True, ge=1))
    repetition_penalty: float = _param(1.0, "CTRL repetition penalty on tokens of the prompt and the answer: a "
                                            "positive logit is divided by it, a negative one multiplied; 1 disables.",
                                       Range(gt=0), openai=True, cli=True)
    presence_penalty: float = _param(0.0, "Subtracted from a token's logit if the token already occurs in the answer.",
                                     Range(ge=-2, le=2), openai=True, cli=True)
    frequency_penalty: float = _param(0.0, "Subtracted from a token's logit once per earlier occurrence in the answer.",
                                      Range(ge=-2, le=2), openai=True, cli=True)
    logprobs: int | None = _param(None, "Return each generated token's log-probability (natural log) and this many "
                                        "most likely alternatives.", Range(integer=True, ge=0, le=MAX_LOGPROBS))
    prompt_logprobs: int | None = _param(None, "Return each prompt token's log-probability given the tokens before "
                                               "it (the first has none) and this many most likely alternatives.",
                                         Range(integer=True, ge=0, le=MAX_LOGPROBS))
    ignore_eos: bool = _param(False, "Keep generating after the end-of-answer token (benchmarks).", openai=True)
    skip_special_tokens: bool = _param(True, "Leave control tokens out of the text.")
    min_p: float = _param(0.0, "Min-p sampling: drop tokens whose probability is below min_p times the most "
                               "likely token's (after temperature); 0 disables.", Range(ge=0, le=1),
                          openai=True, cli=True)
    min_tokens: int = _param(0, "The answer cannot end (end-of-answer token, stop token or stop string) before "
                                "this many tokens.", Range(integer=True, ge=0), openai=True, cli=True)
    logit_bias: dict[int, float] | None = _param(
        None, f"Token id -> bias in [-100, 100] added to its logit before sampling (-100 bans it, 100 all but "
              f"forces it); at most {MAX_LOGIT_BIAS} ids.", openai=True, cli=True, kind=dict)
    structured_outputs: StructuredOutputs | None = _param(
        None, "Constrain the answer to JSON (a schema, or any JSON object); the server's response_format.",
        kind=StructuredOutputs)

    def __post_init__(self) -> None:
        for spec in PARAMS.values():
            value = getattr(self, spec.name)
            if spec.range is not None:
                if value is not None or spec.default is not None:
                    spec.range.check(spec.name, value)
            elif spec.kind is bool and not isinstance(value, bool):
                raise ValidationError(spec.name, f"{spec.name} must be true or false, got {value!r}")
        self.stop = _stop_list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise ValidationError("stop_token_ids", f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for i, t in enumerate(self.stop_token_ids):
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValidationError("stop_token_ids", f"stop_token_ids[{i}] must be a non-negative integer, got {t!r}")
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.min_tokens > self.max_tokens:
            raise ValidationError("min_tokens", f"min_tokens ({self.min_tokens}) must be at most max_tokens "
                                                f"({self.max_tokens})")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise ValidationError("structured_outputs", "structured_outputs must be a StructuredOutputs, got "
                                                        f"{type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _stop_list(stop: Any) -> list[str]:
    """``stop`` as a checked list (see the ``stop`` range in the module docstring)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise ValidationError("stop", f"stop must be a string or a list of strings, got {stop!r}")
    if len(stop) > MAX_STOP:
        raise ValidationError("stop", f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValidationError("stop", f"stop[{i}] must be a non-empty string of at most {MAX_STOP_CHARS} "
                                          f"characters, got {s!r}")
    return list(stop)


def _logit_bias(bias: Any) -> dict[int, float] | None:
    """``logit_bias`` as a checked ``{id: bias}`` (keys may be JSON's digit strings)."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValidationError("logit_bias", f"logit_bias must be an object of token id -> bias, got {bias!r:.80}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValidationError("logit_bias", f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str) and key.isascii() and key.isdigit():
            token = int(key)
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValidationError("logit_bias", f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
        try:
            LOGIT_BIAS_RANGE.check(f"logit_bias[{key}]", value)
        except ValidationError as exc:
            raise ValidationError("logit_bias", str(exc)) from None
        out[token] = float(value)
    return out


@dataclass(frozen=True)
class ParamSpec:
    """One :class:`SamplingParams` field as declared: ``kind`` is ``int``, ``float``, ``bool``,
    ``list`` (``stop``, ``stop_token_ids``), ``dict`` (``logit_bias``) or
    :class:`StructuredOutputs`."""

    name: str
    default: Any
    doc: str
    range: Range | None
    openai: bool
    cli: bool
    declared_kind: type | None = None

    @property
    def kind(self) -> type:
        if self.range is not None:
            return int if self.range.integer else float
        if isinstance(self.default, bool):
            return bool
        return self.declared_kind or list


#: Every field of :class:`SamplingParams`, in declaration order.
PARAMS: dict[str, ParamSpec] = {
    f.name: ParamSpec(f.name, f.default, f.metadata["doc"], f.metadata["range"], f.metadata["openai"],
                      f.metadata["cli"], f.metadata["kind"]) for f in dataclasses.fields(SamplingParams)}
#: Fields the OpenAI routes take under their own name with their default (``max_tokens`` and ``n``
#: are declared per route).
OPENAI_FIELDS: tuple[str, ...] = tuple(name for name, spec in PARAMS.items() if spec.openai)
#: Fields the command line takes (``--top-p`` for ``top_p``).
CLI_FIELDS: tuple[str, ...] = tuple(name for name, spec in PARAMS.items() if spec.cli)
