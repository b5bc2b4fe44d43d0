"""The engine behind the server: one background thread runs continuous batching.

The event loop never generates. It validates a request, registers its sequences and adds them to
the :class:`~aquilachat.engine.Engine` (``add`` is thread-safe and only appends to the waiting
queue), then awaits an :class:`asyncio.Queue`. One thread, :meth:`AsyncEngine._run`, waits on a
condition while there is no work, otherwise calls :meth:`Engine.step` again and again: every step
gives each running sequence one token, and sequences join and leave the batch between steps. After
a step the thread turns new tokens into text with the
:class:`~aquilachat.output_processor.OutputProcessor` that the offline ``LLM`` uses too
(incremental detokenization, stop strings, errors), and hands each request its events with one
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
import logging
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

from ..engine import Engine
from ..output_processor import INTERNAL_ERROR, ChoiceEvent, EngineObserver, OutputProcessor, RequestState
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from .limits import DEFAULT_MAX_WAITING

__all__ = ["AsyncEngine", "RequestHandle", "ChoiceEvent", "QueueFullError", "EngineObserver", "INTERNAL_ERROR"]

log = logging.getLogger("aquilachat.server")

#: Seconds the engine thread waits for work before checking for shutdown again.
_IDLE_POLL_S = 1.0


class QueueFullError(Exception):
    """The server holds ``max_num_seqs + max_waiting`` sequences already; retry later."""


@dataclass
class RequestHandle:
    """One request in flight: ``len(prompts) * n`` answers, events arrive in :attr:`queue`.

    Iterate with ``async for events in handle.events()``; each item is the list of
    :class:`ChoiceEvent` of one engine step. Iteration ends when every answer has finished.
    """

    request: RequestState
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    remaining: int = 0
    aborted: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_lens(self) -> list[int]:
        return [len(ids) for ids in self.request.prompts]

    @property
    def num_choices(self) -> int:
        return self.request.num_choices

    @property
    def arrival(self) -> float:
        """``time.monotonic()`` when the request was accepted."""
        return self.request.arrival

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
        self.processor = OutputProcessor(engine, tokenizer, observer=observer)
        self.loop = loop
        self.max_waiting = max_waiting
        self._handles: dict[str, RequestHandle] = {}  # request_id -> handle (event-loop thread only)
        self._active = 0  # sequences submitted and not yet finished (event-loop thread only)
        self._cond = threading.Condition()
        self._stop = False
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

    def submit(self, prompts: list[list[int]], params: SamplingParams, *, stop: Iterable[str] = (),
               cap_to_context: bool = False, request_id: str | None = None, grammar: object | None = None) -> RequestHandle:
        """Queue ``params.n`` answers for each prompt (answer ``i`` seeded with ``seed + i``);
        ``stop``: stop strings besides ``params.stop`` (a chat template's); ``grammar``: the
        compiled response format (compiled by the caller, off the event loop).

        Choice ``p * n + i`` is answer ``i`` of prompt ``p``. Never blocks on generation.

        Raises:
            ValidationError: a prompt is empty, has ids outside the vocabulary or does not fit the
                context window (see :meth:`Engine.check_request`); nothing is queued.
            QueueFullError: the server is full; nothing is queued.
            RuntimeError: the engine has been shut down.
        """
        if self._stop:
            raise RuntimeError("the engine is shut down")
        request = self.processor.prepare(prompts, params, request_id=request_id, stop=stop,
                                         cap_to_context=cap_to_context, grammar=grammar)
        count = request.num_choices
        if self._active and self._active + count > self.capacity:
            raise QueueFullError(f"the server is busy ({self._active} sequences running or queued, "
                                 f"capacity {self.capacity}); retry later")
        handle = RequestHandle(request, remaining=count)
        self._handles[request.request_id] = handle
        self.processor.add(request)
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
        self._handles.pop(handle.request_id, None)
        self.processor.abort(handle.request)
        self._active -= handle.remaining
        handle.remaining = 0
        with self._cond:
            self._cond.notify()

    def _deliver(self, batch: list[tuple[RequestState, list[ChoiceEvent]]]) -> None:
        """Runs on the event loop: hand each request the events of one step."""
        for request, events in batch:
            handle = self._handles.get(request.request_id)
            if handle is None or handle.aborted:
                continue
            done = sum(e.finished for e in events)
            handle.remaining -= done
            self._active -= done
            if handle.remaining == 0:
                del self._handles[request.request_id]
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
                self._post(self.processor.fail_all(INTERNAL_ERROR))
                continue
            try:
                self._post(self.processor.process(outputs))
            except Exception:  # a bug in routing must not kill the thread
                log.exception("routing engine outputs failed; failing the requests in flight")
                self._post(self.processor.fail_all(INTERNAL_ERROR))

    def _post(self, batch: list[tuple[RequestState, list[ChoiceEvent]]]) -> None:
        if not batch:
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass
