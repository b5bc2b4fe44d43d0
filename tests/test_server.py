"""The server against a real uvicorn on 127.0.0.1 with a tiny random model.

Oracles: the offline :class:`aquilachat.LLM` on the same checkpoint (same template, same seeds),
and the same request sent alone.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import httpx
import openai
import pytest

from aquilachat.llm import LLM
from aquilachat.sampling import SamplingParams
from aquilachat.server.app import ServerSettings
from aquilachat.sampling_params import MAX_STOP, PARAMS
from aquilachat.server.limits import MAX_BODY_BYTES, MAX_MESSAGES, MAX_N, MAX_TOKENS_LIMIT
from aquilachat.server.protocol import ChatCompletionRequest, CompletionRequest, LegacyRequest
from tests.helpers import bad_sampling_values, make_tiny_model
from tests.server_utils import metric, openai_client, serve, sse_events

MODEL = "tiny"
#: Context window of the test model: room for long generations in the disconnect tests.
CONTEXT = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("server_model")
    make_tiny_model(out, byte_tokenizer_dir, max_position_embeddings=CONTEXT)
    return out


@pytest.fixture(scope="module")
def oracle(model_dir) -> LLM:
    return LLM(model_dir, device="cpu", max_num_seqs=4)


@pytest.fixture(scope="module")
def server(model_dir):
    with serve(lambda: LLM(model_dir, device="cpu", max_num_seqs=16), ServerSettings(model_name=MODEL)) as s:
        yield s


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai_client(server, timeout=60)


def wait_idle(url: str, timeout: float = 15.0) -> float:
    """Poll /metrics until no sequence is running or waiting; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if metric(url, "aquilachat_running_sequences") == 0 and metric(url, "aquilachat_waiting_sequences") == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError("sequences still running after the client left")


# ---------------------------------------------------------------------------- the openai client
def test_chat_matches_offline_llm(client, oracle):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，世界"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=24))[0]
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(oracle.encode_chat(messages))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_matches_offline_llm(client, oracle):
    messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32,
                                            stream=True, stream_options={"include_usage": True})
    parts, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            parts += [c.delta.content] if c.delta.content else []
            finish = c.finish_reason or finish
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0]
    assert roles == ["assistant"]
    assert "".join(parts) == want.text
    assert finish == want.finish_reason
    assert usage.completion_tokens == len(want.token_ids)


def test_completions_and_models(client, oracle):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=20, temperature=0)
    want = oracle.generate("The quick brown", SamplingParams(temperature=0, max_tokens=20))[0]
    assert r.object == "text_completion"
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    # streamed, and a batch of prompts (choice index = prompt index * n + answer index)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=20, temperature=0, stream=True) if c.choices)
    assert text == want.text
    r = client.completions.create(model=MODEL, prompt=["hello", "你好"], max_tokens=8, temperature=0)
    wants = oracle.generate(["hello", "你好"], SamplingParams(temperature=0, max_tokens=8))
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [w.text for w in wants]


def test_n2_and_seed_reproducibility(client, oracle):
    params = SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=1234)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=16, n=2, seed=1234, temperature=1.0)
    want = oracle.generate("hello", params)[0]
    got = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert got == [o.text for o in want.outputs]
    assert got[0] != got[1]  # answer i uses seed + i
    messages = [{"role": "user", "content": "pick a word"}]
    runs = [client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=99,
                                           max_tokens=16, n=2) for _ in range(2)]
    texts = [[c.message.content for c in sorted(r.choices, key=lambda c: c.index)] for r in runs]
    assert texts[0] == texts[1]
    want = oracle.chat(messages, SamplingParams(temperature=1.0, seed=99, max_tokens=16, n=2))[0]
    assert texts[0] == [o.text for o in want.outputs]


def test_stop_strings(client, oracle):
    base = oracle.generate("def bubble_sort", SamplingParams(temperature=0, max_tokens=30))[0].text
    stop = base[10:12]
    assert stop.strip(), "the tiny model's text should have a usable stop string"
    r = client.completions.create(model=MODEL, prompt="def bubble_sort", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == base[:base.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="def bubble_sort", max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == base[:base.index(stop)]


# ---------------------------------------------------------------------------- the original API
def test_legacy_endpoint(server, oracle):
    prompt = "用golang实现冒泡排序算法"
    r = httpx.post(server.url + "/", json={"prompt": prompt, "temperature": 0, "max_new_tokens": 32}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "status", "time"} and body["status"] == 200
    datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    want = oracle.chat([{"role": "user", "content": prompt}], SamplingParams(temperature=0, max_tokens=32))[0].text
    assert body["response"] == want.removeprefix(" ")
    history = [["hi", "hello"], ["how are you", "fine"]]
    r = httpx.post(server.url + "/", json={"prompt": prompt, "history": history, "temperature": 0,
                                           "max_new_tokens": 16, "seed": 1, "top_p": 0.5, "top_k": 5}, timeout=60)
    messages = [{"role": role, "content": text} for pair in history
                for role, text in zip(("user", "assistant"), pair)] + [{"role": "user", "content": prompt}]
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0].text
    assert r.status_code == 200 and r.json()["response"] == want.removeprefix(" ")
    # sampled with a seed: reproducible
    bodies = [httpx.post(server.url + "/", json={"prompt": prompt, "seed": 5, "max_new_tokens": 12}, timeout=60).json()
              for _ in range(2)]
    assert bodies[0]["response"] == bodies[1]["response"]
    # an error has the same shape
    r = httpx.post(server.url + "/", json={"prompt": ""}, timeout=10)
    assert r.status_code == 400
    body = r.json()
    assert body["status"] == 400 and body["response"] == "" and "prompt" in body["error"]
    datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------- concurrency
async def _stream_chat(client: httpx.AsyncClient, url: str, content: str, max_tokens: int) -> tuple[str, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    parts, finish = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            for event in sse_events([line]):
                if event == "[DONE]":
                    return "".join(parts), finish
                for c in event["choices"]:
                    parts.append(c["delta"].get("content") or "")
                    finish = c["finish_reason"] or finish
    raise AssertionError("the stream ended without [DONE]")


def test_16_concurrent_streams_equal_alone(server, oracle):
    prompts = [f"Question {i}: " + "why is the sky blue? " * (i % 5) + "你好" * (i % 3) for i in range(16)]
    lengths = [8 + 3 * (i % 6) for i in range(16)]  # sequences leave the batch at different steps

    async def alone():
        async with httpx.AsyncClient(timeout=60) as c:
            return [await _stream_chat(c, server.url, p, n) for p, n in zip(prompts, lengths)]

    async def together():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as c:
            return await asyncio.gather(*(_stream_chat(c, server.url, p, n) for p, n in zip(prompts, lengths)))

    engine = server.state.async_engine.engine
    solo = asyncio.run(alone())
    steps_before, tokens_before = engine.stats.steps, engine.stats.generated_tokens
    concurrent = asyncio.run(together())
    steps, tokens = engine.stats.steps - steps_before, engine.stats.generated_tokens - tokens_before
    assert concurrent == solo
    assert steps < tokens / 3, f"{tokens} tokens in {steps} steps: the requests were not batched"
    want = oracle.chat([{"role": "user", "content": prompts[3]}], SamplingParams(temperature=0, max_tokens=lengths[3]))[0]
    assert solo[3] == (want.text, want.finish_reason)


def test_disconnected_stream_frees_its_slot(server):
    engine = server.state.async_engine.engine
    before = engine.stats.generated_tokens
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": CONTEXT - 32, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body) as r:
            events = sse_events(r.iter_lines())
            for _ in range(3):
                assert next(events)["choices"]
            assert metric(server.url, "aquilachat_running_sequences") == 1
    wait_idle(server.url)
    assert engine.stats.generated_tokens - before < CONTEXT - 100, "generation went on after the client left"


def test_disconnected_non_streamed_request_is_aborted(server, monkeypatch):
    engine = server.state.async_engine.engine
    # each step made to take at least 2 ms, so the full answer (~1000 steps) outlasts the client's
    # 0.5 s read timeout however fast the CPU backend decodes this tiny model
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda *a, **k: (time.sleep(0.002), step(*a, **k))[1])
    before = engine.stats.generated_tokens
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": CONTEXT - 32, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_idle(server.url)
    assert engine.stats.generated_tokens - before < CONTEXT - 100, "generation went on after the client left"


def test_full_queue_gets_429(model_dir):
    settings = ServerSettings(model_name=MODEL, max_waiting=1)
    with serve(lambda: LLM(model_dir, device="cpu", max_num_seqs=1), settings) as s, httpx.Client(timeout=30) as c:
        body = {"model": MODEL, "prompt": "x", "max_tokens": CONTEXT - 32, "ignore_eos": True, "stream": True}
        with c.stream("POST", s.url + "/v1/completions", json=body) as r1, \
                c.stream("POST", s.url + "/v1/completions", json=body) as r2:
            assert r1.status_code == 200 and r2.status_code == 200  # one running, one waiting
            r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=10)
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            assert metric(s.url, "aquilachat_waiting_sequences") == 1
        wait_idle(s.url)
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200
        assert 'aquilachat_requests_total{endpoint="completions",status="429"} 1.0' in c.get(s.url + "/metrics").text


# ---------------------------------------------------------------------------- bad input
def _bad_inputs():
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    comp = {"model": MODEL, "prompt": "hi"}
    return [
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
        ("/v1/chat/completions", b'\xff\xfe{"a": 1}', 400, None),
        ("/v1/chat/completions", b"", 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", {**chat, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}, 400, "messages"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        ("/v1/chat/completions", {**chat, "temperature": "0.5"}, 400, "temperature"),
        ("/v1/chat/completions", {**chat, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {**chat, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {**chat, "n": True}, 400, "n"),
        ("/v1/chat/completions", {**chat, "n": MAX_N + 1}, 400, "n"),
        ("/v1/chat/completions", {**chat, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {**chat, "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens"),
        ("/v1/chat/completions", {**chat, "max_tokens": CONTEXT}, 400, "max_tokens"),  # prompt + max_tokens > window
        ("/v1/chat/completions", {**chat, "seed": -1}, 400, "seed"),
        ("/v1/chat/completions", {**chat, "stop": ""}, 400, "stop"),
        ("/v1/chat/completions", {**chat, "stop": ["a"] * 17}, 400, "stop"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"1": 101}}, 400, "logit_bias"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"99999": 1}}, 400, "logit_bias"),  # outside the vocabulary
        ("/v1/chat/completions", {**chat, "logit_bias": {"one": 1}}, 400, "logit_bias"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, 400, "top_logprobs"),  # needs logprobs: true
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "logprobs": 1}, 400, "logprobs"),
        ("/v1/chat/completions", {**chat, "min_tokens": 9, "max_tokens": 8}, 400, "min_tokens"),
        ("/v1/chat/completions", {**chat, "min_p": 1.5}, 400, "min_p"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "yaml"}}, 400, "response_format"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema"}}, 400, "response_format"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
         400, "response_format"),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ("/v1/chat/completions", {**chat, "user": 5}, 400, "user"),
        ("/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/chat/completions", {**chat, "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {**comp, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {**comp, "prompt": []}, 400, "prompt"),
        ("/v1/completions", {**comp, "prompt": [10**9]}, 400, "prompt"),
        ("/v1/completions", {**comp, "prompt": 5}, 400, "prompt"),
        ("/v1/completions", {**comp, "echo": "yes"}, 400, "echo"),
        ("/v1/completions", {**comp, "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {**comp, "logprobs": True}, 400, "logprobs"),
        ("/v1/completions", {**comp, "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {**comp, "frequency_penalty": 3}, 400, "frequency_penalty"),
        ("/v1/completions", {**comp, "model": "nope"}, 404, "model"),
        ("/", {"prompt": ""}, 400, "prompt"),
        ("/", {}, 400, "prompt"),
        ("/", {"prompt": "hi", "history": [["only one"]]}, 400, "history"),
        ("/", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
        ("/", {"prompt": "hi", "sft": True}, 400, "sft"),
        ("/", b"not json", 400, None),
    ]


@pytest.mark.parametrize("path,body,status,param", _bad_inputs())
def test_bad_input_gets_4xx_json(server, path, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    if path == "/":
        assert body["status"] == status and body["response"] == ""
        message = body["error"]
    else:
        message = body["error"]["message"]
        if param is not None:
            assert body["error"]["param"] is not None and body["error"]["param"].startswith(param), body
    assert message
    if param is not None:
        assert param.split(".")[0] in message


#: Each route's base body, its request model, its names for SamplingParams fields it renames, and
#: values outside SamplingParams' range that it takes (max_tokens 0 on completions: echo scores the prompt).
_ROUTES = [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
     ChatCompletionRequest, {"max_tokens": ["max_tokens", "max_completion_tokens"]}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi"}, CompletionRequest, {}, {"max_tokens": [0]}),
    ("/", {"prompt": "hi"}, LegacyRequest, {"max_tokens": ["max_new_tokens"]}, {}),
]


@pytest.mark.parametrize("name", list(PARAMS))
def test_400_names_each_sampling_field(server, name):
    """Every SamplingParams field, on every route, with every value its range refuses: a 400 that
    names the request's field, as a range or type error where the route takes the field and as an
    unknown field where it does not."""
    for path, base, model, renames, takes in _ROUTES:
        for field in renames.get(name, [name]):
            for value in bad_sampling_values(name):
                if value in takes.get(field, []):
                    continue
                r = httpx.post(server.url + path, json={**base, field: value}, timeout=30)
                assert r.status_code == 400, (path, field, value, r.text)
                error = r.json()["error"]
                message = error if path == "/" else error["message"]
                assert message.startswith(field) and field in message, (path, field, value, message)
                assert ("unknown field" in message) == (field not in model.model_fields), message
                if path != "/":
                    assert error["param"].split(".")[0] == field, error


def test_each_prompt_is_validated_once(server, monkeypatch):
    engine = server.state.async_engine.engine
    real, calls = engine.check_request, []
    monkeypatch.setattr(engine, "check_request", lambda ids, *a, **k: calls.append(ids) or real(ids, *a, **k))
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [[5, 6], [7]], "n": 2,
                                                         "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    assert calls == [[5, 6], [7]]  # not once more per answer


def test_the_server_takes_the_offline_ranges(client, oracle):
    """Values inside SamplingParams' ranges that the server once refused (temperature above
    OpenAI's 2, a repetition penalty above 10) give what LLM gives; 16 stop strings of the
    caller's are taken on chat besides the template's own."""
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=6, temperature=5.0, seed=3,
                                  extra_body={"repetition_penalty": 20.0})
    want = oracle.generate("hi", SamplingParams(temperature=5.0, seed=3, max_tokens=6, repetition_penalty=20.0))[0]
    assert r.choices[0].text == want.text
    messages = [{"role": "user", "content": "hello"}]
    stops = [f"zz{i}" for i in range(MAX_STOP)]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stop=stops)
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=8, stop=stops))[0]
    assert r.choices[0].message.content == want.text


def test_body_limit_and_routes(server):
    big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    json_type = {"content-type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=big, headers=json_type, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536
    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers=json_type, timeout=30)
    assert r.status_code == 413
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------------- failures
def test_internal_errors_are_json_500_and_the_server_keeps_serving(server, client, oracle, monkeypatch):
    serving, engine = server.state.serving, server.state.async_engine.engine
    messages = [{"role": "user", "content": "hello"}]
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=8))[0].text

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(serving, "encode_chat", broken)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    assert "boom" not in r.text
    r = httpx.post(server.url + "/", json={"prompt": "hello"}, timeout=30)
    assert r.status_code == 500 and r.json()["status"] == 500
    monkeypatch.undo()

    real_step = engine.step
    calls = []

    def step_once_broken():
        calls.append(1)
        if len(calls) == 2:  # fail mid-generation
            raise RuntimeError("engine boom")
        return real_step()
    monkeypatch.setattr(engine, "step", step_once_broken)
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": messages, "max_tokens": 8, "ignore_eos": True}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    assert r.choices[0].message.content == want
    wait_idle(server.url)


def test_health_and_loading(model_dir):
    import threading
    gate = threading.Event()

    def slow_loader():
        assert gate.wait(30)
        return LLM(model_dir, device="cpu", max_num_seqs=2)

    with serve(slow_loader, ServerSettings(model_name=MODEL), wait=False) as s:
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading" and "retry-after" in r.headers
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and "retry-after" in r.headers
        r = httpx.post(s.url + "/", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 503 and r.json()["status"] == 503
        assert metric(s.url, "aquilachat_model_loaded") == 0
        gate.set()
        s.wait_healthy()
        assert metric(s.url, "aquilachat_model_loaded") == 1
        assert httpx.get(s.url + "/v1/models", timeout=10).json()["data"][0]["id"] == MODEL

    def failing_loader():
        raise FileNotFoundError("no weights here")

    with serve(failing_loader, ServerSettings(model_name=MODEL), wait=False) as s:
        deadline = time.monotonic() + 10
        while (r := httpx.get(s.url + "/health", timeout=10)).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 503 and "no weights here" in r.json()["error"]


def test_api_key(model_dir):
    settings = ServerSettings(model_name=MODEL, api_key="sekrit")
    with serve(lambda: LLM(model_dir, device="cpu", max_num_seqs=2), settings) as s:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer sekrit"}, timeout=10).status_code == 200
        r = httpx.post(s.url + "/", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 401 and r.json()["status"] == 401
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0, timeout=30)
        assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            max_tokens=4).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_prompts_are_not_logged(server, caplog):
    secret = "zebra-sapphire-4417"
    caplog.set_level(logging.DEBUG)
    body = {"model": MODEL, "messages": [{"role": "user", "content": secret}], "max_tokens": 4}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    assert httpx.post(server.url + "/", json={"prompt": secret, "max_new_tokens": 4}, timeout=30).status_code == 200
    assert httpx.post(server.url + "/v1/chat/completions", json={**body, "n": "x"}, timeout=30).status_code == 400
    assert "prompt tokens" in caplog.text  # the request was logged, without its text
    assert secret not in caplog.text
    server.state.serving.log_prompts = True  # the positive control: --log-prompts
    try:
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    finally:
        server.state.serving.log_prompts = False
    assert secret in caplog.text


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                   temperature=0, stream=True).close()
    client.completions.create(model=MODEL, prompt="x", max_tokens=5)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("aquilachat_requests_total", "aquilachat_prompt_tokens_total", "aquilachat_generation_tokens_total",
                 "aquilachat_time_to_first_token_seconds_bucket", "aquilachat_inter_token_latency_seconds_bucket",
                 "aquilachat_running_sequences", "aquilachat_waiting_sequences", "aquilachat_sampling_errors_total"):
        assert name in text, name
    assert metric(server.url, "aquilachat_generation_tokens_total") >= 5
    assert metric(server.url, "aquilachat_time_to_first_token_seconds_count") >= 1
    assert 'aquilachat_requests_total{endpoint="completions",status="200"}' in text
