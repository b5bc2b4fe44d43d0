"""What generation returns: :class:`RequestOutput` with one :class:`CompletionOutput` per answer (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CompletionOutput", "RequestOutput"]


@dataclass
class CompletionOutput:
    """One answer.

    Attributes:
        index: which of the ``n`` answers.
        text: the generated text, stop strings and control tokens excluded.
        token_ids: generated ids (the EOS or stop id that ended it included).
        finish_reason: ``"stop"`` (EOS, stop id or stop string), ``"length"`` (max_tokens or the
            context window), ``"error"`` (see ``error``), ``"abort"`` (cancelled), or ``None`` while running.
        error: a readable message when ``finish_reason == "error"``.
        logprobs: per generated token, its log-probability (natural log) when requested.
        top_logprobs: per generated token, ``[(id, logprob), ...]`` when ``logprobs > 0``.
        stop_reason: the stop string or id that matched, if any.
        prompt_logprobs: when ``prompt_logprobs`` was asked, per prompt token ``(logprob, [(id,
            logprob), ...])`` given the tokens before it (None for the first token); the same for
            every answer of a prompt.
        num_cached_tokens: leading prompt tokens whose keys and values came from the prefix cache.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt: ``outputs`` holds its ``n`` answers; ``text``, ``token_ids``,
    ``finish_reason`` and ``error`` are those of the first answer."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.outputs[0].error

    @property
    def prompt_logprobs(self) -> list | None:
        """Per prompt token ``(logprob, top)`` (None for the first) when asked (vLLM's field)."""
        return self.outputs[0].prompt_logprobs

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
