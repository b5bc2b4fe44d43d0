"""The HTTP server: the original AquilaChat API (``POST /``) and an OpenAI-compatible API.

Layers (vLLM's ``entrypoints/openai`` shape):

* :mod:`~aquilachat.server.protocol` — pydantic models of every request and response, and the
  server's limits as named constants;
* :mod:`~aquilachat.server.async_engine` — one background thread runs the continuous-batching
  :class:`~aquilachat.engine.Engine`; requests join and leave at token boundaries and receive text
  deltas through ``asyncio`` queues;
* :mod:`~aquilachat.server.serving` — turns a validated request into engine calls and responses;
* :mod:`~aquilachat.server.app` — the thin FastAPI router: body limits, authentication, error
  shapes, health and metrics.

Generation never runs on the event loop.
"""

from __future__ import annotations

__all__ = ["create_app", "ServerSettings"]


def __getattr__(name: str):
    if name in __all__:
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'aquilachat.server' has no attribute {name!r}")
