"""The chat page (``GET /``) in a real browser: Debian's chromium driven by Playwright (no browser
download: ``executable_path``), against a live server with the bundled aquila-tiny and a tiny
random diffusers pipeline. Skipped when chromium or playwright is absent.

Screenshots of the states go to the test's tmp dir (and to ``$AQUILACHAT_SCREENSHOTS`` if set).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from aquilachat.llm import LLM
from aquilachat.sampling_params import SamplingParams
from aquilachat.server.app import ServerSettings, create_app
from tests.server_utils import RunningServer, metric, script_chat

CHROMIUM = next((p for p in (os.environ.get("AQUILACHAT_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p), None)
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

#: Seconds the page may take for anything the test waits for.
WAIT_MS = 30_000
#: The page's max tokens in the tests.
MAX_TOKENS = 24
#: Seconds each engine step is slowed down by, so that chunks arrive apart (a fast machine otherwise
#: delivers a whole 24-token answer in one network read) and Stop lands mid-answer.
STEP_DELAY_S = 0.03


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def image_backends(tmp_path_factory) -> dict:
    """A tiny random text-to-image and edit pipeline ({} without diffusers)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return {}
    from aquilachat.images import DiffusersBackend
    from tests.image_helpers import STEPS, make_tiny_pipeline
    root = tmp_path_factory.mktemp("pipelines")
    return {"text2image": DiffusersBackend(make_tiny_pipeline(root / "t2i"), device="cpu", num_inference_steps=STEPS),
            "image_edit": DiffusersBackend(make_tiny_pipeline(root / "p2p", edit=True), device="cpu",
                                           num_inference_steps=STEPS)}


def start(settings: ServerSettings, **backends) -> RunningServer:
    running = RunningServer(create_app(lambda: LLM("aquila-tiny", device="cpu", max_num_seqs=2), settings,
                                       **backends)).start()
    running.wait_healthy()
    return running


@pytest.fixture(scope="module")
def server(image_backends):
    running = start(ServerSettings(model_name="aquila-tiny"), **image_backends)
    yield running
    running.stop()


class Page:
    """A browser tab on the server's page that records every request it makes and every console error."""

    def __init__(self, browser, url: str, shots: Path) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.url, self.shots = url, shots
        self.requests: list = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text + " @" + str(m.location)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url + "/")
        # short greedy answers: fast, and the same as the offline LLM's (settings as the drawer stores them)
        self.page.evaluate("settings => localStorage.setItem('aquilachat.settings', JSON.stringify(settings))",
                           {"max_tokens": MAX_TOKENS, "temperature": 0})
        self.page.reload()

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_idle(self) -> None:
        self.page.wait_for_selector("#stop:disabled")
        self.page.wait_for_selector("#send:enabled")

    def messages(self) -> list[tuple[str, str]]:
        return [tuple(m) for m in self.page.eval_on_selector_all(
            "#messages .msg", "els => els.map(e => [e.classList.contains('user') ? 'user' : 'assistant', "
                              "e.firstChild ? e.firstChild.textContent : ''])")]

    def chat_bodies(self) -> list[dict]:
        return [json.loads(r.post_data) for r in self.requests if r.url.endswith("/v1/chat/completions")]

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        if os.environ.get("AQUILACHAT_SCREENSHOTS"):
            Path(os.environ["AQUILACHAT_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(os.environ["AQUILACHAT_SCREENSHOTS"]) / path.name)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def tab(browser, server, tmp_path):
    t = Page(browser, server.url, tmp_path)
    yield t
    assert t.errors == [], t.errors  # no script error, no CSP violation
    # offline: the page and its libraries come from this server only
    assert all(r.url.startswith(server.url + "/") or r.url.startswith("data:") for r in t.requests), \
        [r.url for r in t.requests]
    t.close()


def slow_down(server, monkeypatch):
    """Sleep ``STEP_DELAY_S`` before each engine step of ``server`` (undone by ``monkeypatch``)."""
    engine = server.state.async_engine.engine
    real_step = engine.step

    def slow_step():
        time.sleep(STEP_DELAY_S)
        return real_step()
    monkeypatch.setattr(engine, "step", slow_step)
    return engine


def stored(tab) -> list[dict]:
    """The conversations as the page keeps them in localStorage."""
    return json.loads(tab.page.evaluate("localStorage.getItem('aquilachat.conversations')"))


def test_message_streams_and_survives_reload(tab, server, monkeypatch):
    slow_down(server, monkeypatch)
    # count the distinct texts the answer shows while it streams
    tab.page.evaluate("""() => { window.seen = new Set();
        new MutationObserver(() => { const m = document.querySelectorAll('#messages .msg.assistant');
            if (m.length) window.seen.add(m[m.length - 1].textContent); })
        .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true}); }""")
    tab.send("Hello! Tell me about the sea.")
    tab.wait_idle()
    (_, user), (role, answer) = tab.messages()
    assert user == "Hello! Tell me about the sea." and role == "assistant"
    assert tab.page.evaluate("window.seen.size") >= 3  # empty, partial..., whole: it streamed
    # the answer kept is the offline LLM's greedy answer (fp32: the same arithmetic)
    want = LLM("aquila-tiny", device="cpu").chat([{"role": "user", "content": "Hello! Tell me about the sea."}],
                                                 SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]
    assert stored(tab)[0]["messages"][1]["content"] == want.text and want.text.strip()
    body = tab.chat_bodies()[-1]
    assert body["stream"] is True and body["messages"] == [{"role": "user", "content": "Hello! Tell me about the sea."}]
    tab.shot("1-answered")
    tab.page.reload()
    tab.page.wait_for_selector("#messages .msg.assistant")
    assert tab.messages() == [("user", "Hello! Tell me about the sea."), ("assistant", answer)]
    assert tab.page.inner_text("#conversations").startswith("Hello! Tell me about")
    tab.shot("2-after-reload")


def test_stop_frees_the_server_slot(tab, server, monkeypatch):
    engine = slow_down(server, monkeypatch)
    aborted = []
    real_abort = server.state.async_engine.abort
    monkeypatch.setattr(server.state.async_engine, "abort", lambda h: aborted.append(h.finished) or real_abort(h))
    tab.page.click("#open-settings")
    tab.page.fill("#max_tokens", "400")
    tab.page.dispatch_event("#max_tokens", "change")
    tab.page.click("#close-settings")
    tab.send("Write a long story about a dragon.")
    # the answer's own text (its first child, as messages() reads it): the whole element's text
    # counts the placeholder and the Regenerate button (11 characters) before any token arrives,
    # while the request may still be waiting for the engine's next step
    tab.page.wait_for_function("() => { const m = document.querySelectorAll('#messages .msg.assistant'); "
                               "const a = m.length ? m[m.length - 1].firstChild : null; "
                               "return a && a.textContent.length > 8; }")
    assert metric(server.url, "aquilachat_running_sequences") == 1
    tab.shot("3-streaming")
    tab.page.click("#stop")
    tab.wait_idle()
    deadline = time.monotonic() + 10
    while metric(server.url, "aquilachat_running_sequences") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server.url, "aquilachat_running_sequences") == 0  # /metrics shows the slot freed
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert False in aborted  # aborted while still generating, not after finishing
    (_, partial) = tab.messages()[-1]
    assert partial.strip() and tab.page.query_selector(".msg.error") is None
    tab.shot("4-stopped")


def test_settings_regenerate_and_edit(tab, server):
    tab.page.click("#open-settings")
    tab.page.fill("#temperature", "0.3")
    tab.page.dispatch_event("#temperature", "change")
    tab.page.fill("#system", "Answer in one sentence.")
    tab.page.dispatch_event("#system", "change")
    tab.shot("5-settings")
    tab.page.click("#close-settings")
    tab.send("What is the capital of France?")
    tab.wait_idle()
    body = tab.chat_bodies()[-1]
    assert body["temperature"] == 0.3
    assert body["messages"][0] == {"role": "system", "content": "Answer in one sentence."}
    # regenerate: the same conversation asked again, the last answer replaced
    tab.page.click(".msg.assistant >> text=Regenerate")
    tab.wait_idle()
    assert tab.chat_bodies()[-1]["messages"] == body["messages"] and len(tab.messages()) == 2
    # edit the question: everything after it goes, the edited text is asked
    tab.page.click(".msg.user >> text=Edit")
    tab.page.fill(".msg.user textarea", "What is the capital of Italy?")
    tab.page.click(".msg.user >> text=Send")
    tab.wait_idle()
    assert tab.chat_bodies()[-1]["messages"][1:] == [{"role": "user", "content": "What is the capital of Italy?"}]
    assert [m[0] for m in tab.messages()] == ["user", "assistant"]
    tab.page.reload()
    assert tab.page.input_value("#temperature") == "0.3"  # settings survive a reload too


def test_markdown_code_highlighting_and_no_html_injection(tab, server, monkeypatch):
    script_chat(server, monkeypatch, "Here:\n\n```python\ndef f():\n    return 1\n```\n\n**bold** "
                                     "<img src=\"data:image/png;base64,AAAA\" onerror=\"window.pwned=1\"><script>window.pwned=2</script>")
    tab.send("show me code")
    tab.wait_idle()
    assert tab.page.inner_text(".msg.assistant strong") == "bold"
    assert tab.page.query_selector(".msg.assistant pre code.hljs .hljs-keyword") is not None
    assert tab.page.evaluate("window.pwned") is None
    assert tab.page.query_selector(".msg.assistant script") is None
    shown = tab.page.inner_text(".msg.assistant")
    assert "<img" in shown and "<script>" in shown  # raw HTML is shown as text, not parsed
    tab.shot("6-markdown")


def test_drawing_request_shows_the_image(tab, server, monkeypatch):
    if server.state.images.text2image is None:
        pytest.skip("diffusers is not installed")
    script_chat(server, monkeypatch, "好的，我来为您画。\n#text2image#\na red fox in the snow")
    tab.send("画一只雪地里的红狐狸")
    img = tab.page.wait_for_selector(".msg.assistant img")
    tab.page.wait_for_function("() => document.querySelector('.msg.assistant img').naturalWidth > 0")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert tab.chat_bodies()[-1]["aquilachat"]["run_instructions"] is True
    tab.wait_idle()
    tab.shot("7-drawing")
    tab.page.reload()
    tab.page.wait_for_selector(".msg.assistant img")  # the image is in the saved history too


def test_bundled_model_itself_answers_a_drawing_request(tab, server):
    """No scripted answer: the bundled aquila-tiny writes the #text2image# block itself (greedy, float32;
    tests/test_bundled_model.py checks by teacher forcing that this block is its greedy answer)."""
    if server.state.images.text2image is None:
        pytest.skip("diffusers is not installed")
    tab.page.evaluate("settings => localStorage.setItem('aquilachat.settings', JSON.stringify(settings))",
                      {"max_tokens": 96, "temperature": 0})
    tab.page.reload()
    tab.send("画一只猫")
    tab.page.wait_for_selector(".msg.assistant img")
    tab.page.wait_for_function("() => document.querySelector('.msg.assistant img').naturalWidth > 0")
    tab.wait_idle()
    assert "文生图模型" in tab.page.inner_text(".msg.assistant")  # the model's own preface
    tab.shot("9-bundled-model-drawing")


def test_uploaded_image_is_edited(tab, server, monkeypatch, tmp_path):
    if server.state.images.edit_backend is None:
        pytest.skip("diffusers is not installed")
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 120, 40)).save(tmp_path / "face.png")
    script_chat(server, monkeypatch, "我可以尝试为您调用多步图像编辑模型进行图像编辑。\n#InstructFace#\n"
                                     "Change the girl's eye color to brown.\nMake her smile.")
    tab.page.set_input_files("#image", str(tmp_path / "face.png"))
    tab.page.wait_for_function("() => document.getElementById('attachment').textContent === 'face.png'")
    tab.send("Change her eye color to brown and make her smile.")
    tab.wait_idle()
    assert tab.chat_bodies()[-1]["aquilachat"]["image"].startswith("data:image/png;base64,")
    assert tab.page.query_selector(".msg.user img") is not None  # the upload, shown with the message
    tab.page.wait_for_function("() => { const i = document.querySelector('.msg.assistant img'); "
                               "return i && i.naturalWidth === 32; }")
    tab.shot("8-edit")


def test_api_key_is_asked_once(browser, tmp_path):
    running = start(ServerSettings(model_name="aquila-tiny", api_key="s3cret"))
    try:
        assert httpx.get(running.url + "/", timeout=10).status_code == 200  # the page itself is public
        assert httpx.get(running.url + "/v1/models", timeout=10).status_code == 401
        t = Page(browser, running.url, tmp_path)
        prompts = []
        t.page.on("dialog", lambda d: prompts.append(d.message) or d.accept("s3cret"))
        t.send("hi")
        t.wait_idle()
        t.send("hi again")
        t.wait_idle()
        assert len(prompts) == 1 and "API key" in prompts[0]
        assert [m[0] for m in t.messages()] == ["user", "assistant"] * 2
        assert t.page.query_selector(".msg.error") is None
        assert t.page.evaluate("sessionStorage.getItem('aquilachat.apiKey')") == "s3cret"
        t.close()
    finally:
        running.stop()


def test_page_headers(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    for name in ("marked.min.js", "purify.min.js", "highlight.min.js", "highlight-github.min.css",
                 "marked.LICENSE.md", "dompurify.LICENSE", "highlight.js.LICENSE"):
        assert httpx.get(f"{server.url}/static/vendor/{name}", timeout=10).status_code == 200, name
    assert httpx.get(server.url + "/static/../app.py", timeout=10).status_code == 404
    # the legacy POST / is untouched by the page at GET /
    r = httpx.post(server.url + "/", json={"prompt": "hi", "max_new_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == 200
