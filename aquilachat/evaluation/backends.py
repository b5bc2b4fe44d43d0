"""Generation backends for the evaluations: the local engine or any OpenAI-compatible server.

A :class:`Generator` turns prompts into completions; evaluations never care which one they use:

- :class:`LocalGenerator`: ``aquilachat.LLM`` in this process (imported lazily, so the HTTP path
  and the sandbox work without loading torch models).
- :class:`OpenAIHTTPGenerator`: ``POST {base_url}/completions`` and ``/chat/completions`` of any
  OpenAI-compatible server (``aquilachat serve``, vLLM, OpenAI), with ``httpx``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

from ..errors import AquilaChatError, ValidationError
from ..sampling_params import OPENAI_FIELDS, SamplingParams

__all__ = ["Generator", "LocalGenerator", "OpenAIHTTPGenerator", "BackendError", "make_generator"]

#: Attempts per HTTP request on connection errors, 429 and 5xx (with 0.5, 1, 2, ... s pauses).
HTTP_RETRIES = 4
HTTP_TIMEOUT_S = 600.0
#: Default sampling parameters (normalized: ``stop`` is ``[]``), to tell which fields a request changes.
_DEFAULTS = SamplingParams()


class BackendError(AquilaChatError, RuntimeError):
    """A generation backend failed (server unreachable, bad answer), naming the URL or model."""


class Generator(Protocol):
    """What the evaluations need from a model."""

    #: Recorded in reports: the model path or name, and the backend.
    description: dict[str, Any]

    def complete(self, prompts: Sequence[str], n: int, params: SamplingParams) -> list[list[str]]:
        """Raw completions (no chat template): ``n`` continuations of each prompt,
        ``result[i][j]`` the ``j``-th of prompt ``i``."""
        ...

    def chat(self, conversations: Sequence[list[dict[str, str]]], params: SamplingParams) -> list[str]:
        """One assistant answer to each conversation (OpenAI ``messages`` form)."""
        ...


# ---------------------------------------------------------------------------------- local engine
class LocalGenerator:
    """``aquilachat.LLM`` in this process.

    Args:
        model: a checkpoint directory, bundled name or repo id (as ``aquilachat.LLM`` takes).
        template: chat template name for :meth:`chat` (``None``: the model's default).
        llm: an already built ``LLM`` (tests); ``model`` is then only recorded.
    """

    def __init__(self, model: str, *, template: str | None = None, llm: Any = None, **llm_kwargs: Any) -> None:
        if llm is None:
            try:
                from aquilachat import LLM  # lazy: loading torch and a model only when used
            except (ImportError, AttributeError) as exc:
                raise BackendError(f"the local engine (aquilachat.LLM) is not available in this build ({exc}); "
                                   "use --url with an OpenAI-compatible server") from None
            llm = LLM(model, template=template, **llm_kwargs)
        self.llm = llm
        self.description = {"backend": "local", "model": str(model), "template": template}

    @staticmethod
    def _texts(output: Any, n: int) -> list[str]:
        outs = getattr(output, "outputs", None)
        texts = [o.text for o in outs] if outs else [output.text]
        if len(texts) != n:
            raise BackendError(f"local engine returned {len(texts)} completions, expected n={n}")
        return texts

    def complete(self, prompts: Sequence[str], n: int, params: SamplingParams) -> list[list[str]]:
        outputs = self.llm.generate(list(prompts), params.replace(n=n))
        return [self._texts(o, n) for o in outputs]

    def chat(self, conversations: Sequence[list[dict[str, str]]], params: SamplingParams) -> list[str]:
        outputs = self.llm.chat([list(c) for c in conversations], params.replace(n=1))
        return [self._texts(o, 1)[0] for o in outputs]


# ---------------------------------------------------------------------------------- HTTP
class OpenAIHTTPGenerator:
    """Any OpenAI-compatible server.

    Args:
        base_url: e.g. ``http://127.0.0.1:7000/v1`` (a URL without ``/v1`` gets it appended).
        model: the ``model`` field of requests (``GET /v1/models`` lists what a server has).
        api_key: sent as ``Authorization: Bearer``; ``None`` sends none.
        concurrency: requests in flight at once.
        client: an ``httpx.Client`` to use (tests).

    Requests with ``n > 1`` that come back with fewer choices (some servers ignore ``n``) are
    topped up with further requests.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 4,
                 timeout_s: float = HTTP_TIMEOUT_S, client: Any = None) -> None:
        import httpx
        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValidationError(f"--url must start with http:// or https://, got {base_url!r}")
        if not base.endswith("/v1"):
            base += "/v1"
        self.base_url, self.model, self.concurrency = base, model, max(1, concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout_s, headers=headers)
        self.description = {"backend": "openai-http", "url": self.base_url, "model": model}

    # -------------------------------------------------------------- plumbing
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx
        url = self.base_url + path
        delay = 0.5
        last = ""
        for attempt in range(HTTP_RETRIES):
            try:
                r = self._client.post(url, json=body)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                    except ValueError:
                        raise BackendError(f"{url}: answer is not JSON: {r.text[:200]!r}") from None
                    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                        raise BackendError(f"{url}: answer has no 'choices' list: {str(data)[:200]}")
                    return data
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code not in (408, 409, 429) and r.status_code < 500:
                    raise BackendError(f"{url}: {last}")
            if attempt + 1 < HTTP_RETRIES:
                time.sleep(delay)
                delay *= 2
        raise BackendError(f"{url}: no answer after {HTTP_RETRIES} attempts ({last})")

    def _sampling(self, params: SamplingParams) -> dict[str, Any]:
        """The request fields of ``params``: ``temperature``, ``top_p`` and ``max_tokens`` always (a
        server's own defaults may differ from ours), every other field the OpenAI routes take
        (:data:`~aquilachat.sampling_params.OPENAI_FIELDS`) only where it differs from its default,
        so that a server without vLLM's extensions (``top_k``) is not sent them needlessly. Every
        stop string is sent: a server that takes fewer answers with an error naming ``stop``."""
        body: dict[str, Any] = {"model": self.model, "temperature": params.temperature, "top_p": params.top_p,
                                "max_tokens": params.max_tokens}
        for name in OPENAI_FIELDS:
            value = getattr(params, name)
            if name not in body and value != getattr(_DEFAULTS, name):
                body[name] = value
        return body

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if self.concurrency == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    # -------------------------------------------------------------- API
    def complete(self, prompts: Sequence[str], n: int, params: SamplingParams) -> list[list[str]]:
        def one(prompt: str) -> list[str]:
            texts: list[str] = []
            for _ in range(n):  # bounded: at most n requests per prompt
                body = {**self._sampling(params), "prompt": prompt, "n": n - len(texts)}
                data = self._post("/completions", body)
                got = [c.get("text") for c in sorted(data["choices"], key=lambda c: c.get("index", 0))]
                if not got or not all(isinstance(t, str) for t in got):
                    raise BackendError(f"{self.base_url}/completions: choices without 'text'")
                texts.extend(got)
                if len(texts) >= n:
                    break
            return texts[:n]
        return self._map(one, list(prompts))

    def chat(self, conversations: Sequence[list[dict[str, str]]], params: SamplingParams) -> list[str]:
        def one(messages: list[dict[str, str]]) -> str:
            data = self._post("/chat/completions", {**self._sampling(params), "messages": messages, "n": 1})
            try:
                content = data["choices"][0]["message"]["content"]
            except (IndexError, KeyError, TypeError):
                raise BackendError(f"{self.base_url}/chat/completions: no choices[0].message.content") from None
            if not isinstance(content, str):
                raise BackendError(f"{self.base_url}/chat/completions: message content is not a string")
            return content
        return self._map(one, list(conversations))

    def close(self) -> None:
        self._client.close()


def make_generator(*, model: str | None = None, url: str | None = None, model_name: str | None = None,
                   api_key: str | None = None, template: str | None = None, concurrency: int = 4) -> Generator:
    """The backend the command line asked for: ``--url`` (HTTP) or ``--model`` (local).

    Raises:
        ValidationError: neither or both given, or ``--url`` without a model name.
    """
    if url:
        name = model_name or model
        if not name:
            raise ValidationError("--url needs --model-name (the 'model' field the server expects)")
        return OpenAIHTTPGenerator(url, name, api_key=api_key, concurrency=concurrency)
    if model:
        return LocalGenerator(model, template=template)
    raise ValidationError("give --model M (local engine) or --url URL --model-name NAME (OpenAI-compatible server)")
