"""``aquilachat serve --replicas N``: the engine as Ray Serve replicas behind the same API.

Default suite (no Ray needed): a missing Ray is one line naming the extra; serving without
``--replicas`` imports no Ray; the replicas' metrics merge into one exposition with a ``replica``
label (oracle: the values each replica's registry holds).

Slow, with Ray Serve installed (``pip install 'aquilachat[ray]'``), on a local Ray with 2 CPUs and
the bundled aquila-tiny: the openai client, ``POST /`` and streaming through 2 replicas give the
single-process server's greedy answers; 16 concurrent clients reach both replicas; ``kill -9`` of
one replica mid-stream ends its requests cleanly and quickly while the others finish, and the
replica comes back. The fault test prints its timeline (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aquilachat.cli import main
from aquilachat.server.replicas import RAY_INSTALL_HINT, merge_replica_metrics
from tests.server_utils import RunningServer, free_port, openai_client, serve

REPO = Path(__file__).resolve().parents[1]
MODEL = "aquila-tiny"
API_KEY = "replica-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ---------------------------------------------------------------------------- without Ray
def test_replicas_without_ray_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    assert main(["serve", "--replicas", "2", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"aquilachat serve: error: {RAY_INSTALL_HINT}"
    assert "pip install 'aquilachat[ray]'" in err


def test_replica_options_are_checked(capsys):
    assert main(["serve", "--ray-address", "auto"]) == 1
    assert "--ray-address needs --replicas" in capsys.readouterr().err
    assert main(["serve", "--threads-per-replica", "2"]) == 1
    assert "--threads-per-replica needs --replicas" in capsys.readouterr().err
    assert main(["serve", "--replicas", "0"]) == 1
    assert "--replicas must be >= 1" in capsys.readouterr().err


def test_serving_without_replicas_imports_no_ray():
    code = ("import sys, asyncio\n"
            "from aquilachat.cli import build_parser\n"
            "from aquilachat.server.app import ServerSettings, create_app\n"
            "import aquilachat.commands.serve\n"
            "build_parser().parse_args(['serve'])\n"
            "create_app(lambda: None, ServerSettings(model_name='m'))\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _replica_registry(tokens: float, ttfts: list[float]) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("aquilachat_requests", "unused in replicas", ["endpoint", "status"], registry=registry)
    Counter("aquilachat_generation_tokens", "tokens", registry=registry).inc(tokens)
    hist = Histogram("aquilachat_time_to_first_token_seconds", "ttft", buckets=(0.1, 1.0), registry=registry)
    for t in ttfts:
        hist.observe(t)
    return registry


def test_replica_metrics_merge_with_a_replica_label():
    snapshot = {"r1": ({"node": "10.0.0.1", "pid": "11"}, list(_replica_registry(5, [0.05, 0.5]).collect())),
                "r2": ({"node": "10.0.0.2", "pid": "22"}, list(_replica_registry(7, [2.0]).collect()))}

    class Merged:
        def collect(self):
            return merge_replica_metrics(snapshot, {"RUNNING": 2, "STARTING": 1})

    registry = CollectorRegistry()
    registry.register(Merged())
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # one family per name (a valid exposition), every sample labelled with its replica
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    assert "aquilachat_requests" not in families  # no samples in replicas: the server's own counter owns the name
    tokens = {s.labels["replica"]: s.value for s in families["aquilachat_generation_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens == {"r1": 5, "r2": 7}
    counts = {(s.labels["replica"], s.labels.get("le")): s.value
              for s in families["aquilachat_time_to_first_token_seconds"].samples if s.name.endswith("_bucket")}
    assert counts[("r1", "0.1")] == 1 and counts[("r1", "1.0")] == 2 and counts[("r2", "1.0")] == 0
    assert counts[("r2", "+Inf")] == 1
    info = {s.labels["replica"]: (s.labels["node"], s.labels["pid"]) for s in families["aquilachat_replica_info"].samples}
    assert info == {"r1": ("10.0.0.1", "11"), "r2": ("10.0.0.2", "22")}
    assert {s.labels["state"]: s.value for s in families["aquilachat_replicas"].samples} == {"RUNNING": 2, "STARTING": 1}


# ---------------------------------------------------------------------------- with Ray (slow)
def _require_ray() -> None:
    """Skip without Ray Serve; import it the way the server does (its router settings first)."""
    from aquilachat.errors import ConfigError
    from aquilachat.server.replicas import require_ray
    try:
        require_ray()
    except ConfigError:
        pytest.skip("Ray Serve is not installed (pip install 'aquilachat[ray]')")


def _ray_init() -> dict:
    """A small local Ray: two CPUs, a 200 MB object store."""
    return {"num_cpus": 2, "object_store_memory": 200 * 2**20}


@pytest.mark.slow
def test_a_missing_model_path_stops_the_replicas_with_the_node_named(tmp_path):
    _require_ray()
    from aquilachat.errors import ConfigError
    from aquilachat.server.app import ServerSettings
    from aquilachat.server.replicas import ReplicaConfig, connect, deploy
    missing = tmp_path / "not-on-this-node"
    connect(None, **_ray_init())
    config = ReplicaConfig(model=str(missing), threads=1, settings=ServerSettings(model_name="m"))
    with pytest.raises(ConfigError) as exc:
        deploy(config, 1, max_num_seqs=2)  # stops the local Ray when it fails
    message = str(exc.value)
    assert "\n" not in message and str(missing) in message and "on node" in message and "every node" in message


@pytest.fixture(scope="module")
def replicas():
    """2 replicas of aquila-tiny on a local Ray, behind the app with an API key."""
    _require_ray()
    from aquilachat.server.app import ServerSettings, create_app
    from aquilachat.server.replicas import ReplicaConfig, connect, deploy
    settings = ServerSettings(model_name=MODEL, api_key=API_KEY)
    connect(None, **_ray_init())
    serving = deploy(ReplicaConfig(model=MODEL, threads=1, settings=settings,
                                   llm_kwargs={"device": "cpu", "max_num_seqs": 8}), 2, max_num_seqs=8)
    running = RunningServer(create_app(lambda: serving, settings, remote=True)).start()
    try:
        running.wait_healthy(timeout=60)
        yield running
    finally:
        running.stop()  # the app's shutdown removes the replicas and stops Ray


@pytest.fixture(scope="module")
def single():
    """The single-process server of the same model: the oracle."""
    from aquilachat.llm import LLM
    from aquilachat.server.app import ServerSettings
    with serve(lambda: LLM(MODEL, device="cpu", max_num_seqs=8), ServerSettings(model_name=MODEL)) as s:
        yield s


def _client(server):
    client = openai_client(server, timeout=120)
    client.api_key = API_KEY
    return client


def _metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _requests_per_replica(url: str) -> dict[str, float]:
    family = _metrics(url).get("aquilachat_replica_requests")
    out: dict[str, float] = {}
    for s in family.samples if family else ():
        if s.name.endswith("_total"):
            out[s.labels["replica"]] = out.get(s.labels["replica"], 0) + s.value
    return out


def _generated_per_replica(url: str) -> dict[str, float]:
    family = _metrics(url)["aquilachat_generation_tokens"]
    return {s.labels["replica"]: s.value for s in family.samples if s.name.endswith("_total")}


def _settled(url: str, read, timeout: float = 60) -> dict[str, float]:
    """``read(url)`` once two reads a push-and-poll apart agree (the replicas' metrics lag ~2 s)."""
    from aquilachat.server.replicas import METRICS_PUSH_S, STATUS_POLL_S
    deadline = time.monotonic() + timeout
    last = read(url)
    while True:
        time.sleep(METRICS_PUSH_S + STATUS_POLL_S + 0.5)
        now = read(url)
        if now == last or time.monotonic() > deadline:
            return now
        last = now


@pytest.mark.slow
def test_answers_through_replicas_equal_the_single_process_server(replicas, single):
    ours, oracle = _client(replicas), openai_client(single, timeout=120)
    for messages in ([{"role": "user", "content": "你好"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a river?"}]):
        got = ours.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
        want = oracle.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
        assert got.choices[0].message.content == want.choices[0].message.content
        # (cached_tokens may differ: each replica has its own prefix cache)
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                          want.usage.completion_tokens)
        # streamed: the deltas add up to the same answer
        chunks = ours.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    got = ours.completions.create(model=MODEL, prompt="The river", temperature=0, max_tokens=16, logprobs=2)
    want = oracle.completions.create(model=MODEL, prompt="The river", temperature=0, max_tokens=16, logprobs=2)
    assert got.choices[0].text == want.choices[0].text
    assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
    # n answers of one request, seeded: the same n answers
    got = ours.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3, seed=7,
                                       max_tokens=12)
    want = oracle.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3, seed=7,
                                          max_tokens=12)
    assert [c.message.content for c in got.choices] == [c.message.content for c in want.choices]
    # the original API
    body = {"prompt": "用golang实现冒泡排序算法", "temperature": 0, "max_new_tokens": 24}
    got = httpx.post(replicas.url + "/", json=body, headers=AUTH, timeout=60)
    want = httpx.post(single.url + "/", json=body, timeout=60)
    assert got.status_code == 200 and got.json()["response"] == want.json()["response"]


@pytest.mark.slow
def test_auth_limits_health_and_errors_through_replicas(replicas):
    url = replicas.url
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    health = httpx.get(url + "/health", timeout=10)  # no key needed
    assert health.status_code == 200 and health.json()["replicas"]["RUNNING"] == 2
    r = httpx.post(url + "/v1/completions", content=b"x" * (2 << 20),
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    # errors raised in a replica come back in the route's shape
    r = httpx.post(url + "/v1/completions", json={"model": "other", "prompt": "x"}, headers=AUTH, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(url + "/", json={"prompt": "x" * 100000, "max_new_tokens": 8}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["status"] == 400 and "prompt" in r.json()["error"]
    r = httpx.post(url + "/func", json={"prompt": "你好", "max_new_tokens": 4, "temperature": 0}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 200 and 1 <= len(r.json()["completions"][0]["tokens"]) <= 4
    with httpx.stream("POST", url + "/stream_func", json={"prompt": "你好", "max_new_tokens": 8}, headers=AUTH,
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        r.read()
    models = httpx.get(url + "/v1/models", headers=AUTH, timeout=10).json()
    assert models["data"][0]["id"] == MODEL
    # a client that leaves mid-stream: the replica aborts its generation (else all 500 tokens come)
    before = sum(_settled(url, _generated_per_replica).values())
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        next(r.iter_lines())
    generated = sum(_settled(url, _generated_per_replica).values()) - before
    assert 1 <= generated < 500


@pytest.mark.slow
def test_sixteen_concurrent_clients_reach_both_replicas(replicas):
    before = _settled(replicas.url, _requests_per_replica)

    async def one(client, i):
        r = await client.post(replicas.url + "/v1/completions", headers=AUTH, json={
            "model": MODEL, "prompt": f"Client {i}: the river", "max_tokens": 32, "ignore_eos": True,
            "temperature": 0})
        return r.status_code

    async def all_clients():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=20)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    assert asyncio.run(all_clients()) == [200] * 16
    after = _settled(replicas.url, _requests_per_replica)
    served = {rid: after[rid] - before.get(rid, 0) for rid in after}
    print(f"\n16 concurrent clients, requests per replica: {served}")
    assert sum(served.values()) == 16
    assert len([n for n in served.values() if n > 0]) == 2


@pytest.mark.slow
def test_kill_9_of_a_replica_mid_stream(replicas):
    """The fault test: its timeline is printed (``pytest -s``)."""
    url = replicas.url
    pids = {s.labels["replica"]: int(s.labels["pid"]) for s in _metrics(url)["aquilachat_replica_info"].samples}
    assert len(pids) == 2
    victim_id, victim_pid = sorted(pids.items())[0]
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def note(what: str) -> None:
        events.append((time.monotonic() - t0, what))

    streams, unary = 8, 4
    seen: list[dict] = []  # the replicas' states on /health, each change once

    async def stream(client, i, first_token: asyncio.Event, counter: list):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 400,
                "ignore_eos": True, "temperature": 0, "stream": True}
        text, error, done = [], None, False
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            async for line in lines:
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    note(f"stream {i}: error event {error['code']}")
                    continue
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    if not text:
                        counter.append(i)
                        if len(counter) == streams:
                            first_token.set()
                    text.append(event["choices"][0]["delta"]["content"])
        return {"kind": "stream", "i": i, "done": done, "error": error, "ended": time.monotonic() - t0}

    async def unary_call(client, i):
        r = await client.post(url + "/v1/completions", headers=AUTH, json={
            "model": MODEL, "prompt": f"Unary {i}", "max_tokens": 400, "ignore_eos": True, "temperature": 0})
        if r.status_code != 200:
            note(f"unary {i}: HTTP {r.status_code} {r.json()['error']['code']}")
        return {"kind": "unary", "i": i, "status": r.status_code, "body": r.json(), "ended": time.monotonic() - t0}

    async def watch_health(client, stop: asyncio.Event):
        """Note every change of the replicas' states on /health (when Ray Serve saw the death,
        when the replacement was running)."""
        while not stop.is_set():
            replicas = (await client.get(url + "/health")).json().get("replicas")
            if not seen or replicas != seen[-1]:
                note(f"/health replicas: {replicas}")
                seen.append(replicas)
            await asyncio.sleep(0.1)

    async def scenario():
        first_token, counter, stop = asyncio.Event(), [], asyncio.Event()
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as c:
            watcher = asyncio.ensure_future(watch_health(c, stop))
            tasks = [asyncio.ensure_future(stream(c, i, first_token, counter)) for i in range(streams)]
            tasks += [asyncio.ensure_future(unary_call(c, i)) for i in range(unary)]
            await asyncio.wait_for(first_token.wait(), 60)
            await asyncio.sleep(0.2)
            os.kill(victim_pid, signal.SIGKILL)
            note(f"kill -9 replica {victim_id} (pid {victim_pid})")
            health = await c.get(url + "/health")
            note(f"/health right after the kill: {health.status_code}")
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)  # never a hang
            note("every request in flight has ended")
            # new requests, now that the router has seen the death: all answered by the live replica
            fresh = [await c.post(url + "/v1/completions", headers=AUTH, json={
                "model": MODEL, "prompt": f"After {i}", "max_tokens": 8, "temperature": 0}) for i in range(4)]
            note(f"4 new requests: {[r.status_code for r in fresh]}")
            deadline = time.monotonic() + 180  # Ray Serve restarts the replica
            while time.monotonic() < deadline and not (len(seen) > 1 and seen[-1].get("RUNNING") == 2):
                await asyncio.sleep(0.25)
            stop.set()
            await watcher
            return results, health, fresh

    results, health, fresh = asyncio.run(scenario())
    kill_at = next(t for t, what in events if what.startswith("kill"))
    failed = [r for r in results if (r["kind"] == "stream" and r["error"]) or (r["kind"] == "unary" and r["status"] != 200)]
    survived = [r for r in results if r not in failed]
    # the affected requests end cleanly: an error event (stream) or a JSON 503 (unary), soon after the kill
    for r in failed:
        if r["kind"] == "stream":
            assert r["error"]["code"] == "replica_died" and not r["done"]
        else:
            assert r["status"] == 503 and r["body"]["error"]["code"] == "replica_died"
        assert r["ended"] - kill_at < 30
    for r in survived:
        assert (r["kind"] == "stream" and r["done"]) or (r["kind"] == "unary" and r["status"] == 200)
        if r["kind"] == "unary":
            assert r["body"]["usage"]["completion_tokens"] == 400
    assert failed and survived
    assert health.status_code == 200  # one replica is still running
    assert [r.status_code for r in fresh] == [200] * 4
    # Ray Serve saw the death and restarted the replica (scenario() waited for it)
    assert any(states.get("RUNNING", 0) < 2 for states in seen) and seen[-1] == {"RUNNING": 2}, seen
    deadline = time.monotonic() + 30
    while True:  # its metrics arrive with its first push
        now = {s.labels["replica"]: int(s.labels["pid"]) for s in _metrics(url)["aquilachat_replica_info"].samples}
        if len(now) == 2 and victim_id not in now:
            break
        assert time.monotonic() < deadline, f"the new replica does not report metrics: {now}"
        time.sleep(0.25)
    new_pid = next(pid for rid, pid in now.items() if rid not in pids)
    assert new_pid != victim_pid
    r = httpx.post(url + "/", json={"prompt": "你好", "max_new_tokens": 8}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == 200
    note("a later request: 200")
    first_error = min((r["ended"] for r in failed), default=None)
    print("\nfault timeline (seconds from the start of the scenario):")
    for t, what in sorted(events):
        print(f"  {t:7.2f}  {what}")
    print(f"  affected: {len(failed)} of {len(results)} requests, ended {first_error - kill_at:.2f}-"
          f"{max(r['ended'] for r in failed) - kill_at:.2f} s after the kill; {len(survived)} completed "
          f"(last at +{max(r['ended'] for r in survived) - kill_at:.2f} s); new replica pid {new_pid}")
