"""A model whose logits go non-finite for some prompts: a JSON error for those, service as usual for the rest.

The embedding row of one byte token ("@") is NaN, so any prompt containing "@" gives NaN logits
(the engine's sampling reports an error for that row), while prompts without it are unaffected.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from aquilachat.checkpoint import save_hf
from aquilachat.llm import LLM
from aquilachat.sampling import SamplingParams
from aquilachat.server.app import ServerSettings
from aquilachat.tokenizer import Tokenizer
from tests.helpers import make_tiny_model
from tests.server_utils import metric, serve, sse_events

MODEL = "nan-model"
POISON = "@"


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("nan_model")
    model = make_tiny_model(out, byte_tokenizer_dir, max_position_embeddings=512)
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    (poison_id,) = tok.encode(POISON)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison_id] = float("nan")
    save_hf(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def oracle(nan_model_dir) -> LLM:
    return LLM(nan_model_dir, device="cpu", max_num_seqs=2)


@pytest.fixture(scope="module")
def server(nan_model_dir):
    # two slots: the poisoned sequence's slot is reused by the next requests
    with serve(lambda: LLM(nan_model_dir, device="cpu", max_num_seqs=2), ServerSettings(model_name=MODEL)) as s:
        yield s


def _chat(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 12, **extra}


def test_the_poisoned_prompt_fails_offline_and_leaves_no_nan_behind(oracle, nan_model_dir):
    """Engine regression: a sequence that failed on NaN must not poison the next occupant of its
    cache slot (masked attention over stale NaN values is still NaN: 0 * NaN)."""
    params = SamplingParams(temperature=0, max_tokens=8)
    out = oracle.generate([POISON * 200], params)[0]
    assert out.finish_reason == "error" and "NaN" in out.error
    short, long = "hello", "the sky and the sea " * 15
    want = LLM(nan_model_dir, device="cpu", max_num_seqs=1).generate([short], params)[0]
    outs = oracle.generate([long, short], params)  # the short prompt gets the poisoned slot
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert outs[1].text == want.text


def test_non_finite_logits_give_a_json_error_and_the_next_request_succeeds(server, oracle):
    errors_before = metric(server.url, "aquilachat_sampling_errors_total")
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat("long question " + POISON * 60), timeout=30)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "model_error" and "NaN" in error["message"]
    r = httpx.post(server.url + "/", json={"prompt": POISON * 60, "temperature": 0}, timeout=30)
    assert r.status_code == 500 and r.json()["status"] == 500 and "NaN" in r.json()["error"]
    assert metric(server.url, "aquilachat_sampling_errors_total") == errors_before + 2

    # Both cache slots held NaN keys/values. The next requests succeed, including a short one
    # batched with a longer one, whose attention spans positions its slot's NaN occupant wrote.
    short, long = "hi", "tell me a long story about " + "the sky and the sea " * 8

    async def pair():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(c.post(server.url + "/v1/chat/completions", json=_chat(long)),
                                        c.post(server.url + "/v1/chat/completions", json=_chat(short)))
    for r, content in zip(asyncio.run(pair()), (long, short)):
        assert r.status_code == 200, r.text
        want = oracle.chat([{"role": "user", "content": content}], SamplingParams(temperature=0, max_tokens=12))[0]
        assert r.json()["choices"][0]["message"]["content"] == want.text


def test_a_stream_that_hits_non_finite_logits_ends_with_an_error_event(server, oracle):
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=_chat(POISON, stream=True)) as r:
            assert r.status_code == 200
            events = list(sse_events(r.iter_lines()))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["error"]["type"] == "model_error"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match="NaN"):
        for _ in client.chat.completions.create(**_chat(POISON, stream=True)):
            pass
    # a healthy stream at the same time as a failing one is unaffected
    ok = _chat("hello there")

    async def both():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(c.post(server.url + "/v1/chat/completions", json=_chat(POISON)),
                                        c.post(server.url + "/v1/chat/completions", json=ok))
    bad, good = asyncio.run(both())
    assert bad.status_code == 500 and good.status_code == 200
    want = oracle.chat(ok["messages"], SamplingParams(temperature=0, max_tokens=12))[0]
    assert good.json()["choices"][0]["message"]["content"] == want.text


def test_flagai_routes_answer_a_failed_generation_without_a_500(server):
    """FlagAI's own server answered 500 when sampling met NaN (the original's known failure); its
    routes here answer in FlagAI's shape, never 500, and keep serving."""
    import json
    r = httpx.post(server.url + "/func", json=json.dumps({"prompt": POISON * 60, "sft": True}), timeout=30)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["completions"] == [] and body["status"] == 422 and "NaN" in body["error"]
    assert body["model_info"] == MODEL and body["input_length"] == 60
    r = httpx.post(server.url + "/stream_func", json=json.dumps({"prompt": POISON * 60}), timeout=30)
    assert r.status_code == 200 and r.text == ""  # plain text has no room for an error: the stream ends
    r = httpx.post(server.url + "/func", json=json.dumps({"prompt": "hello", "temperature": 0, "max_new_tokens": 4}),
                   timeout=30)
    assert r.status_code == 200 and len(r.json()["completions"]) == 1
