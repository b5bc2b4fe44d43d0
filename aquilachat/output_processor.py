"""From engine step outputs to text: deltas, stop-string finishes and errors, for every driver.

The engine only appends token ids. :class:`OutputProcessor` is the one place that turns what a
step did into what callers see. :class:`~aquilachat.llm.LLM` drives the engine in the caller's
thread, the server's :class:`~aquilachat.server.async_engine.AsyncEngine` in a background thread;
both hand each step's outputs to the same :meth:`OutputProcessor.process`. A request goes through:

1. :meth:`OutputProcessor.prepare`: every prompt is validated (:meth:`Engine.check_request`: empty
   prompt, ids outside the vocabulary, the context window) before anything is queued; this is the
   only validation a request gets;
2. :meth:`OutputProcessor.add`: its ``len(prompts) * n`` sequences are queued (answer ``i`` of a
   prompt is seeded with ``seed + i``; choice ``p * n + i`` is answer ``i`` of prompt ``p``);
3. :meth:`OutputProcessor.process`, after every engine step: a :class:`ChoiceEvent` per answer with
   new text to show, or that finished (stop, length, a sampling error, or an exception while
   detokenizing, which fails that answer alone); a stop string found in the text retires its
   sequence with ``engine.finish(seq, "stop", string)``.

For each sequence an :class:`OutputTracker` turns tokens into text with
:class:`~aquilachat.tokenizer.IncrementalDetokenizer` (never half a UTF-8 character), finds stop
strings even when they are split across tokens, and holds back the tail of the text that could
still become a stop string, so no part of a stop string is ever shown. The deltas joined equal
the final text.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from .engine import Engine, Sequence, StepOutput
from .outputs import CompletionOutput
from .sampling_params import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["OutputProcessor", "OutputTracker", "RequestState", "ChoiceEvent", "EngineObserver", "INTERNAL_ERROR",
           "stop_string_token_ids"]

log = logging.getLogger("aquilachat")

#: The error of an answer failed by an exception outside the model (a bug); details go to the log.
INTERNAL_ERROR = "internal error in the generation engine; see the server log"
#: Request ids drawn when the caller gives none (unique in the process, so sequence ids never clash).
_REQUEST_IDS = itertools.count()


class EngineObserver(Protocol):
    """Receives latency measurements from whichever thread steps the engine (must be thread-safe)."""

    def first_token(self, seconds: float) -> None:
        """Time from a request's arrival to its sequence's first token, in seconds."""

    def inter_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of a sequence, in seconds."""


@dataclass
class ChoiceEvent:
    """What one engine step did to one answer of a request.

    ``text`` is new text safe to show (possibly empty); when ``finished``, ``output`` holds the
    final :class:`~aquilachat.outputs.CompletionOutput` (``finish_reason`` ``"stop"``,
    ``"length"`` or ``"error"`` with ``output.error``). ``tokens`` is the range ``(start, end)``
    of the answer's token ids not reported by an earlier event (their log-probabilities are in
    the sequence and, at the end, in ``output``); the ranges of an answer's events add up to
    its ``token_ids``.
    """

    index: int
    text: str
    finished: bool = False
    output: CompletionOutput | None = None
    tokens: tuple[int, int] = (0, 0)


@functools.lru_cache(maxsize=256)
def _stop_string_ids(tokenizer: Tokenizer, stop: str) -> frozenset[int]:
    data = stop.encode("utf-8")
    prefixes = [data[:k] for k in range(1, len(data))]
    ids = set()
    for i in range(tokenizer.vocab_size):
        b = tokenizer.token_bytes(i, skip_special_tokens=True)
        if b and (data in b or any(b.endswith(p) for p in prefixes)):
            ids.add(i)
    return frozenset(ids)


def stop_string_token_ids(tokenizer: Tokenizer, stops: Iterable[str]) -> list[int]:
    """The ids that would start a stop string, held back while an answer is shorter than
    ``min_tokens`` (so the first ``min_tokens`` tokens never begin a stop string, and the answer
    keeps all of their text): those whose bytes contain a stop string or end with a proper prefix
    of one. Nothing else can start one there: by induction the text so far holds no stop string
    and ends with no prefix of one, so a stop string beginning in it must begin in the new token.
    vLLM's ``min_tokens`` holds back only the end-of-answer and stop ids; a chat template's
    ``###`` is text, so without this the bundled model could still end at once. Cached per
    tokenizer and stop string (one pass over the vocabulary, ~0.1 s for 100k ids)."""
    ids: set[int] = set()
    for stop in stops:
        ids |= _stop_string_ids(tokenizer, stop)
    return sorted(ids)


@dataclass
class _Choice:
    """Text state of one answer (the tracker is made from the first step output of its sequence)."""

    index: int
    seq: Sequence | None = None
    tracker: OutputTracker | None = None
    last_token_time: float | None = None
    done: bool = False
    output: CompletionOutput | None = None
    reported: int = 0  # token ids covered by earlier events


@dataclass
class RequestState:
    """A validated request (:meth:`OutputProcessor.prepare`).

    Attributes:
        request_id: unique among the requests in flight; sequence ids are ``{request_id}-{choice}``.
        prompts: prompt ids, one list per prompt.
        params: the sampling parameters of every answer.
        max_tokens: per prompt, the answer length :meth:`Engine.check_request` allowed.
        stop: stop strings besides ``params.stop`` (a chat template's).
        grammar: the compiled response format (:class:`~aquilachat.structured_output.CompiledGrammar`),
            each answer gets its own matcher; None: no constraint.
        end_ids: ids held back while an answer is shorter than ``params.min_tokens`` besides EOS
            and stop ids (:func:`stop_string_token_ids`).
        arrival: ``time.monotonic()`` when the request was validated (time to first token counts from it).
        choices: one per answer once :meth:`OutputProcessor.add` has queued them.
    """

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    max_tokens: list[int]
    stop: tuple[str, ...] = ()
    grammar: object | None = None
    end_ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    choices: list[_Choice] = field(default_factory=list)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def finished(self) -> bool:
        """True once every answer has finished or been aborted."""
        return bool(self.choices) and all(c.done for c in self.choices)

    def outputs(self) -> list[CompletionOutput | None]:
        """The final output of each answer, in choice order (None for an aborted one)."""
        return [c.output for c in self.choices]


class OutputProcessor:
    """Turns engine step outputs into :class:`ChoiceEvent` s for the requests it added (module docstring).

    Args:
        engine: the engine whose sequences it queues and finishes.
        tokenizer: for the text.
        observer: receives time-to-first-token and inter-token latencies.

    :meth:`prepare`, :meth:`add` and :meth:`abort` may run on another thread than the one that
    steps the engine and calls :meth:`process` (the server's event loop): a sequence is routed
    before it is queued, and each route is one dictionary entry, set and removed atomically.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, observer: EngineObserver | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.observer = observer
        self._routes: dict[str, tuple[RequestState, _Choice]] = {}  # seq_id -> owner

    def prepare(self, prompts: list[list[int]], params: SamplingParams, *, request_id: str | None = None,
                stop: Iterable[str] = (), cap_to_context: bool = False, grammar: object | None = None) -> RequestState:
        """Validate a request; nothing is queued yet. ``grammar``: the request's compiled response
        format (:meth:`~aquilachat.structured_output.GrammarBackend.compile`, which the caller runs
        off any event loop: it may take a while).

        Raises:
            ValidationError: a prompt is empty, has ids outside the vocabulary, or does not fit
                the context window with ``params.max_tokens`` (``cap_to_context`` caps
                ``max_tokens`` to the window instead); see :meth:`Engine.check_request`.
        """
        max_tokens = [self.engine.check_request(ids, params, cap_to_context=cap_to_context) for ids in prompts]
        stop = tuple(stop)
        end_ids = stop_string_token_ids(self.tokenizer, [*params.stop, *stop]) if params.min_tokens else []
        return RequestState(request_id or f"req-{next(_REQUEST_IDS)}", [list(ids) for ids in prompts], params,
                            max_tokens, stop, grammar, end_ids)

    def add(self, request: RequestState) -> None:
        """Queue the answers of a prepared request in the engine."""
        n = request.params.n
        for p, ids in enumerate(request.prompts):
            for i in range(n):
                choice = _Choice(p * n + i)
                request.choices.append(choice)
                seq_id = f"{request.request_id}-{choice.index}"
                self._routes[seq_id] = (request, choice)  # before add: another thread may step it at once
                constraint = request.grammar.constraint() if request.grammar is not None else None
                choice.seq = self.engine.add(ids, request.params, seq_id=seq_id, seed_offset=i,
                                             max_tokens=request.max_tokens[p], constraint=constraint,
                                             extra_end_ids=request.end_ids)

    def process(self, outputs: list[StepOutput]) -> list[tuple[RequestState, list[ChoiceEvent]]]:
        """The events of one engine step, grouped by request; answers with no new text and not
        finished get no event. Outputs of sequences this processor did not add are ignored."""
        now = time.monotonic()
        per_request: dict[str, tuple[RequestState, list[ChoiceEvent]]] = {}
        for out in outputs:
            route = self._routes.get(out.seq.seq_id)
            if route is None:  # aborted, or not ours
                continue
            request, choice = route
            if choice.done:
                continue
            if out.token_id is not None:
                self._observe(request, choice, now)
            event = self._update(request, choice, out.seq)
            if event is not None:
                per_request.setdefault(request.request_id, (request, []))[1].append(event)
        return list(per_request.values())

    def abort(self, request: RequestState) -> None:
        """Stop generating for ``request`` (client gone, caller stopped, an exception): its
        unfinished sequences leave the engine's batch at the next step boundary. Idempotent."""
        for choice in request.choices:
            if choice.done:
                continue
            choice.done = True
            if choice.seq is not None:
                self._routes.pop(choice.seq.seq_id, None)
                self.engine.finish(choice.seq, "abort")

    def fail_all(self, error: str) -> list[tuple[RequestState, list[ChoiceEvent]]]:
        """Reset the engine (:meth:`Engine.abort_all`, for a caller whose step raised) and finish
        every answer in flight with ``finish_reason="error"`` and ``error``; return those events."""
        self.engine.abort_all("error", error)
        per_request: dict[str, tuple[RequestState, list[ChoiceEvent]]] = {}
        for seq_id, (request, choice) in list(self._routes.items()):
            if choice.done:
                continue
            if choice.seq is not None and not choice.seq.finished:  # added after the reset
                self.engine.finish(choice.seq, "abort")
            event = self._finish(choice, seq_id, "", CompletionOutput(choice.index, finish_reason="error", error=error))
            per_request.setdefault(request.request_id, (request, []))[1].append(event)
        return list(per_request.values())

    # ------------------------------------------------------------------ one answer
    def _observe(self, request: RequestState, choice: _Choice, now: float) -> None:
        if self.observer is None:
            return
        if choice.last_token_time is None:
            self.observer.first_token(now - request.arrival)
        else:
            self.observer.inter_token(now - choice.last_token_time)
        choice.last_token_time = now

    def _update(self, request: RequestState, choice: _Choice, seq: Sequence) -> ChoiceEvent | None:
        if choice.tracker is None:
            choice.tracker = OutputTracker(seq, self.tokenizer, index=choice.index, stop=request.stop)
        try:
            text, stopped = choice.tracker.update()
        except Exception:  # a bug in detokenizing fails this answer only
            log.exception("detokenizing failed for %s", seq.seq_id)
            self.engine.finish(seq, "error")
            return self._finish(choice, seq.seq_id, "", CompletionOutput(
                choice.index, finish_reason="error", error=INTERNAL_ERROR))
        if stopped:
            self.engine.finish(seq, "stop", choice.tracker.stop_string, num_tokens=choice.tracker.num_tokens)
        if choice.tracker.done:
            return self._finish(choice, seq.seq_id, text, choice.tracker.completion())
        if not text:
            return None
        start, choice.reported = choice.reported, choice.tracker.num_consumed
        return ChoiceEvent(choice.index, text, tokens=(start, choice.reported))

    def _finish(self, choice: _Choice, seq_id: str, text: str, output: CompletionOutput) -> ChoiceEvent:
        choice.done, choice.output = True, output
        self._routes.pop(seq_id, None)
        start, choice.reported = min(choice.reported, len(output.token_ids)), len(output.token_ids)
        return ChoiceEvent(choice.index, text, True, output, tokens=(start, choice.reported))


class OutputTracker:
    """Text state of one :class:`~aquilachat.engine.Sequence`.

    Call :meth:`update` after each engine step that touched the sequence; it returns the new text
    that is safe to show and says whether a stop string ended the answer (the caller then retires
    the sequence with ``engine.finish(seq, "stop", stop_string)``). ``stop``: stop strings besides
    ``seq.params.stop`` (a chat template's).
    """

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, index: int = 0, stop: Iterable[str] = ()) -> None:
        self.seq = seq
        self.index = index
        # the caller's stop strings first, then extra ones (a chat template's) not among them
        self.stops = [s for s in dict.fromkeys([*seq.params.stop, *stop]) if s]
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
            start = len(self._text)
            self._text += self._detok.push(ids[self._consumed])
            self._consumed += 1
            if self.stops and self._consumed < len(ids) and len(self._text) > start:
                # several new tokens (the engine's multi-step decoding): the answer ends at the
                # token that completes a stop string, as when the tokens come one step at a time;
                # also the last text token when an EOS / stop id follows it in the same burst
                # (single steps stop before generating that id, so it is not in token_ids)
                hit = self._find_stop(start)
                if hit is not None:
                    return self._stop_at(hit, self._consumed), True
        if seq.finished and not self._flushed:
            self._text += self._detok.flush()
            self._flushed = True
        if self.stops:
            hit = self._find_stop(before)
            if hit is not None:
                return self._stop_at(hit, len(ids)), True
        safe = len(self._text) if seq.finished else len(self._text) - self._holdback()
        delta = self._text[self._sent:safe]
        self._sent = max(self._sent, safe)
        return delta, False

    def _stop_at(self, hit: tuple[int, str], num_tokens: int) -> str:
        """End the answer at the stop string ``hit`` (index, string) with its first
        ``num_tokens`` output ids; returns the text delta not yet sent."""
        idx, s = hit
        self._text = self._text[:idx]
        self.stop_string = s
        self._num_tokens = num_tokens
        delta = self._text[self._sent:]
        self._sent = len(self._text)
        return delta

    @property
    def num_tokens(self) -> int | None:
        """Output ids the answer keeps once a stop string ended it (None before)."""
        return self._num_tokens

    @property
    def num_consumed(self) -> int:
        """Output ids turned into text so far."""
        return self._consumed

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
            stop_reason=stop_reason, prompt_logprobs=seq.prompt_logprobs,
            num_cached_tokens=seq.num_cached_tokens)
