"""The boundary against other web pages: content types and origins (docs/serving.md).

A browser sends a cross-site POST with ``Content-Type: text/plain``, a form type or no type with
no CORS preflight. The oracle that such a request did nothing: the engine's prompt-token counter
(``/metrics``) does not move, besides the status and the route's own error shape.
"""

from __future__ import annotations

import json

import httpx
import pytest
import requests

from aquilachat.llm import LLM
from aquilachat.server.app import ServerSettings
from tests.helpers import make_tiny_model
from tests.server_utils import metric, serve

MODEL = "tiny"
ALLOWED = "https://app.example.com"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
#: Each JSON route, a body it takes, and how its errors look.
JSON_ROUTES = [("/v1/chat/completions", CHAT, "openai"),
               ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}, "openai"),
               ("/func", {"prompt": "hi", "max_new_tokens": 2}, "flagai"),
               ("/stream_func", {"prompt": "hi", "max_new_tokens": 2}, "flagai")]
#: The types a page may send cross-site without a preflight (None: no Content-Type at all).
SIMPLE_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x", None]


@pytest.fixture(scope="module")
def server(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("boundary_model")
    make_tiny_model(out, byte_tokenizer_dir, max_position_embeddings=512)
    settings = ServerSettings(model_name=MODEL, allowed_origins=(ALLOWED + "/",))
    with serve(lambda: LLM(out, device="cpu", max_num_seqs=4), settings) as s:
        yield s


def prompt_tokens(server) -> float:
    return metric(server.url, "aquilachat_prompt_tokens_total")


def post(server, path: str, body: bytes, content_type: str | None, origin: str | None = None) -> httpx.Response:
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if origin is not None:
        headers["origin"] = origin
    # httpx adds no Content-Type for raw bytes, as a browser's fetch with a Blob of no type
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("path,body,shape", JSON_ROUTES)
def test_json_routes_refuse_bodies_a_page_can_send_cross_site(server, path, body, shape):
    before = prompt_tokens(server)
    for content_type in SIMPLE_TYPES:
        r = post(server, path, json.dumps(body).encode(), content_type)
        assert r.status_code == 415, (content_type, r.text)
        error = r.json()
        if shape == "openai":
            assert error["error"]["code"] == "unsupported_media_type"
            message = error["error"]["message"]
        else:  # FlagAI's reply shape, as its other errors
            assert error["completions"] == [] and error["status"] == 415
            message = error["error"]
        assert "application/json" in message and (content_type or "no Content-Type") in message
    assert prompt_tokens(server) == before  # nothing reached the engine
    # the same body as JSON is served (a charset parameter is fine)
    r = post(server, path, json.dumps(body).encode(), "application/json; charset=utf-8")
    assert r.status_code == 200, r.text
    assert prompt_tokens(server) > before


def test_flagais_own_client_still_works(server):
    """FlagAI's post_request.py: ``requests.post(url, json=json.dumps(raw_request))``; requests
    sends that with ``Content-Type: application/json``."""
    raw_request = {"prompt": "pytorch介绍", "top_k_per_token": 100, "sft": True, "max_new_tokens": 3}
    for path in ("/func", "/stream_func"):
        r = requests.post(server.url + path, json=json.dumps(raw_request), timeout=60)
        assert r.status_code == 200, r.text
    assert "completions" in requests.post(server.url + "/func", json=json.dumps(raw_request), timeout=60).json()


def test_legacy_route_takes_curls_untyped_body_without_a_foreign_origin(server):
    body = json.dumps({"prompt": "hi", "max_new_tokens": 2}).encode()
    for content_type in ("application/x-www-form-urlencoded", None, "application/json"):  # curl -d, raw, typed
        r = post(server, "/", body, content_type)
        assert r.status_code == 200 and r.json()["status"] == 200, (content_type, r.text)
    before = prompt_tokens(server)
    for origin in ("https://evil.example", "null"):
        r = post(server, "/", body, "text/plain", origin=origin)
        assert r.status_code == 403, r.text
        assert r.json()["status"] == 403 and origin in r.json()["error"]  # the route's own shape
    assert prompt_tokens(server) == before


def test_foreign_origins_get_403_on_every_route(server):
    before = prompt_tokens(server)
    for origin in ("https://evil.example", "http://127.0.0.1:1", "null", ALLOWED + ".evil.example"):
        r = post(server, "/v1/chat/completions", json.dumps(CHAT).encode(), "application/json", origin=origin)
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (origin, r.text)
        assert httpx.get(server.url + "/v1/models", headers={"origin": origin}, timeout=10).status_code == 403
    assert prompt_tokens(server) == before


def test_own_and_allowed_origins_are_served(server):
    for origin in (server.url, ALLOWED, ALLOWED.upper()):
        r = post(server, "/v1/chat/completions", json.dumps(CHAT).encode(), "application/json", origin=origin)
        assert r.status_code == 200, (origin, r.text)
    # the allowed origin gets CORS headers, and its preflight is answered
    r = post(server, "/v1/chat/completions", json.dumps(CHAT).encode(), "application/json", origin=ALLOWED)
    assert r.headers["access-control-allow-origin"] == ALLOWED
    r = httpx.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "origin": ALLOWED, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    assert "content-type" in r.headers["access-control-allow-headers"].lower()
    # a foreign page's preflight is not approved, so its browser never sends the request
    r = httpx.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_without_allowed_origins_no_cors_headers(tmp_path, byte_tokenizer_dir):
    make_tiny_model(tmp_path, byte_tokenizer_dir, max_position_embeddings=512)
    with serve(lambda: LLM(tmp_path, device="cpu", max_num_seqs=1), ServerSettings(model_name=MODEL)) as s:
        r = httpx.get(s.url + "/v1/models", headers={"origin": ALLOWED}, timeout=10)
        assert r.status_code == 403
        r = httpx.get(s.url + "/v1/models", headers={"origin": s.url}, timeout=10)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
