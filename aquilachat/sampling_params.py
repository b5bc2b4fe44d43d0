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
- ``logprobs`` in ``[0, 20]`` (OpenAI's ``top_logprobs``).
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

__all__ = ["SamplingParams", "Range", "ParamSpec", "PARAMS", "OPENAI_FIELDS", "CLI_FIELDS",
           "MAX_LOGPROBS", "MAX_STOP", "MAX_STOP_CHARS", "MAX_SEED"]

#: Most top-logprob alternatives a request may ask for (as the OpenAI API).
MAX_LOGPROBS = 20
#: Most stop strings, and most characters in one (see the module docstring for why).
MAX_STOP = 16
MAX_STOP_CHARS = 256
#: Largest seed: answer ``i`` uses ``seed + i``, which must stay a valid 64-bit generator seed.
MAX_SEED = 2**63 - 1


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


def _param(default: Any, doc: str, range: Range | None = None, *, openai: bool = False, cli: bool = False):
    """Declare a :class:`SamplingParams` field.

    Args:
        default: the default value.
        doc: its meaning, one sentence (the HTTP API's description and the command line's help).
        range: the valid values of a number field.
        openai: the OpenAI routes take it under this name with this default (fields whose default
            or bound differs per route, ``max_tokens`` and ``n``, are declared by each request).
        cli: ``aquilachat chat``, ``generate`` and ``eval`` take it as ``--name-with-dashes``.
    """
    return field(default=default, metadata={"doc": doc, "range": range, "openai": openai, "cli": cli})


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
    ignore_eos: bool = _param(False, "Keep generating after the end-of-answer token (benchmarks).", openai=True)
    skip_special_tokens: bool = _param(True, "Leave control tokens out of the text.")

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


@dataclass(frozen=True)
class ParamSpec:
    """One :class:`SamplingParams` field as declared: ``kind`` is ``int``, ``float``, ``bool`` or
    ``list`` (``stop``, ``stop_token_ids``)."""

    name: str
    default: Any
    doc: str
    range: Range | None
    openai: bool
    cli: bool

    @property
    def kind(self) -> type:
        if self.range is not None:
            return int if self.range.integer else float
        return bool if isinstance(self.default, bool) else list


#: Every field of :class:`SamplingParams`, in declaration order.
PARAMS: dict[str, ParamSpec] = {f.name: ParamSpec(f.name, f.default, **f.metadata)
                                for f in dataclasses.fields(SamplingParams)}
#: Fields the OpenAI routes take under their own name with their default (``max_tokens`` and ``n``
#: are declared per route).
OPENAI_FIELDS: tuple[str, ...] = tuple(name for name, spec in PARAMS.items() if spec.openai)
#: Fields the command line takes (``--top-p`` for ``top_p``).
CLI_FIELDS: tuple[str, ...] = tuple(name for name, spec in PARAMS.items() if spec.cli)
