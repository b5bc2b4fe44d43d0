"""Replicas of the engine on Ray Serve: ``aquilachat serve --replicas N [--ray-address auto]``.

One ``aquilachat serve`` process keeps the HTTP side, the same FastAPI app as a single-process
server (:func:`~aquilachat.server.app.create_app`): authentication, body limits, parsing, error
shapes, ``/health``, ``/metrics``. What runs the model is a Ray Serve deployment of N replicas,
each one a whole single-process engine (:func:`~aquilachat.server.app.engine_serving`: an
:class:`~aquilachat.llm.LLM`, its :class:`~aquilachat.server.async_engine.AsyncEngine` thread and
:class:`~aquilachat.server.serving.Serving`), on any node of the Ray cluster::

    client ─HTTP─► create_app routes ─► ReplicaServing ─DeploymentHandle─► EngineReplica × N
                   (this process)        (Ray Serve's router)              (Ray actors, any node)

* **Routing.** Each request is one call through a Ray Serve ``DeploymentHandle``, so Ray Serve's
  own router picks the replica: the default power-of-two-choices router sends it to the one of
  two sampled replicas with fewer requests in flight (least loaded), asked on every request
  (:data:`ROUTER_ENV`). A request is never split, so all ``n`` answers of a request come from
  one replica.
* **Limits.** A replica takes up to ``max_num_seqs + max_waiting`` requests at once
  (``max_ongoing_requests``) and applies the single server's queue limit itself (429). When every
  replica is full, up to ``max_waiting`` more requests wait in the router (``max_queued_requests``);
  beyond that: 429 with ``Retry-After``.
* **Faults.** Ray Serve restarts a replica whose process dies. A request in flight on it ends
  with a JSON 503 (``code: replica_died``) or, when its answer was already streaming, with an
  error event (``data: {"error": ...}``; FlagAI's plain-text ``/stream_func`` just ends, as a
  failed generation does there). It is not retried: its answer may have been partly sent. The
  router drops a dead replica at its first failed call, so new requests go to the live ones.
  While no replica is running, requests get 503 at once instead of waiting.
* **Health and metrics.** ``/health`` is 200 while at least one replica is running (Ray Serve's
  replica states, polled every :data:`STATUS_POLL_S`). ``/metrics`` gives every engine metric of
  a single server once per replica, labelled ``replica="<Ray Serve replica id>"`` (not summed: a
  Prometheus ``sum without (replica)`` does that), plus ``aquilachat_replica_requests_total``,
  ``aquilachat_replica_info{replica,node,pid}`` and ``aquilachat_replicas{state}``; the request
  counter ``aquilachat_requests_total`` is this process's. Replicas push their metrics to a
  :class:`MetricsBoard` actor every :data:`METRICS_PUSH_S`, so figures lag by up to that.
* **Model files.** Every replica loads ``--model`` on its own node: the path must exist on every
  node. A replica that cannot load it fails to start with a message naming the node, and the
  command stops with that message.

Ray is imported only here and only when ``--replicas`` is given (the ``ray`` extra:
``pip install 'aquilachat[ray]'``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from ..errors import AquilaChatError, ConfigError
from .app import ServerSettings, engine_serving
from .limits import LOADING_RETRY_AFTER_S, QUEUE_FULL_RETRY_AFTER_S
from .serving import APIError, Stream, _sse

__all__ = ["ReplicaConfig", "EngineReplica", "ReplicaServing", "MetricsBoard", "connect", "deploy", "require_ray",
           "merge_replica_metrics", "ReplicaStartError", "RAY_INSTALL_HINT", "APP_NAME", "DEPLOYMENT_NAME"]

log = logging.getLogger("aquilachat.server")

#: The one line a missing Ray prints.
RAY_INSTALL_HINT = "--replicas needs Ray Serve: pip install 'aquilachat[ray]'"
#: Ray Serve application and deployment names (``serve status`` shows them).
APP_NAME = "aquilachat"
DEPLOYMENT_NAME = "Engine"
#: Seconds between two polls of the replicas' states (``/health``) and metrics (``/metrics``).
STATUS_POLL_S = 1.0
#: Seconds between two pushes of a replica's metrics to the board.
METRICS_PUSH_S = 1.0
#: A replica whose metrics are older than this (seconds) is left out of ``/metrics`` (it died).
METRICS_STALE_S = 5.0
#: Seconds a replica has to finish its requests when the server stops.
GRACEFUL_SHUTDOWN_S = 5.0


#: Ray Serve's router keeps each replica's queue length for 10 s and, when only one of the two
#: sampled replicas has a fresh entry, sends the request there without asking the other: a burst
#: after a quiet spell all lands on one replica (seen here: 16 of 16 requests). With 0 it asks both
#: replicas on every request (one small RPC each, nothing next to a generation). Read when Ray
#: Serve is imported; an environment value set by the user wins.
ROUTER_ENV = {"RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S": "0"}


def require_ray():
    """Import Ray and Ray Serve (after setting :data:`ROUTER_ENV`); return ``(ray, serve)``.

    Raises:
        ConfigError: Ray Serve is not installed (:data:`RAY_INSTALL_HINT`).
    """
    for name, value in ROUTER_ENV.items():
        os.environ.setdefault(name, value)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError(RAY_INSTALL_HINT) from None
    return ray, serve


class ReplicaStartError(AquilaChatError):
    """A replica could not load the model on its node."""


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica loads and how it serves (the ``aquilachat serve`` options).

    Attributes:
        model: as ``LLM(model)``; a path must exist on every node.
        threads: torch threads of each replica (also the CPUs it reserves from Ray); None: the
            Ray cluster's CPUs divided among the replicas, at least 1.
        settings: the server settings (model name, queue length, prompt logging).
        llm_kwargs: the rest of ``LLM``'s keyword arguments (dtype, device, template, memory plan
            knobs, prefix caching).
    """

    model: str
    threads: int | None
    settings: ServerSettings
    llm_kwargs: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    """An :class:`APIError` on its way back from a replica (APIError itself does not pickle)."""

    status: int
    message: str
    type: str
    param: str | None
    code: str | None
    headers: dict

    @classmethod
    def of(cls, exc: APIError) -> "_Failure":
        return cls(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    def error(self) -> APIError:
        return APIError(self.status, self.message, type=self.type, param=self.param, code=self.code,
                        headers=self.headers)


@dataclass(frozen=True)
class _StreamStart:
    """First item of a streamed answer from a replica; the text chunks follow."""

    media_type: str


#: Serving methods a replica runs, by the name the ingress sends.
_METHODS = {"chat": lambda s, r: s.chat(r), "completion": lambda s, r: s.completion(r),
            "legacy": lambda s, r: s.legacy(r), "flagai": lambda s, r: s.flagai(r),
            "flagai_stream": lambda s, r: s.flagai(r, stream=True)}


class EngineReplica:
    """One replica of the Ray Serve deployment: a single server's engine and serving layer.

    Ray Serve constructs it on a node with ``threads`` free CPUs (``ray_actor_options``); it loads
    the model there with ``threads`` torch threads, then answers :meth:`call` (non-streamed) and
    :meth:`stream` (streamed) with :class:`~aquilachat.server.serving.Serving`, exactly as the
    single-process server does, and pushes its metrics to ``board`` every :data:`METRICS_PUSH_S`.

    Raises:
        ReplicaStartError: the model cannot be loaded on this node (the message names the node
            and the path); Ray Serve then retries and finally reports the deployment failed.
    """

    async def __init__(self, config: ReplicaConfig, board) -> None:  # Ray actors may have async constructors
        import ray
        import torch
        from ray import serve

        from ..llm import LLM

        torch.set_num_threads(config.threads)
        self.replica_id = serve.get_replica_context().replica_tag
        self.node = ray.util.get_node_ip_address()
        try:
            llm = await asyncio.to_thread(LLM, config.model, **config.llm_kwargs)
        except (AquilaChatError, OSError) as exc:
            raise ReplicaStartError(f"replica {self.replica_id} on node {self.node} cannot load {config.model!r}: "
                                    f"{exc} (the model must exist at the same path on every node)") from None
        self.serving, self.metrics = engine_serving(llm, config.settings, asyncio.get_running_loop())
        self.requests = Counter("aquilachat_replica_requests", "Requests served by this replica, by API",
                                ["api"], registry=self.metrics.registry)
        self.board = board
        self.info = {"node": self.node, "pid": str(os.getpid())}
        self._pusher = asyncio.create_task(self._push_metrics())
        log.info("replica %s on %s (pid %s): %s loaded, %d torch threads", self.replica_id, self.node,
                 os.getpid(), config.model, config.threads)

    async def call(self, method: str, request) -> Any:
        """A non-streamed answer: the response model, or a :class:`_Failure`."""
        self.requests.labels(method).inc()
        try:
            return await _METHODS[method](self.serving, request)
        except APIError as exc:
            return _Failure.of(exc)

    async def stream(self, method: str, request) -> AsyncIterator[Any]:
        """A streamed answer: a :class:`_Failure` alone, or a :class:`_StreamStart` then the text
        chunks. Cancelling the call (client gone) aborts the generation."""
        self.requests.labels(method).inc()
        try:
            result = await _METHODS[method](self.serving, request)
        except APIError as exc:
            yield _Failure.of(exc)
            return
        assert isinstance(result, Stream), f"{method} did not stream"
        try:
            yield _StreamStart(result.media_type)
            async for chunk in result.chunks:
                yield chunk
        finally:
            result.close()

    def models(self):
        """``GET /v1/models`` (the same on every replica)."""
        return self.serving.models()

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self.board.put.remote(self.replica_id, self.info, list(self.metrics.registry.collect()))
            except Exception as exc:  # the board is gone (the server is stopping) or busy: try again later
                log.debug("pushing metrics failed: %s", exc)
            await asyncio.sleep(METRICS_PUSH_S)

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica
        if hasattr(self, "serving"):
            self._pusher.cancel()
            self.serving.engine.shutdown(timeout=1.0)


class MetricsBoard:
    """A Ray actor holding each replica's latest metrics (replicas push, the server reads)."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, dict, list]] = {}

    def put(self, replica_id: str, info: dict, metrics: list) -> None:
        self._latest[replica_id] = (time.monotonic(), info, metrics)

    def snapshot(self) -> dict[str, tuple[dict, list]]:
        """``{replica id: (info, metrics)}`` of the replicas heard from in the last
        :data:`METRICS_STALE_S` seconds."""
        now = time.monotonic()
        return {rid: (info, metrics) for rid, (at, info, metrics) in self._latest.items()
                if now - at <= METRICS_STALE_S}


def merge_replica_metrics(snapshot: dict[str, tuple[dict, list[Metric]]],
                          states: dict[str, int] | None = None) -> list[Metric]:
    """Every replica's metric families as one family per name, each sample labelled
    ``replica=<id>``; families without samples are left out (the server's own request counter
    has the same name as the replicas' unused one). Adds ``aquilachat_replica_info`` (one sample
    per replica, labels ``node`` and ``pid``) and, with ``states`` (Ray Serve replica state ->
    count), ``aquilachat_replicas{state}``.

    Args:
        snapshot: ``{replica id: (info, metrics)}`` as :meth:`MetricsBoard.snapshot` returns.
        states: replica counts by Ray Serve state (``RUNNING``, ``STARTING``, ...).
    """
    families: dict[str, Metric] = {}
    info = GaugeMetricFamily("aquilachat_replica_info", "One per replica reporting metrics: its node and process",
                             labels=["replica", "node", "pid"])
    for rid, (meta, metrics) in sorted(snapshot.items()):
        info.add_metric([rid, meta.get("node", ""), meta.get("pid", "")], 1)
        for m in metrics:
            if not m.samples:
                continue
            family = families.get(m.name)
            if family is None:
                family = families[m.name] = Metric(m.name, m.documentation, m.type, m.unit)
            family.samples.extend(s._replace(labels={**s.labels, "replica": rid}) for s in m.samples)
    out = list(families.values()) + [info]
    if states is not None:
        gauge = GaugeMetricFamily("aquilachat_replicas", "Replicas by Ray Serve state", labels=["state"])
        for state, count in sorted(states.items()):
            gauge.add_metric([state], count)
        out.append(gauge)
    return out


class ReplicaServing:
    """The server side of the replicas: what :func:`~aquilachat.server.app.create_app` serves
    with ``remote=True`` (a :class:`~aquilachat.server.app.RemoteServing`).

    Args:
        handle: the deployment's ``DeploymentHandle`` (from ``serve.run``).
        board: the :class:`MetricsBoard` actor.
        models: the ``/v1/models`` answer (asked from a replica once).
        on_shutdown: called by :meth:`shutdown` (removes the deployment, disconnects from Ray).
    """

    def __init__(self, handle, board, models, on_shutdown=None) -> None:
        import ray
        from ray import serve
        from ray.serve.exceptions import BackPressureError
        self._serve = serve
        self._ray = ray
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._board = board
        self._models = models
        self._on_shutdown = on_shutdown
        self._replica_died = ray.exceptions.RayActorError
        self._back_pressure = BackPressureError
        self._states: dict[str, int] = {}
        self._metrics: list[Metric] = []
        self._stop = threading.Event()
        self._poll()
        self._poller = threading.Thread(target=self._poll_loop, name="aquilachat-replica-status", daemon=True)
        self._poller.start()

    # ------------------------------------------------------------------ RemoteServing
    def models(self):
        return self._models

    async def chat(self, req):
        return await (self._stream("chat", req) if req.stream else self._call("chat", req))

    async def completion(self, req):
        return await (self._stream("completion", req) if req.stream else self._call("completion", req))

    async def legacy(self, req):
        return await self._call("legacy", req)

    async def flagai(self, req, *, stream: bool = False):
        return await (self._stream("flagai_stream", req) if stream else self._call("flagai", req))

    def health(self) -> tuple[int, dict]:
        running = self._states.get("RUNNING", 0)
        body = {"status": "ok" if running else "unavailable", "replicas": dict(self._states)}
        return (200 if running else 503), body

    def collect(self) -> Iterable[Metric]:
        return self._metrics

    def shutdown(self) -> None:
        self._stop.set()
        if self._on_shutdown is not None:
            self._on_shutdown()

    # ------------------------------------------------------------------ calls
    def _check_running(self) -> None:
        if not self._states.get("RUNNING", 0):
            raise APIError(503, f"no replica is running (replicas: {self._states or 'none'}); retry later",
                           type="service_unavailable", code="no_replica",
                           headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})

    def _ray_error(self, exc: BaseException, method: str) -> APIError:
        """The API error for a failed replica call."""
        if isinstance(exc, self._replica_died):
            log.warning("%s: the replica serving it died: %s", method, str(exc).splitlines()[0])
            return APIError(503, "the replica serving this request died; retry", type="service_unavailable",
                            code="replica_died", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
        if isinstance(exc, self._back_pressure):
            return APIError(429, "every replica is busy and the queue is full; retry later", type="server_busy",
                            code="queue_full", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
        log.error("%s: replica call failed: %s", method, exc)
        return APIError(500, "internal server error; see the server log", type="internal_error", code="internal_error")

    async def _reply(self, method: str, call, first):
        """Await ``first``: the reply of the replica ``call``, or its stream's first item. A failure
        becomes its API error; if the caller is cancelled (client gone) the call is cancelled, and
        the replica aborts the generation."""
        try:
            result = await first
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:
            raise self._ray_error(exc, method) from None
        if isinstance(result, _Failure):
            raise result.error()
        return result

    async def _call(self, method: str, req):
        self._check_running()
        response = self._handle.call.remote(method, req)
        return await self._reply(method, response, response)

    async def _stream(self, method: str, req) -> Stream:
        self._check_running()
        gen = self._stream_handle.stream.remote(method, req)
        start = await self._reply(method, gen, gen.__anext__())
        return Stream(self._chunks(gen, method, start.media_type), gen.cancel, media_type=start.media_type)

    async def _chunks(self, gen, method: str, media_type: str) -> AsyncIterator[str]:
        """The replica's chunks; if the call fails mid-answer, an error event ends an event stream
        (plain text has no place for one: it just ends)."""
        try:
            async for chunk in gen:
                yield chunk
        except Exception as exc:
            error = self._ray_error(exc, method)
            if media_type == "text/event-stream":
                yield _sse(error.openai_body())

    # ------------------------------------------------------------------ replica states and metrics
    def _poll(self) -> None:
        try:
            status = self._serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
            self._states = {str(getattr(k, "value", k)): v for k, v in status.replica_states.items() if v}
        except Exception as exc:  # the controller is restarting: keep the last answer
            log.warning("reading the replicas' states failed: %s", exc)
        try:
            snapshot = self._ray.get(self._board.snapshot.remote(), timeout=STATUS_POLL_S * 5)
            self._metrics = merge_replica_metrics(snapshot, self._states)
        except Exception as exc:
            log.warning("reading the replicas' metrics failed: %s", exc)

    def _poll_loop(self) -> None:
        while not self._stop.wait(STATUS_POLL_S):
            self._poll()


def connect(ray_address: str | None = None, **ray_init) -> None:
    """Start a local Ray (``ray_address`` None) or join a cluster (``"auto"``: the one this node
    joined with ``ray start``; ``HEAD:PORT``), and start Ray Serve without its HTTP proxy (HTTP is
    this process's). Call it from the main thread (Ray's driver state is set up there; a Serve
    started from another thread did not shut down cleanly). ``ray_init``: extra ``ray.init``
    keyword arguments (tests: ``num_cpus``, ``object_store_memory``).

    Raises:
        ConfigError: Ray is not installed.
    """
    ray, serve = require_ray()
    if not ray.is_initialized():
        if ray_address is None:
            ray_init.setdefault("include_dashboard", False)
        ray.init(address=ray_address, namespace=APP_NAME, **ray_init)
    serve.start(proxy_location="Disabled")


def deploy(config: ReplicaConfig, num_replicas: int, *, max_num_seqs: int, local: bool = True) -> ReplicaServing:
    """Deploy ``num_replicas`` replicas on the Ray cluster of :func:`connect` and wait until all
    are running; return the :class:`ReplicaServing` that routes to them (its ``shutdown`` removes
    them, and stops Ray too when ``local``: a Ray that :func:`connect` started here).

    Args:
        config: what every replica loads.
        num_replicas: replicas to run (>= 1).
        max_num_seqs: the engine's slots per replica (with ``settings.max_waiting``, a replica's
            ``max_ongoing_requests``).
        local: Ray was started by this process (``connect(None)``).

    Raises:
        ConfigError: the cluster has fewer CPUs than the replicas ask for; a replica could not
            load the model (the replica's message, naming its node).
    """
    ray, serve = require_ray()
    if num_replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {num_replicas}")
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if config.threads is None:
        config = dataclasses.replace(config, threads=max(1, cpus // num_replicas))
    if num_replicas * config.threads > cpus:
        raise ConfigError(f"{num_replicas} replicas x {config.threads} threads need {num_replicas * config.threads} "
                          f"CPUs; the Ray cluster has {cpus} (lower --threads-per-replica or --replicas, or add nodes)")
    board = ray.remote(num_cpus=0)(MetricsBoard).remote()
    capacity = max_num_seqs + config.settings.max_waiting
    deployment = serve.deployment(
        EngineReplica, name=DEPLOYMENT_NAME, num_replicas=num_replicas, max_ongoing_requests=capacity,
        max_queued_requests=max(config.settings.max_waiting, 1), ray_actor_options={"num_cpus": config.threads},
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S, max_constructor_retry_count=num_replicas)

    def stop() -> None:
        try:
            serve.shutdown() if local else serve.delete(APP_NAME)  # a cluster we joined keeps running
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("removing the replicas failed: %s", exc)
        if local:
            ray.shutdown()

    started = time.monotonic()
    try:
        handle = serve.run(deployment.bind(config, board), name=APP_NAME, route_prefix=None,
                           logging_config={"enable_access_log": False})
    except RuntimeError as exc:
        try:  # the replicas' own error is in the deployment's status, not in serve.run's
            detail = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
        except Exception:  # noqa: BLE001 - fall back to serve.run's message
            detail = ""
        stop()
        raise ConfigError(_start_failure(f"{exc}\n{detail}")) from None
    models = handle.models.remote().result()
    log.info("%d replicas of %s running after %.1f s", num_replicas, config.model, time.monotonic() - started)
    return ReplicaServing(handle, board, models, on_shutdown=stop)


def _start_failure(message: str) -> str:
    """One line from Ray Serve's deployment failure: the replica's own message if it has one."""
    marker = f"{ReplicaStartError.__name__}: "
    for line in message.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"the replicas failed to start: {lines[-1] if lines else message}"
