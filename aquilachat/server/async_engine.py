"""The engine behind the server: one background thread runs continuous batching.

The event loop never generates. It validates a request, registers its sequences and adds them to
the :class:`~aquilachat.engine.Engine` (``add`` is thread-safe and only appends to the waiting
queue), then awaits an :class:`asyncio.Queue`. One thread, :meth:`AsyncEngine._run`, waits on a
condition while there is no work, otherwise calls :meth:`Engine.step` again and again: every step
gives each running sequence one token, and sequences join and leave the batch between steps. After
a step the thread turns new tokens into text (:class:`~aquilachat.output_processor.OutputTracker`:
incremental detokenization, stop strings), and hands each request its events with one
``loop.call_soon_threadsafe`` per step.

A request that is abandoned (client gone, handler cancelled) is aborted with
``engine.finish(seq, "abort")``; the engine retires it, and frees its slot, at the next step
boundary: within one decode step.

Admission is bounded: at most ``max_num_seqs + max_waiting`` sequences are in the server at once
(running or queued); :meth:`AsyncEngine.submit` raises :class:`QueueFullError` beyond that (the
router answers 429 with ``Retry-After``). A request larger than that bound is still accepted when
the server is otherwise empty, so every valid request can eventually run.

If ``Engine.step`` raises (a bug, out of memory), every request in flight fails with an internal
error, the engine is reset with :meth:`Engine.abort_all`, and the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from ..engine import Engine, Sequence, StepOutput
from ..output_processor import OutputTracker
from ..outputs import CompletionOutput
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .limits import DEFAULT_MAX_WAITING

__all__ = ["AsyncEngine", "RequestHandle", "ChoiceEvent", "QueueFullError", "EngineObserver", "INTERNAL_ERROR"]

log = logging.getLogger("aquilachat.server")

#: The error text of sequences failed by an exception in the engine thread.
INTERNAL_ERROR = "internal error in the generation engine; see the server log"
#: Seconds the engine thread waits for work before checking for shutdown again.
_IDLE_POLL_S = 1.0


class QueueFullError(Exception):
    """The server holds ``max_num_seqs + max_waiting`` sequences already; retry later."""


class EngineObserver(Protocol):
    """Receives latency measurements from the engine thread (must be thread-safe)."""

    def first_token(self, seconds: float) -> None:
        """Time from a request's arrival to its sequence's first token, in seconds."""

    def inter_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of a sequence, in seconds."""


@dataclass
class ChoiceEvent:
    """What one engine step did to one answer of a request.

    ``text`` is new text safe to show (possibly empty); when ``finished``, ``output`` holds the
    final :class:`~aquilachat.outputs.CompletionOutput` (``finish_reason`` ``"stop"``,
    ``"length"`` or ``"error"`` with ``output.error``).
    """

    index: int
    text: str
    finished: bool = False
    output: CompletionOutput | None = None


@dataclass
class _Choice:
    """Engine-thread state of one answer."""

    index: int
    seq: Sequence | None = None
    tracker: OutputTracker | None = None
    last_token_time: float | None = None
    done: bool = False


@dataclass
class RequestHandle:
    """One request in flight: ``len(prompts) * n`` answers, events arrive in :attr:`queue`.

    Iterate with ``async for events in handle.events()``; each item is the list of
    :class:`ChoiceEvent` of one engine step. Iteration ends when every answer has finished.
    """

    request_id: str
    prompt_lens: list[int]
    num_choices: int
    arrival: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    choices: list[_Choice] = field(default_factory=list)
    remaining: int = 0
    aborted: bool = False

    @property
    def finished(self) -> bool:
        """True once every answer has finished (or the request was aborted)."""
        return self.aborted or self.remaining == 0

    async def events(self) -> AsyncIterator[list[ChoiceEvent]]:
        """The events of each engine step that touched this request, until all answers finish."""
        while not self.finished or not self.queue.empty():
            events = await self.queue.get()
            yield events


class AsyncEngine:
    """Runs an :class:`~aquilachat.engine.Engine` in a background thread for an asyncio server.

    Args:
        engine: the engine (owned from now on: only this object may call ``step``).
        tokenizer: for text deltas.
        loop: the event loop that calls :meth:`submit` / :meth:`abort` and receives events.
        max_waiting: sequences that may queue beyond ``engine.max_num_seqs``.
        observer: receives time-to-first-token and inter-token latencies.

    :meth:`submit` and :meth:`abort` must be called from the event loop's thread.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, loop: asyncio.AbstractEventLoop, *,
                 max_waiting: int = DEFAULT_MAX_WAITING, observer: EngineObserver | None = None) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.loop = loop
        self.max_waiting = max_waiting
        self.observer = observer
        self._routes: dict[str, tuple[RequestHandle, _Choice]] = {}  # seq_id -> owner
        self._active = 0  # sequences submitted and not yet finished (event-loop thread only)
        self._cond = threading.Condition()
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="aquilachat-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    @property
    def num_active(self) -> int:
        """Sequences submitted and not finished (running or waiting)."""
        return self._active

    @property
    def capacity(self) -> int:
        """Most sequences held at once: ``max_num_seqs + max_waiting``."""
        return self.engine.max_num_seqs + self.max_waiting

    def submit(self, prompts: list[list[int]], params: SamplingParams, *, cap_to_context: bool = False,
               request_id: str | None = None) -> RequestHandle:
        """Queue ``params.n`` answers for each prompt (answer ``i`` seeded with ``seed + i``).

        Choice ``p * n + i`` is answer ``i`` of prompt ``p``. Never blocks on generation.

        Raises:
            ValidationError: a prompt is empty, has ids outside the vocabulary or does not fit the
                context window (see :meth:`Engine.check_request`); nothing is queued.
            QueueFullError: the server is full; nothing is queued.
            RuntimeError: the engine has been shut down.
        """
        if self._stop:
            raise RuntimeError("the engine is shut down")
        for ids in prompts:
            self.engine.check_request(ids, params, cap_to_context=cap_to_context)
        count = len(prompts) * params.n
        if self._active and self._active + count > self.capacity:
            raise QueueFullError(f"the server is busy ({self._active} sequences running or queued, "
                                 f"capacity {self.capacity}); retry later")
        rid = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(rid, [len(ids) for ids in prompts], count, remaining=count)
        for p, ids in enumerate(prompts):
            for i in range(params.n):
                choice = _Choice(p * params.n + i)
                handle.choices.append(choice)
                seq_id = f"{rid}-{choice.index}"
                self._routes[seq_id] = (handle, choice)  # before add: the engine may step it at once
                choice.seq = self.engine.add(ids, params, seq_id=seq_id, seed_offset=i,
                                             cap_to_context=cap_to_context)
        self._active += count
        with self._cond:
            self._cond.notify()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop generating for ``handle`` (client gone): its sequences leave the batch at the next
        step boundary. Idempotent; no effect once the request has finished."""
        if handle.finished:
            return
        handle.aborted = True
        for choice in handle.choices:
            if choice.seq is not None:
                self._routes.pop(choice.seq.seq_id, None)
                self.engine.finish(choice.seq, "abort")
        self._active -= handle.remaining
        handle.remaining = 0
        with self._cond:
            self._cond.notify()

    def _deliver(self, batch: list[tuple[RequestHandle, list[ChoiceEvent]]]) -> None:
        """Runs on the event loop: hand each request the events of one step."""
        for handle, events in batch:
            if handle.aborted:
                continue
            done = sum(e.finished for e in events)
            handle.remaining -= done
            self._active -= done
            handle.queue.put_nowait(events)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread (requests in flight get no more events)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.engine.has_unfinished():
                    self._cond.wait(_IDLE_POLL_S)
                if self._stop:
                    return
            try:
                outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all()
                continue
            try:
                self._route(outputs)
            except Exception:  # a bug in routing must not kill the thread
                log.exception("routing engine outputs failed; failing the requests in flight")
                self._fail_all()

    def _post(self, batch: list[tuple[RequestHandle, list[ChoiceEvent]]]) -> None:
        if not batch:
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _route(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        per_request: dict[str, tuple[RequestHandle, list[ChoiceEvent]]] = {}
        for out in outputs:
            route = self._routes.get(out.seq.seq_id)
            if route is None:  # aborted
                continue
            handle, choice = route
            if choice.done:
                continue
            if choice.tracker is None:
                choice.tracker = OutputTracker(out.seq, self.tokenizer, index=choice.index)
            if out.token_id is not None and self.observer is not None:
                if choice.last_token_time is None:
                    self.observer.first_token(now - handle.arrival)
                else:
                    self.observer.inter_token(now - choice.last_token_time)
                choice.last_token_time = now
            try:
                text, stopped = choice.tracker.update()
            except Exception:
                log.exception("detokenizing failed for %s", out.seq.seq_id)
                self.engine.finish(out.seq, "error")
                event = ChoiceEvent(choice.index, "", True, CompletionOutput(
                    choice.index, finish_reason="error", error=INTERNAL_ERROR))
            else:
                if stopped:
                    self.engine.finish(out.seq, "stop", choice.tracker.stop_string)
                event = ChoiceEvent(choice.index, text)
                if choice.tracker.done:
                    event.finished, event.output = True, choice.tracker.completion()
            if event.finished:
                choice.done = True
                self._routes.pop(out.seq.seq_id, None)
            elif not event.text:
                continue
            per_request.setdefault(handle.request_id, (handle, []))[1].append(event)
        self._post(list(per_request.values()))

    def _fail_all(self) -> None:
        """Reset the engine and fail every sequence in flight with :data:`INTERNAL_ERROR`."""
        self.engine.abort_all("error", INTERNAL_ERROR)
        per_request: dict[str, tuple[RequestHandle, list[ChoiceEvent]]] = {}
        for seq_id, (handle, choice) in list(self._routes.items()):
            self._routes.pop(seq_id, None)
            if choice.done:
                continue
            choice.done = True
            if choice.seq is not None and not choice.seq.finished:  # added after the reset
                self.engine.finish(choice.seq, "abort")
            event = ChoiceEvent(choice.index, "", True, CompletionOutput(
                choice.index, finish_reason="error", error=INTERNAL_ERROR))
            per_request.setdefault(handle.request_id, (handle, []))[1].append(event)
        self._post(list(per_request.values()))
