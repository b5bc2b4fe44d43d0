"""From generated ids to text deltas: incremental detokenization and stop strings.

For each sequence an :class:`OutputTracker` turns tokens into text with
:class:`~aquilachat.tokenizer.IncrementalDetokenizer` (never half a UTF-8 character), finds stop
strings even when they are split across tokens, and holds back the tail of the text that could
still become a stop string, so no part of a stop string is ever streamed. The deltas joined equal
the final text.
"""

from __future__ import annotations

from .engine import Sequence
from .outputs import CompletionOutput
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["OutputTracker"]


class OutputTracker:
    """Text state of one :class:`~aquilachat.engine.Sequence`.

    Call :meth:`update` after each engine step that touched the sequence; it returns the new text
    that is safe to show and says whether a stop string ended the answer (the caller then retires
    the sequence with ``engine.finish(seq, "stop", stop_string)``).
    """

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, index: int = 0) -> None:
        self.seq = seq
        self.index = index
        self.stops = [s for s in seq.params.stop if s]
        self._max_stop = max((len(s) for s in self.stops), default=0)
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=seq.params.skip_special_tokens)
        self._text = ""  # all complete text so far
        self._sent = 0  # characters already returned as deltas
        self._consumed = 0  # output ids already pushed into the detokenizer
        self._num_tokens: int | None = None  # output length frozen when a stop string matched
        self.stop_string: str | None = None
        self._flushed = False

    @property
    def done(self) -> bool:
        return self.stop_string is not None or self.seq.finished

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best = None
        for s in self.stops:
            idx = self._text.find(s, max(0, start - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        return best

    def _holdback(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        for k in range(min(self._max_stop - 1, len(self._text) - self._sent), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def update(self) -> tuple[str, bool]:
        """Consume new tokens; return ``(delta, stopped_by_string)``."""
        if self.stop_string is not None:
            return "", False
        seq = self.seq
        ids = seq.output_ids
        end = len(ids)
        if seq.finished and seq.stop_reason is not None and isinstance(seq.stop_reason, int) and end:
            end -= 1  # the EOS / stop id itself is not text
        before = len(self._text)
        while self._consumed < end:
            self._text += self._detok.push(ids[self._consumed])
            self._consumed += 1
        if seq.finished and not self._flushed:
            self._text += self._detok.flush()
            self._flushed = True
        if self.stops:
            hit = self._find_stop(before)
            if hit is not None:
                idx, s = hit
                self._text = self._text[:idx]
                self.stop_string = s
                self._num_tokens = len(ids)
                delta = self._text[self._sent:]
                self._sent = len(self._text)
                return delta, True
        safe = len(self._text) if seq.finished else len(self._text) - self._holdback()
        delta = self._text[self._sent:safe]
        self._sent = max(self._sent, safe)
        return delta, False

    @property
    def text(self) -> str:
        """The answer so far (final once :attr:`done`)."""
        return self._text if self.done else self._text[: self._sent]

    def completion(self) -> CompletionOutput:
        """The :class:`~aquilachat.outputs.CompletionOutput` as it stands."""
        seq = self.seq
        n = self._num_tokens if self._num_tokens is not None else len(seq.output_ids)
        if self.stop_string is not None:
            reason, stop_reason = "stop", self.stop_string
        else:
            reason, stop_reason = seq.finish_reason, seq.stop_reason
        want_lp = seq.params.logprobs is not None
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(seq.output_ids[:n]), finish_reason=reason,
            error=seq.error, logprobs=list(seq.logprobs[:n]) if want_lp else None,
            top_logprobs=list(seq.top_logprobs[:n]) if want_lp and seq.params.logprobs else None,
            stop_reason=stop_reason)
