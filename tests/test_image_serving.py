"""The image jobs' limits (server/limits.py): one at a time off the event loop, a bounded queue
(429), a timeout (504) that stops the backend, and a job whose client has gone stopped the same
way. A backend that waits on its ``cancel`` event stands in for a slow pipeline (no diffusers needed)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
from PIL import Image

from aquilachat.images import ImageBackend, ImageCancelled
from aquilachat.server import image_serving
from aquilachat.server.image_serving import ImageServing
from aquilachat.server.protocol import ImageGenerationRequest
from aquilachat.server.serving import APIError


class SlowBackend(ImageBackend):
    """Draws a 8x8 image after ``seconds``, checking ``cancel`` every 10 ms as a pipeline does between steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.cancelled = threading.Event()
        self.threads: set[str] = set()

    def generate(self, prompt, *, n=1, size=None, seed=None, cancel=None, on_step=None):
        self.threads.add(threading.current_thread().name)
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if cancel.is_set():
                self.cancelled.set()
                raise ImageCancelled()
            time.sleep(0.01)
            on_step()
        return [Image.new("RGB", (8, 8))] * n


def request() -> ImageGenerationRequest:
    return ImageGenerationRequest(prompt="x")


def test_jobs_run_one_at_a_time_off_the_loop_with_a_bounded_queue(monkeypatch):
    monkeypatch.setattr(image_serving, "MAX_WAITING_IMAGE_JOBS", 2)
    backend = SlowBackend(0.3)

    async def main():
        serving = ImageServing(backend, None, store=None)
        ticks = 0

        async def ticker():  # the event loop keeps running while images are drawn
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        tick = asyncio.ensure_future(ticker())
        jobs = [asyncio.ensure_future(serving.generations(request(), "")) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert (serving.stats.running, serving.stats.waiting) == (1, 2)
        with pytest.raises(APIError) as err:  # a fourth: the queue is full
            await serving.generations(request(), "")
        assert err.value.status == 429 and err.value.headers["Retry-After"]
        started = time.monotonic()
        results = await asyncio.gather(*jobs)
        assert time.monotonic() - started > 0.5  # the three ran one after the other
        assert all(len(r.data) == 1 for r in results) and serving.stats.images == 3
        assert ticks > 20 and serving.stats.running == serving.stats.waiting == 0
        tick.cancel()
        serving.shutdown()
    asyncio.run(main())
    assert len(backend.threads) == 1 and next(iter(backend.threads)).startswith("aquilachat-image")


def test_timeout_stops_the_backend(monkeypatch):
    monkeypatch.setattr(image_serving, "IMAGE_TIMEOUT_S", 0.2)
    backend = SlowBackend(30)

    async def main():
        serving = ImageServing(backend, None, store=None)
        with pytest.raises(APIError) as err:
            await serving.generations(request(), "")
        assert err.value.status == 504
        assert await asyncio.to_thread(backend.cancelled.wait, 5)
        assert serving.stats.failed == 1 and serving.stats.running == 0
        serving.shutdown()
    asyncio.run(main())
    # finalize the cancelled job's leftovers now: CPython 3.11 raises "AST constructor recursion
    # depth mismatch" if the garbage collector runs their finalizers inside a later ast.parse
    gc.collect()


def test_a_gone_client_stops_the_backend():
    backend = SlowBackend(30)

    async def main():
        serving = ImageServing(backend, None, store=None)
        job = asyncio.ensure_future(serving.generations(request(), ""))
        await asyncio.sleep(0.1)
        job.cancel()  # what the router does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await job
        assert await asyncio.to_thread(backend.cancelled.wait, 5)
        serving.shutdown()
    asyncio.run(main())
