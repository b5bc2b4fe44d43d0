"""Helpers of the evaluation tests: the shared data folder, a sandbox (or a skip), and a tiny fake
OpenAI-compatible server on 127.0.0.1 (``http.server`` in a thread; loopback only)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from aquilachat.evaluation.datasets import shared_data_dir


def shared_data_or_skip() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present")
    return path


_SANDBOX = None
_SANDBOX_ERROR = None


def sandbox_or_skip():
    """One sandbox for the whole test session (toolchain probes are cached on it)."""
    global _SANDBOX, _SANDBOX_ERROR
    if _SANDBOX is None and _SANDBOX_ERROR is None:
        from aquilachat.evaluation.sandbox import Sandbox, SandboxError
        try:
            _SANDBOX = Sandbox()
        except SandboxError as exc:
            _SANDBOX_ERROR = str(exc)
    if _SANDBOX is None:
        pytest.skip(f"sandbox unavailable here: {_SANDBOX_ERROR}")
    return _SANDBOX


_TOOLCHAINS: dict[str, Any] = {}


def toolchain(language: str):
    """The language's toolchain in the session sandbox (detected once)."""
    from aquilachat.evaluation.languages import detect_toolchain
    sb = sandbox_or_skip()
    if language not in _TOOLCHAINS:
        _TOOLCHAINS[language] = detect_toolchain(language, sb)
    return _TOOLCHAINS[language]


class FakeOpenAIServer:
    """``POST /v1/completions`` and ``/v1/chat/completions`` answered by Python callables.

    ``completion(body) -> list[str]`` gives the choice texts of a completions request;
    ``chat(body) -> str`` the assistant message of a chat request. Every request body is kept in
    ``requests``. Use as a context manager; ``url`` is ``http://127.0.0.1:<port>/v1``.
    """

    def __init__(self, *, completion: Callable[[dict], list[str]] | None = None,
                 chat: Callable[[dict], str] | None = None, fail_first: int = 0) -> None:
        self.completion_fn = completion or (lambda body: ["" for _ in range(body.get("n", 1))])
        self.chat_fn = chat or (lambda body: "")
        self.requests: list[tuple[str, dict]] = []
        self.fail_first = fail_first  # answer this many requests with HTTP 503 first (retry test)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append((self.path, body))
                    if server.fail_first > 0:
                        server.fail_first -= 1
                        self._send(503, {"error": "warming up"})
                        return
                if self.path == "/v1/completions":
                    texts = server.completion_fn(body)
                    self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                                     "choices": [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]})
                elif self.path == "/v1/chat/completions":
                    text = server.chat_fn(body)
                    self._send(200, {"id": "chat-1", "object": "chat.completion", "model": body.get("model"),
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}]})
                else:
                    self._send(404, {"error": f"no route {self.path}"})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
