"""The fields real clients send (issue 17), through the official ``openai`` client where it has
the field and raw HTTP otherwise, against a real uvicorn on 127.0.0.1 with a tiny random model.

Oracles: log-probabilities against the model's own full forward pass (teacher forcing: the
prompt and the returned tokens fed at once, ``log_softmax`` at each position, fp32); answers
against the offline :class:`~aquilachat.LLM` with the same parameters; JSON answers against
``jsonschema``; FlagAI's API against FlagAI's server code (``aquila_server.py``: field names,
defaults, the reply's shape) with a body posted exactly as FlagAI's ``post_request.py`` posts it.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from aquilachat.llm import LLM
from aquilachat.sampling_params import SamplingParams
from aquilachat.server.app import ServerSettings
from tests.helpers import make_tiny_model
from tests.server_utils import metric, openai_client, serve

MODEL = "tiny"
#: Log-probabilities from the engine (KV cache, batched) against the full forward pass.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("api_model")
    make_tiny_model(out, byte_tokenizer_dir, max_position_embeddings=512)
    return out


@pytest.fixture(scope="module")
def oracle(model_dir) -> LLM:
    return LLM(model_dir, device="cpu", max_num_seqs=4, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def server(model_dir):
    with serve(lambda: LLM(model_dir, device="cpu", max_num_seqs=8), ServerSettings(model_name=MODEL)) as s:
        yield s


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai_client(server)


def forward_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]``: row ``t`` is the log-distribution of the token after ``ids[:t + 1]``."""
    with torch.inference_mode():
        logits = llm.model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LOGPROB_ATOL


# ---------------------------------------------------------------------------- logprobs
def test_chat_logprobs_and_top_logprobs(client, oracle):
    messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.8, seed=3, max_tokens=12,
                                       logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    want = oracle.chat(messages, SamplingParams(temperature=0.8, seed=3, max_tokens=12, logprobs=3))[0]
    content = choice.logprobs.content
    assert choice.message.content == want.text and len(content) == len(want.token_ids)
    prompt = oracle.encode_chat(messages)
    full = forward_logprobs(oracle, prompt + want.token_ids)
    for t, (entry, tid) in enumerate(zip(content, want.token_ids)):
        row = full[len(prompt) - 1 + t]
        # the model's distribution, not the temperature-0.8 one the token was drawn from
        assert _close(entry.logprob, float(row[tid]))
        assert bytes(entry.bytes) == oracle.tokenizer.token_bytes(tid)
        assert len(entry.top_logprobs) == 3
        values, ids = row.topk(3)
        assert [bytes(e.bytes) for e in entry.top_logprobs] == [oracle.tokenizer.token_bytes(int(i)) for i in ids]
        assert all(_close(e.logprob, float(v)) for e, v in zip(entry.top_logprobs, values))
    # logprobs without top_logprobs: no alternatives; without logprobs: none at all
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert r.choices[0].logprobs is None


def test_streamed_logprobs_add_up_to_the_whole_answer(client):
    messages = [{"role": "user", "content": "你好，世界"}]
    kwargs = dict(model=MODEL, messages=messages, temperature=0, max_tokens=20, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0]
    streamed, text = [], ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                streamed += c.logprobs.content
    assert text == whole.message.content
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in whole.logprobs.content]


def test_completion_echo_scores_the_prompt_in_one_prefill(client, oracle):
    """lm-evaluation-harness's request: echo, logprobs, max_tokens 0 -> the prompt's tokens with
    their log-probabilities (the first null), no answer."""
    prompt = "The quick brown fox jumps over the lazy dog. 你好"
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=0, temperature=0)
    choice = r.choices[0]
    ids = oracle.tokenizer.encode(prompt)
    full = forward_logprobs(oracle, ids)
    lp = choice.logprobs
    assert choice.text == prompt and len(lp.tokens) == len(ids) and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert _close(lp.token_logprobs[t], float(full[t - 1, ids[t]]))
        top = lp.top_logprobs[t]
        assert lp.tokens[t] in top and len(top) <= 3  # the 2 most likely, plus the token itself
        best = float(full[t - 1].max())
        assert _close(max(top.values()), best)
    assert lp.text_offset == [sum(len(tok) for tok in lp.tokens[:i]) for i in range(len(ids))]
    # token ids as the prompt (lm-eval sends them), several prompts, an answer after the echo
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:5]], echo=True, logprobs=0, max_tokens=3,
                                  temperature=0)
    first, second = sorted(r.choices, key=lambda c: c.index)
    want = oracle.generate([prompt], SamplingParams(temperature=0, max_tokens=3))[0]
    assert first.text == oracle.tokenizer.decode(ids) + want.text
    assert len(first.logprobs.tokens) == len(ids) + 3 and len(second.logprobs.tokens) == 5 + 3
    answer = forward_logprobs(oracle, ids + want.token_ids)
    for t, tid in enumerate(want.token_ids):
        assert _close(first.logprobs.token_logprobs[len(ids) + t], float(answer[len(ids) - 1 + t, tid]))
    # echo without logprobs: the prompt's text before the answer
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=3, temperature=0)
    assert r.choices[0].text == prompt + want.text and r.choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [10, 0])
def test_streamed_completion_logprobs_equal_the_whole(client, max_tokens):
    kwargs = dict(model=MODEL, prompt="def bubble_sort(a):", echo=True, logprobs=1, max_tokens=max_tokens,
                  temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    text, tokens, values, offsets = "", [], [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.text and (max_tokens or text == "def bubble_sort(a):")
    assert (tokens, values, offsets) == (whole.logprobs.tokens, whole.logprobs.token_logprobs,
                                         whole.logprobs.text_offset)


# ---------------------------------------------------------------------------- response_format
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}


def test_response_format_json_schema_and_json_object(client):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    messages = [{"role": "user", "content": "Give me a person as JSON."}]
    # strict: no properties beyond the schema's; without strict this schema must say so itself
    # (else a random model may write extra property names forever)
    for strict, schema in ((True, SCHEMA), (False, {**SCHEMA, "additionalProperties": False})):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=120,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "person", "schema": schema, "strict": strict}})
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, schema)
        assert r.choices[0].finish_reason == "stop" and set(value) <= {"name", "age"}
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=120,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="JSON:", temperature=0, max_tokens=120,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "p", "schema": SCHEMA, "strict": True}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    # text: no constraint
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5,
                                       response_format={"type": "text"})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_its_path(client):
    pytest.importorskip("xgrammar")
    bad = {"type": "object", "properties": {"tags": {"type": "array", "items": {"not": {"type": "string"}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    error = info.value.body
    assert error["param"] == "response_format"
    assert error["message"].startswith("response_format.json_schema.schema.properties.tags.items.not:")
    uncompilable = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 1}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": uncompilable}})
    assert info.value.body["message"].startswith("response_format.json_schema.schema.properties.n:")


# ---------------------------------------------------------------------------- the other fields
def test_fields_clients_send_by_default(client, oracle):
    """stream_options.include_usage (chat and completions), max_completion_tokens, user."""
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=5,
                                       user="user-1234")
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=3,
                                       max_tokens=9)
    assert r.usage.completion_tokens == 3  # the newer name wins
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    want = oracle.generate(["hello"], SamplingParams(temperature=0, max_tokens=4))[0]
    assert "".join(c.choices[0].text for c in chunks[:-1] if c.choices) == want.text


def test_logit_bias(client, oracle):
    """OpenAI: the bias is added to the logit; +100 all but forces a token, -100 bans it."""
    forced = oracle.tokenizer.encode(" fox")[0]
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                                  logit_bias={str(forced): 100})
    text = oracle.tokenizer.decode([forced])
    assert r.choices[0].text == text * 5
    plain = oracle.generate(["hello"], SamplingParams(temperature=0, max_tokens=5))[0].token_ids
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                                  logit_bias={str(plain[0]): -100})
    want = oracle.generate(["hello"], SamplingParams(temperature=0, max_tokens=5, logit_bias={plain[0]: -100}))[0]
    assert r.choices[0].text == want.text and want.token_ids[0] != plain[0]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logit_bias={str(forced): 100})
    assert r.choices[0].message.content == text * 3


def test_min_tokens_and_min_p(client, oracle):
    eos = oracle.tokenizer.eos_token_id
    # +100 on the end-of-answer token ends every answer at once, unless min_tokens holds it back
    bias = {str(eos): 100}
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=10, temperature=0, logit_bias=bias)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=10, temperature=0, logit_bias=bias,
                                  extra_body={"min_tokens": 4})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=8, min_p=0.2)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=1.0, seed=11,
                                  extra_body={"min_p": 0.2})
    assert r.choices[0].text == oracle.generate(["hello"], params)[0].text


# ---------------------------------------------------------------------------- prefix caching
def test_prefix_cache_counters_and_cached_tokens(server, client):
    messages = [{"role": "system", "content": "A long shared system prompt. " * 8},
                {"role": "user", "content": "first question"}]
    queries, hits = (metric(server.url, f"aquilachat_prefix_cache_{k}_total") for k in ("queries", "hits"))
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    messages[-1]["content"] = "second question"
    second = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= 64
    new_queries = metric(server.url, "aquilachat_prefix_cache_queries_total")
    new_hits = metric(server.url, "aquilachat_prefix_cache_hits_total")
    assert new_queries - queries == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert new_hits - hits == (first.usage.prompt_tokens_details.cached_tokens
                               + second.usage.prompt_tokens_details.cached_tokens)


# ---------------------------------------------------------------------------- FlagAI's API
def test_flagai_func_as_flagais_client_posts_it(server, oracle):
    """FlagAI's post_request.py: ``requests.post(url, json=json.dumps(raw_request))``: the body is
    a JSON string holding the config. Defaults are FlagAI's (top_p 0.95, top_k 1000, temperature
    0.9, seed 1234, 256 new tokens); sft answers in the chat template."""
    prompt = "pytorch介绍"
    raw_request = {"prompt": prompt, "top_k_per_token": 100, "sft": True, "max_new_tokens": 24}
    r = httpx.post(server.url + "/func", json=json.dumps(raw_request), timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"completions", "input_length", "model_info"}
    assert body["input_length"] == len(prompt) and body["model_info"] == MODEL
    (completion,) = body["completions"]
    assert set(completion) == {"text", "tokens", "logprobs", "top_logprobs_dicts", "model_in"}
    ids = oracle.encode_chat([{"role": "user", "content": prompt}])
    assert completion["model_in"] == oracle.tokenizer.decode(ids)
    want = oracle.chat([{"role": "user", "content": prompt}], SamplingParams(
        temperature=0.9, top_p=0.95, top_k=100, seed=1234, max_tokens=24))[0]
    assert completion["text"] == want.text.removeprefix(" ")
    # tokens: the vocabulary strings of the answer's tokens; logprobs: the model's, per token
    n = len(completion["tokens"])
    assert n == len(completion["logprobs"]) == len(completion["top_logprobs_dicts"]) > 0
    token_ids = [oracle.tokenizer.token_to_id(t) for t in completion["tokens"]]
    start = want.token_ids.index(token_ids[0])
    assert want.token_ids[start:start + n] == token_ids
    full = forward_logprobs(oracle, ids + want.token_ids)
    for k, (tid, value) in enumerate(zip(token_ids, completion["logprobs"])):
        assert _close(value, float(full[len(ids) - 1 + start + k, tid]))
    assert completion["top_logprobs_dicts"] == [{t: v} for t, v in zip(completion["tokens"], completion["logprobs"])]
    assert oracle.tokenizer.decode(token_ids) == completion["text"] or \
        oracle.tokenizer.decode(token_ids).startswith(completion["text"])
    # a JSON object body works too; sft false (FlagAI's default) completes raw text after BOS
    r = httpx.post(server.url + "/func", json={"prompt": "The quick\n\n\nbrown", "temperature": 0,
                                               "max_new_tokens": 8}, timeout=60)
    bos = oracle.tokenizer.bos_token_id
    raw = [bos] + oracle.tokenizer.encode("The quick\nbrown")
    assert r.json()["completions"][0]["model_in"] == oracle.tokenizer.decode(raw)
    want = oracle.generate([""], SamplingParams(temperature=0, max_tokens=8), prompt_token_ids=[raw])[0]
    assert r.json()["completions"][0]["text"] == want.text.removeprefix(" ")


def test_flagai_history_and_stream_func(server, oracle):
    history = [["USER", "hi"], ["ASSISTANT", "hello"], ["USER", "how are you"], ["ASSISTANT", "fine"]]
    config = {"prompt": "再见", "history": history, "sft": True, "temperature": 0, "max_new_tokens": 16}
    body = httpx.post(server.url + "/func", json=json.dumps(config), timeout=60).json()
    messages = [{"role": "assistant" if role == "ASSISTANT" else "user", "content": text} for role, text in history]
    messages.append({"role": "user", "content": "再见"})
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0]
    assert body["completions"][0]["text"] == want.text.removeprefix(" ")
    # /stream_func: plain text, always in the template (FlagAI's stream kept the leading space)
    with httpx.stream("POST", server.url + "/stream_func", json=json.dumps(config), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = "".join(r.iter_text())
    assert text == want.text


@pytest.mark.parametrize("body,param", [
    (json.dumps({"prompt": ""}), "prompt"),
    (json.dumps({"top_k_per_token": 5}), "prompt"),
    (json.dumps({"prompt": "x", "temperature": "hot"}), "temperature"),
    (json.dumps({"prompt": "x", "history": [["USER"]]}), "history"),
    (json.dumps({"prompt": "x", "sft": True, "history": [["ASSISTANT", "a"], ["ASSISTANT", "b"], ["USER", "c"]]}),
     "history"),
    (json.dumps([1, 2]), None),
    (json.dumps("not json"), None),
    ({"prompt": "x", "seed": -1}, "seed"),
])
def test_flagai_errors_keep_the_reply_shape(server, body, param):
    for path in ("/func", "/stream_func"):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400, (path, r.text)
        reply = r.json()
        assert reply["completions"] == [] and reply["status"] == 400 and reply["model_info"] == MODEL
        if param is not None:
            assert param in reply["error"], reply


# ---------------------------------------------------------------------------- OpenAPI
def test_openapi_describes_every_route_and_body(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    routes = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert routes >= {("/", "post"), ("/func", "post"), ("/stream_func", "post"), ("/v1/chat/completions", "post"),
                      ("/v1/completions", "post"), ("/v1/models", "get"), ("/health", "get"), ("/metrics", "get")}
    app_routes = {(r.path, m.lower()) for r in server.app.routes if hasattr(r, "methods") and r.include_in_schema
                  for m in r.methods if m != "HEAD"}
    assert app_routes <= routes
    components = spec["components"]["schemas"]

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(spec):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in components, ref
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                        ("/", "LegacyRequest"), ("/func", "FlagAIRequest"), ("/stream_func", "FlagAIStreamRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert model in json.dumps(body)
    chat = components["ChatCompletionRequest"]["properties"]
    for field in ("logprobs", "top_logprobs", "response_format", "logit_bias", "min_tokens", "min_p",
                  "max_completion_tokens", "user", "stream_options"):
        assert field in chat, field
    assert {"echo", "logprobs", "max_tokens"} <= set(components["CompletionRequest"]["properties"])
    assert components["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 0
    docs = httpx.get(server.url + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


def test_openapi_and_docs_need_no_api_key(model_dir):
    with serve(lambda: LLM(model_dir, device="cpu", max_num_seqs=2),
               ServerSettings(model_name=MODEL, api_key="secret")) as s:
        assert httpx.get(s.url + "/openapi.json", timeout=10).status_code == 200
        assert httpx.get(s.url + "/docs", timeout=10).status_code == 200
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        r = httpx.post(s.url + "/func", json=json.dumps({"prompt": "x"}), timeout=10)
        assert r.status_code == 401 and r.json()["completions"] == [] and r.json()["status"] == 401
