"""Start a real uvicorn server on 127.0.0.1 in a background thread, for the server tests and bench."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import httpx
import uvicorn

from aquilachat.server.app import ServerSettings, create_app

#: Seconds to wait for the server to start and for the model to load.
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A uvicorn server running ``app`` in a daemon thread; ``url`` is its base URL."""

    def __init__(self, app, *, log_level: str = "warning") -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # log_config=None: uvicorn leaves logging alone, so records reach pytest's caplog
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level,
                                log_config=None, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def start(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll ``/health`` until it answers 200 (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/health", timeout=5)
            if r.status_code == 200:
                return
            if r.json().get("status") == "error":
                raise RuntimeError(f"model failed to load: {r.json()}")
            time.sleep(0.05)
        raise TimeoutError("the model did not load in time")

    @property
    def state(self):
        """The app's shared state (serving, async engine)."""
        return self.app.state.aquilachat

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serve(loader: Callable, settings: ServerSettings, *, wait: bool = True) -> Iterator[RunningServer]:
    """Run a server for ``loader`` (see :func:`aquilachat.server.app.create_app`) until the block ends."""
    running = RunningServer(create_app(loader, settings)).start()
    try:
        if wait:
            running.wait_healthy()
        yield running
    finally:
        running.stop()


def openai_client(server: RunningServer, timeout: float = 120):
    """The official ``openai`` client for ``server`` (no retries: a test sees every error)."""
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """The value of an unlabelled metric from ``/metrics``."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """Parse ``data:`` lines of a server-sent event stream: dicts, then the string ``"[DONE]"``."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield data if data == "[DONE]" else json.loads(data)


def script_chat(server: RunningServer, monkeypatch, text: str) -> None:
    """Make ``server``'s chat completions answer ``text`` (a model cannot be made to write, say, an
    image instruction on demand): non-streamed and streamed, built from the real response models,
    streamed in pieces of 3 characters. Undone by ``monkeypatch``."""
    from aquilachat.server.protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionMessage,
                                            ChatCompletionResponse, ChatCompletionStreamChoice, DeltaMessage,
                                            UsageInfo)
    from aquilachat.server.serving import Stream
    serving = server.state.serving
    model = serving.model_name

    async def chat(req):
        if not req.stream:
            return ChatCompletionResponse(id="chatcmpl-1", model=model, usage=UsageInfo(
                prompt_tokens=1, completion_tokens=1, total_tokens=2), choices=[ChatCompletionChoice(
                    index=0, message=ChatCompletionMessage(content=text), finish_reason="stop")])

        async def chunks():
            for i in range(0, len(text), 3):
                choice = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content=text[i:i + 3]),
                                                    finish_reason="stop" if i + 3 >= len(text) else None)
                yield "data: " + json.dumps(ChatCompletionChunk(id="chatcmpl-1", created=1, model=model,
                                                                choices=[choice]).model_dump(mode="json")) + "\n\n"
            yield "data: [DONE]\n\n"
        return Stream(chunks(), lambda: None)
    monkeypatch.setattr(serving, "chat", chat)
