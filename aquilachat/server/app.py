"""The FastAPI application: a thin router over :class:`~aquilachat.server.serving.Serving`.

What lives here and nowhere else: reading the body (size limit, UTF-8, JSON), parsing it into the
:mod:`~aquilachat.server.protocol` model, authentication, turning errors into JSON bodies (the
OpenAI error object on ``/v1/*``, the original shape on ``POST /``, FlagAI's reply shape on
``/func`` and ``/stream_func``), cancelling a request whose client has gone, ``/health``,
``/metrics``, and the OpenAPI description (``/openapi.json``, ``/docs``).

The routes read their raw bodies (so that a body is size-limited as it streams in, strict JSON
types hold, and every error keeps its route's shape) and declare those bodies to FastAPI for the
OpenAPI schema (``openapi_extra`` with the protocol models' JSON schemas in
``components.schemas``), with their responses.

The model loads in a background thread after the server starts: until it is loaded ``/health``
and every API route answer 503 with ``Retry-After``. No request body, prompt or answer is logged
unless ``log_prompts`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import shutil
import threading
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..images import ImageBackend
from .async_engine import AsyncEngine
from .image_serving import ImageServing, ImageStore, body_limit, image_store_dir
from .page import STATIC_DIR, page_response
from .limits import DEFAULT_MAX_WAITING, LOADING_RETRY_AFTER_S, MAX_BODY_BYTES
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       ErrorResponse, FlagAIRequest, FlagAIResponse, FlagAIStreamRequest, ImageEditRequest,
                       ImageGenerationRequest, ImagesResponse, LegacyRequest, LegacyResponse, ModelList)
from .serving import APIError, Serving, Stream

__all__ = ["create_app", "ServerSettings", "ServerMetrics"]

log = logging.getLogger("aquilachat.server")

#: Histogram buckets, in seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class ServerSettings:
    """How the server behaves (the ``aquilachat serve`` options).

    Attributes:
        model_name: the model id of ``/v1/models``; requests naming another model get 404.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
        max_waiting: sequences that may wait for a slot beyond ``max_num_seqs`` (then 429).
        log_prompts: log prompts and answers.
        max_body_bytes: largest request body (then 413).
        allowed_origins: web origins (``scheme://host[:port]``) besides the server's own whose
            pages may call the API (``--allowed-origins``); they also get CORS headers. ``*`` allows any.
        run_instructions: carry out ``#text2image#`` / ``#InstructFace#`` answers of every chat
            request that does not say otherwise (``--run-instructions``).
    """

    model_name: str
    api_key: str | None = None
    max_waiting: int = DEFAULT_MAX_WAITING
    log_prompts: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    allowed_origins: tuple[str, ...] = ()
    run_instructions: bool = False

    def __post_init__(self) -> None:
        # compared with the Origin header as browsers send it: lower case, no trailing slash
        self.allowed_origins = tuple(o.strip().lower().rstrip("/") for o in self.allowed_origins if o.strip())


class ServerMetrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process).

    Exposed: ``aquilachat_requests_total{endpoint,status}``, ``aquilachat_prompt_tokens_total``,
    ``aquilachat_generation_tokens_total``, ``aquilachat_sampling_errors_total``,
    ``aquilachat_prefix_cache_queries_total`` and ``aquilachat_prefix_cache_hits_total`` (prompt
    tokens looked up in the prefix cache and found there: vLLM's ``prefix_cache_queries`` /
    ``prefix_cache_hits``; the hit rate is their ratio),
    ``aquilachat_running_sequences``, ``aquilachat_waiting_sequences``, ``aquilachat_model_loaded``,
    and the histograms ``aquilachat_time_to_first_token_seconds`` (request arrival to a sequence's
    first token) and ``aquilachat_inter_token_latency_seconds``.
    """

    def __init__(self, state: "_State") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("aquilachat_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("aquilachat_time_to_first_token_seconds",
                              "Seconds from a request's arrival to the first token of each of its answers",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("aquilachat_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of an answer", buckets=ITL_BUCKETS,
                             registry=self.registry)
        self.registry.register(_EngineCollector(state))
        self.registry.register(_ImageCollector(state))

    # EngineObserver (called from the engine thread; prometheus_client is thread-safe)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's counters and queue lengths at scrape time."""

    def __init__(self, state: "_State") -> None:
        self.state = state

    def collect(self):
        engine = self.state.async_engine.engine if self.state.async_engine is not None else None
        stats = engine.stats if engine is not None else None
        for name, doc, attr in (("aquilachat_prompt_tokens", "Prompt tokens of admitted sequences (those "
                                 "found in the prefix cache included)", "prompt_tokens"),
                                ("aquilachat_generation_tokens", "Tokens generated", "generated_tokens"),
                                ("aquilachat_sampling_errors", "Sequences that failed in sampling "
                                                               "(non-finite logits)", "sampling_errors")):
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr) if stats else 0)
        cache = engine.prefix_cache if engine is not None else None
        yield CounterMetricFamily("aquilachat_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=cache.queries if cache is not None else 0)
        yield CounterMetricFamily("aquilachat_prefix_cache_hits", "Prompt tokens found in the prefix cache (their "
                                  "keys and values reused)", value=cache.hits if cache is not None else 0)
        yield GaugeMetricFamily("aquilachat_running_sequences", "Sequences in the running batch",
                                value=engine.num_running if engine else 0)
        yield GaugeMetricFamily("aquilachat_waiting_sequences", "Sequences waiting for a slot",
                                value=engine.num_waiting if engine else 0)
        yield GaugeMetricFamily("aquilachat_model_loaded", "1 once the model is loaded",
                                value=1 if engine else 0)


class _ImageCollector:
    """The image jobs' counters (:class:`~.image_serving.ImageStats`) at scrape time."""

    def __init__(self, state: "_State") -> None:
        self.state = state

    def collect(self):
        stats = self.state.images.stats if self.state.images is not None else None
        for name, doc, attr in (("aquilachat_image_jobs_running", "Image jobs running", "running"),
                                ("aquilachat_image_jobs_waiting", "Image jobs waiting for the running one", "waiting")):
            yield GaugeMetricFamily(name, doc, value=getattr(stats, attr) if stats else 0)
        for name, doc, attr in (("aquilachat_image_steps", "Denoising steps done (remote edit steps too)", "steps"),
                                ("aquilachat_images", "Images made", "images"),
                                ("aquilachat_image_jobs_failed", "Image jobs that failed, timed out or were "
                                                                 "cancelled", "failed")):
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr) if stats else 0)


class _State:
    """What the routes share: the serving layer once loaded, or the load error."""

    def __init__(self) -> None:
        self.serving: Serving | None = None
        self.async_engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.memory_plan: dict | None = None  # the loaded model's (aquilachat.memory.MemoryPlan.as_dict)
        self.images: ImageServing | None = None


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


#: Error body shapes per route: the OpenAI error object everywhere else.
_LEGACY_PATHS = {"/"}
_FLAGAI_PATHS = {"/func", "/stream_func"}
#: Paths served without the API key: health checks, and the API's description (no model access).
_PUBLIC_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}


def _is_public(method: str, path: str) -> bool:
    """Served without the API key: :data:`_PUBLIC_PATHS`, and the chat page with its files (the
    page asks for the key and sends it with every API call)."""
    return path in _PUBLIC_PATHS or (method in ("GET", "HEAD") and (path == "/" or path.startswith("/static/")))


def _error_response(exc: APIError, path: str, model_name: str = "", input_length: int = 0) -> JSONResponse:
    """``exc`` in the error shape of the route at ``path``."""
    if path in _LEGACY_PATHS:
        body = exc.legacy_body()
    elif path in _FLAGAI_PATHS:
        body = exc.flagai_body(model_name, input_length)
    else:
        body = exc.openai_body()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")


def _pydantic_error(exc: PydanticValidationError) -> APIError:
    """One readable 400 from pydantic's errors: the most specific one, its location dotted
    (union-member tags dropped), e.g. ``stop.1: String should have at least 1 character``."""
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}")

    def loc(err) -> str:
        parts = [str(p) for p in err["loc"]
                 if isinstance(p, int) or (_FIELD.fullmatch(p) and p not in ("str", "int", "float", "bool"))]
        return ".".join(parts)

    def score(err) -> tuple[int, int]:  # prefer range errors over "wrong type" of another union member
        return (0 if err["type"].endswith("_type") else 1, len(loc(err)))

    best = max(errors, key=score)
    where = loc(best)
    if not where:
        return APIError(400, f"the body must be a JSON object ({best['msg']})")
    if best["type"] == "extra_forbidden":
        return APIError(400, f"{where}: unknown field (not supported by this server)", param=where)
    return APIError(400, f"{where}: {best['msg']}", param=where)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (a declared larger ``Content-Length`` was already refused
    by :class:`_GuardMiddleware`; this catches chunked bodies)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model: type[BaseModel], body: bytes, *, json_string: bool = False) -> BaseModel:
    """``body`` as ``model``; ``json_string``: the body may also be a JSON string holding the object
    (FlagAI's client posts ``json=json.dumps(config)`` and its server ran ``json.loads`` on the
    parsed body)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the body is not UTF-8 (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise APIError(400, "the body is empty; send a JSON object")
    if json_string and text.lstrip().startswith('"'):
        try:
            inner = json.loads(text)
        except ValueError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(inner, str) or not inner.strip():
            raise APIError(400, "the body's JSON string must hold a JSON object")
        text = inner
    try:
        return model.model_validate_json(text)
    except PydanticValidationError as exc:
        raise _pydantic_error(exc) from None


async def _parse_image_edit(request: Request, body: bytes) -> ImageEditRequest:
    """An :class:`ImageEditRequest` from a JSON body, or from multipart/form-data as the OpenAI
    client sends it (an ``image`` file and text fields; the file becomes base64 ``image``)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return _parse(ImageEditRequest, body)
    try:
        from starlette.formparsers import MultiPartParser
    except ImportError:  # pragma: no cover - starlette always has it
        raise APIError(415, "multipart bodies are not supported here; send JSON") from None

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=16,
                                     max_part_size=len(body) + 1).parse()
    except AssertionError:  # starlette asserts python-multipart is installed
        raise APIError(415, "multipart uploads need python-multipart: pip install 'aquilachat[image]' "
                            "(or send JSON with a base64 image)") from None
    except Exception as exc:  # noqa: BLE001 - MultiPartException and the parser's own errors
        raise APIError(400, f"the multipart body cannot be read: {exc}") from None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key == "image" and hasattr(value, "read"):
            fields["image"] = base64.b64encode(await value.read()).decode("ascii")
        elif key in ("n", "seed"):
            if not str(value).isdigit():
                raise APIError(400, f"{key} must be an integer, got {value!r}", param=key)
            fields[key] = int(value)
        else:
            fields[key] = value
    try:
        return ImageEditRequest.model_validate(fields)
    except PydanticValidationError as exc:
        raise _pydantic_error(exc) from None


async def _cancel_on_disconnect(request: Request, work) -> Any:
    """Await ``work``; cancel it (which aborts its generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError, Exception):
        await task
    raise _ClientGone()


class _EventStreamResponse(StreamingResponse):
    """Server-sent events (or plain text); ``on_close`` runs however the response ends (done,
    client gone, error)."""

    def __init__(self, stream: Stream) -> None:
        super().__init__(stream.chunks, media_type=stream.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = stream.close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


#: Bodies that a web page cannot send to another site without a CORS preflight have one of these
#: media types; ``text/plain``, the form types and no type at all need none (the Fetch standard's
#: "CORS-safelisted request-header" for Content-Type).
_JSON_MEDIA_TYPE = "application/json"


def _is_json_route(path: str) -> bool:
    """Routes whose POST bodies must be sent as ``application/json`` (``/v1/*``, FlagAI's routes)."""
    return path.startswith("/v1/") or path in _FLAGAI_PATHS


def _own_origin(scope, headers: dict[bytes, bytes]) -> str:
    """``scheme://host[:port]`` as the client addressed this server (its ``Host`` header)."""
    host = headers.get(b"host", b"").decode("latin-1").lower()
    return f"{'https' if scope.get('scheme') in ('https', 'wss') else 'http'}://{host}"


def _cross_site_error(scope, headers: dict[bytes, bytes], allowed_origins: tuple[str, ...]) -> APIError | None:
    """The boundary against other web pages (docs/serving.md, "Requests from other web pages").

    A browser sends a cross-site POST whose type is ``text/plain``, a form type or missing without
    asking the server first (no CORS preflight), so such a body must never be taken as an API call:

    - a request whose ``Origin`` header is neither this server's own origin nor in
      ``allowed_origins`` gets 403 (``Origin: null``, from sandboxed frames and files, included);
    - a POST to a JSON route (``/v1/*``, ``/func``, ``/stream_func``) whose ``Content-Type`` is not
      ``application/json`` gets 415. One exception: ``multipart/form-data`` on
      ``/v1/images/edits`` (the OpenAI client uploads images so) when the request carries an
      ``Authorization`` header, which no page can add to a cross-site request without a preflight;
    - the legacy ``POST /`` takes any type (curl's ``-d`` sends a form type), foreign origins being
      refused above.
    """
    origin = headers.get(b"origin")
    if origin is not None:
        value = origin.decode("latin-1").strip().lower().rstrip("/")
        if value != _own_origin(scope, headers) and "*" not in allowed_origins and value not in allowed_origins:
            return APIError(403, f"requests from the web origin {value!r} are refused: it is not this server's own "
                                 "origin and not in --allowed-origins", type="permission_error",
                            code="origin_not_allowed")
    path = scope.get("path", "")
    if scope.get("method") == "POST" and _is_json_route(path):
        declared = headers.get(b"content-type", b"").decode("latin-1")
        media_type = declared.partition(";")[0].strip().lower()
        if media_type == _JSON_MEDIA_TYPE:
            return None
        if media_type == "multipart/form-data" and path == "/v1/images/edits" and b"authorization" in headers:
            return None
        return APIError(415, f"{path} takes a JSON body sent with Content-Type: application/json (got "
                             f"{declared or 'no Content-Type'})", code="unsupported_media_type")
    return None


class _GuardMiddleware:
    """Pure ASGI (so streaming and disconnects pass through untouched): Bearer authentication on
    everything but ``/health``, the cross-site boundary (:func:`_cross_site_error`: 403 for a
    foreign ``Origin``, 415 for a JSON route's body sent as another type), and a 413 for a
    declared ``Content-Length`` over the limit."""

    def __init__(self, app, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        error = None
        if self._key is not None and not _is_public(scope["method"], path):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                error = APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                 type="authentication_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
        if error is None:
            error = _cross_site_error(scope, headers, self.settings.allowed_origins)
        if error is None:
            declared = headers.get(b"content-length", b"")
            limit = body_limit(path, self.settings.max_body_bytes)
            if declared.isdigit() and int(declared) > limit:
                error = APIError(413, f"the body is larger than {limit} bytes",
                                 code="body_too_large", headers={"Connection": "close"})
        if error is None:
            return await self.app(scope, receive, send)
        self.metrics.requests.labels(_endpoint(path), str(error.status)).inc()
        await _error_response(error, path, self.settings.model_name)(scope, receive, send)


_ENDPOINTS = {"/": "legacy", "/v1/chat/completions": "chat", "/v1/completions": "completions",
              "/v1/models": "models", "/health": "health", "/metrics": "metrics", "/func": "flagai",
              "/stream_func": "flagai_stream", "/openapi.json": "openapi", "/docs": "docs",
              "/v1/images/generations": "image_generations", "/v1/images/edits": "image_edits"}

#: The request body models, for ``components.schemas`` of the OpenAPI description.
_REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, LegacyRequest, FlagAIRequest, FlagAIStreamRequest,
                   ImageGenerationRequest, ImageEditRequest)
#: Error responses every generating route may give.
_ERRORS = {400: "Bad request (the field is named in param)", 401: "Missing or invalid API key",
           404: "Unknown model", 413: "Body too large", 429: "Server busy (Retry-After)",
           500: "Generation failed", 503: "Model loading or failed to load (Retry-After)"}


def _body(model: type[BaseModel], *, json_string: bool = False) -> dict:
    """``openapi_extra`` declaring ``model`` as the JSON request body (or a JSON string holding it)."""
    schema: dict = {"$ref": f"#/components/schemas/{model.__name__}"}
    if json_string:
        schema = {"oneOf": [schema, {"type": "string", "contentMediaType": "application/json",
                                     "description": f"A {model.__name__} serialized as a JSON string (FlagAI's client)"}]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _responses(ok: type[BaseModel] | None, error: type[BaseModel], *, stream: str | None = None,
               codes: tuple[int, ...] = tuple(_ERRORS)) -> dict:
    """FastAPI ``responses``: ``ok`` (JSON, or ``stream`` media type too) and the error shape."""
    out: dict = {code: {"model": error, "description": _ERRORS[code]} for code in codes}
    success: dict = {"description": "The answer"}
    if ok is not None:
        success["model"] = ok
    if stream is not None:
        success["content"] = {stream: {"schema": {"type": "string"}}}
    out[200] = success
    return out


def _endpoint(path: str) -> str:
    return _ENDPOINTS.get(path, "other")


def create_app(loader: Callable[[], Any], settings: ServerSettings, *,
               on_load_error: Callable[[BaseException], None] | None = None,
               text2image: ImageBackend | None = None, image_edit: ImageBackend | None = None) -> FastAPI:
    """The server application.

    Args:
        loader: returns the :class:`~aquilachat.llm.LLM` whose engine, tokenizer and template
            are served; called once, in a background thread, when the app starts (``/health`` is
            503 until it returns).
        settings: see :class:`ServerSettings`.
        on_load_error: called (in the loader thread) if ``loader`` raises; the server then keeps
            answering 503 with the error on ``/health``.
        text2image, image_edit: the image backends of ``/v1/images/*`` and of instructions
            (:mod:`aquilachat.images`; ``--image-model`` / ``--image-edit-model`` / ``--image-url``).
    """
    state = _State()
    store = ImageStore(image_store_dir())
    state.images = ImageServing(text2image, image_edit, store=store, run_instructions=settings.run_instructions)
    metrics = ServerMetrics(state)

    def load(loop: asyncio.AbstractEventLoop) -> None:
        try:
            started = time.monotonic()
            llm = loader()
            state.memory_plan = llm.memory_plan.as_dict()
            engine = AsyncEngine(llm.engine, llm.tokenizer, loop, max_waiting=settings.max_waiting,
                                 observer=metrics)
            state.async_engine = engine
            state.serving = Serving(engine, tokenizer=llm.tokenizer, template=llm.template,
                                    model_name=settings.model_name, log_prompts=settings.log_prompts,
                                    grammar=getattr(llm, "grammar_backend", None))
            log.info("model %s loaded in %.1f s (max_num_seqs %d, context %d tokens)", settings.model_name,
                     time.monotonic() - started, llm.engine.max_num_seqs, llm.engine.max_model_len)
        except BaseException as exc:  # noqa: BLE001 - reported on /health and to the caller
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, args=(asyncio.get_running_loop(),), name="aquilachat-loader",
                         daemon=True).start()
        yield
        if state.async_engine is not None:
            state.async_engine.shutdown()
        state.images.shutdown()
        shutil.rmtree(store.directory, ignore_errors=True)

    from .. import __version__
    app = FastAPI(title="aquilachat", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json",
                  description="AquilaChat-family chat models: the original AquilaChat API (POST /), FlagAI's Aquila "
                              "server API (POST /func, /stream_func) and an OpenAI-compatible API (/v1/*).")

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in _REQUEST_MODELS],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.aquilachat = state
    app.state.metrics = metrics
    app.add_middleware(_GuardMiddleware, settings=settings, metrics=metrics)
    if settings.allowed_origins:
        # outside the guard: a preflight (OPTIONS, no Authorization) is answered here; the guard
        # still refuses foreign origins on every real request
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    def serving_or_503() -> Serving:
        if state.serving is not None:
            return state.serving
        if state.load_error is not None:
            raise APIError(503, f"the model failed to load: {state.load_error}", type="service_unavailable",
                           code="model_load_failed")
        raise APIError(503, "the model is loading; retry later", type="service_unavailable",
                       code="model_loading", headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})

    async def handle(request: Request, endpoint: str, model: type[BaseModel] | None, call, *,
                     needs_model: bool = True, parse: Callable | None = None) -> Response:
        path = request.url.path
        own_shape = path in _LEGACY_PATHS or path in _FLAGAI_PATHS  # their bodies leave out unset fields
        req = None
        try:
            serving = serving_or_503() if needs_model else None
            if model is None:
                result = call(serving, None)
            else:
                body = await _read_body(request, body_limit(path, settings.max_body_bytes))
                req = (await parse(request, body) if parse is not None
                       else _parse(model, body, json_string=path in _FLAGAI_PATHS))
                result = await _cancel_on_disconnect(request, call(serving, req))
            if isinstance(result, Stream):
                response: Response = _EventStreamResponse(result)
            else:
                response = JSONResponse(result.model_dump(mode="json", exclude_none=own_shape))
        except APIError as exc:
            response = _error_response(exc, path, settings.model_name, len(getattr(req, "prompt", "") or ""))
        except _ClientGone:
            response = Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except Exception:  # noqa: BLE001 - the server keeps serving
            log.exception("internal error in %s", endpoint)
            response = _error_response(APIError(500, "internal server error; see the server log",
                                                type="internal_error", code="internal_error"), path, settings.model_name)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.post("/", openapi_extra=_body(LegacyRequest), responses=_responses(LegacyResponse, LegacyResponse))
    async def legacy_generate(request: Request) -> Response:
        """The original AquilaChat API: the prompt (after history) answered in the chat template.
        Errors have the same shape, with status and error."""
        return await handle(request, "legacy", LegacyRequest, lambda s, r: s.legacy(r))

    @app.post("/func", openapi_extra=_body(FlagAIRequest, json_string=True),
              responses=_responses(FlagAIResponse, FlagAIResponse, codes=(400, 401, 413, 429, 503)))
    async def flagai_func(request: Request) -> Response:
        """FlagAI's Aquila server API: one answer with its tokens and log-probabilities. Errors have
        the same shape with no completions, status and error (a failed generation: 422)."""
        return await handle(request, "flagai", FlagAIRequest, lambda s, r: s.flagai(r))

    @app.post("/stream_func", openapi_extra=_body(FlagAIStreamRequest, json_string=True),
              responses=_responses(None, FlagAIResponse, stream="text/plain", codes=(400, 401, 413, 429, 503)))
    async def flagai_stream_func(request: Request) -> Response:
        """FlagAI's Aquila server API: the answer streamed as plain text. Errors as /func."""
        return await handle(request, "flagai_stream", FlagAIStreamRequest, lambda s, r: s.flagai(r, stream=True))

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest),
              responses=_responses(ChatCompletionResponse, ErrorResponse, stream="text/event-stream"))
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions: the conversation answered in the model's chat template
        (server-sent events with stream)."""
        return await handle(request, "chat", ChatCompletionRequest, lambda s, r: state.images.chat(s, r))

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest),
              responses=_responses(CompletionResponse, ErrorResponse, stream="text/event-stream"))
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) completions: raw text continued, with echo and logprobs for scoring."""
        return await handle(request, "completions", CompletionRequest, lambda s, r: s.completion(r))

    @app.post("/v1/images/generations", openapi_extra=_body(ImageGenerationRequest),
              responses=_responses(ImagesResponse, ErrorResponse, codes=(400, 401, 413, 429)))
    async def image_generations(request: Request) -> Response:
        """OpenAI images: pictures drawn from a prompt by the server's text-to-image backend."""
        return await handle(request, "image_generations", ImageGenerationRequest, needs_model=False,
                            call=lambda s, r: state.images.generations(r, str(request.base_url)))

    @app.post("/v1/images/edits", openapi_extra=_body(ImageEditRequest),
              responses=_responses(ImagesResponse, ErrorResponse, codes=(400, 401, 413, 429)))
    async def image_edits(request: Request) -> Response:
        """OpenAI images: an image edited by the prompt's steps (one per line, in order); JSON with
        a base64 image, or multipart/form-data as the OpenAI client uploads it."""
        return await handle(request, "image_edits", ImageEditRequest, needs_model=False, parse=_parse_image_edit,
                            call=lambda s, r: state.images.edits(r, str(request.base_url)))

    @app.get("/images/{name}", responses={200: {"description": "A PNG kept for response_format url",
                                                "content": {"image/png": {}}}, 404: {"model": ErrorResponse}})
    async def image_file(name: str) -> Response:
        """An image made with ``response_format: "url"`` (the newest ones are kept)."""
        path = store.path(name)
        if path is None:
            raise StarletteHTTPException(404)
        return FileResponse(path, media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        """The chat page (docs/serving.md, "The chat page")."""
        return page_response()

    @app.get("/v1/models", responses=_responses(ModelList, ErrorResponse, codes=(401, 503)))
    async def models(request: Request) -> Response:
        """The served model."""
        return await handle(request, "models", None, lambda s, r: s.models())

    @app.get("/health", responses={200: {"description": "Loaded: {\"status\": \"ok\", \"memory\": the memory plan}"},
                                   503: {"description": "Loading, or the model failed to load"}})
    async def health() -> Response:
        """Whether the model is loaded (no API key needed)."""
        if state.serving is not None:
            return JSONResponse({"status": "ok", "memory": state.memory_plan})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503,
                            headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})

    @app.get("/metrics", responses={200: {"description": "Prometheus text format",
                                          "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics_route() -> Response:
        """Prometheus metrics."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        metrics.requests.labels(_endpoint(request.url.path), str(exc.status_code)).inc()
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {message}",
                                        type="not_found_error" if exc.status_code == 404 else "invalid_request_error",
                                        headers=dict(exc.headers or {})), "")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return _error_response(APIError(500, "internal server error; see the server log",
                                        type="internal_error", code="internal_error"), request.url.path,
                               settings.model_name)

    return app
