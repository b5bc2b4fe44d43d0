"""Image backends and the image routes, on tiny random diffusers pipelines built in the test.

Oracles: the diffusers pipeline called directly with the same seed (fp32 on the CPU: the same
arithmetic, so the same pixels), and the instruction parser. The chat model cannot be made to
write an instruction block on demand, so the run_instructions tests script the answer's text
(Serving.chat replaced by one that returns it) and check what the server makes of it.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from aquilachat.images import DiffusersBackend, ImageBackendError, OpenAIImagesBackend, decode_image  # noqa: E402
from aquilachat.llm import LLM  # noqa: E402
from aquilachat.server.app import ServerSettings, create_app  # noqa: E402
from aquilachat.server.image_serving import MISSING_EDIT, MISSING_TEXT2IMAGE  # noqa: E402
from tests.helpers import make_tiny_model  # noqa: E402
from tests.image_helpers import SIDE, STEPS, make_tiny_pipeline  # noqa: E402
from tests.server_utils import RunningServer, metric, openai_client, script_chat, serve  # noqa: E402

MODEL = "tiny"
DRAW = "好的，我来画。\n#text2image#\na red fox in the snow"
EDIT = "I will edit it.\n#InstructFace#\nMake her smile.\nAdd glasses."


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return make_tiny_pipeline(root / "t2i"), make_tiny_pipeline(root / "p2p", edit=True, seed=1)


@pytest.fixture(scope="module")
def backends(pipelines):
    t2i, p2p = pipelines
    return (DiffusersBackend(t2i, device="cpu", num_inference_steps=STEPS),
            DiffusersBackend(p2p, device="cpu", num_inference_steps=STEPS))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def b64_image(text: str) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(base64.b64decode(text))))


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


# ---------------------------------------------------------------------------- backends
def test_diffusers_backend_equals_the_pipeline_called_directly(backends, pipelines, photo):
    import torch
    from diffusers import DiffusionPipeline
    t2i, p2p = backends
    ours = t2i.generate("a red fox", n=2, size=(SIDE, SIDE), seed=7)
    pipe = DiffusionPipeline.from_pretrained(pipelines[0])
    want = pipe("a red fox", num_images_per_prompt=2, width=SIDE, height=SIDE, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(7)).images
    assert len(ours) == 2 and all(im.size == (SIDE, SIDE) for im in ours)
    for a, b in zip(ours, want):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(ours[0]), pixels(t2i.generate("a red fox", seed=8)[0]))  # the seed matters
    # edits: each step's output is the next step's input, seeds seed, seed + 1
    edited = p2p.edit(photo, ["make it red", "add a hat"], seed=3)
    pipe = DiffusionPipeline.from_pretrained(pipelines[1])
    step1 = pipe("make it red", image=photo, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3)).images[0]
    step2 = pipe("add a hat", image=step1, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(4)).images[0]
    np.testing.assert_array_equal(pixels(edited), pixels(step2))


def test_backend_errors_are_clear(tmp_path, backends):
    with pytest.raises(ImageBackendError, match="no model_index.json"):
        DiffusersBackend(tmp_path)
    with pytest.raises(ImageBackendError, match="cannot edit"):
        OpenAIImagesBackend.__mro__[1]().edit(None, ["x"])
    with pytest.raises(ImageBackendError, match="ConnectError|answered"):
        OpenAIImagesBackend("http://127.0.0.1:1/v1", timeout=2).generate("x")


def test_diffusers_missing_gives_one_line(monkeypatch, pipelines):
    import builtins
    real = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers":
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ImageBackendError, match=r"pip install 'aquilachat\[image\]'"):
        DiffusersBackend(pipelines[0])


# ---------------------------------------------------------------------------- the routes
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("images_model")
    make_tiny_model(out, byte_tokenizer_dir, max_position_embeddings=256)
    return out


@pytest.fixture(scope="module")
def server(model_dir, backends):
    app = create_app(lambda: LLM(model_dir, device="cpu", max_num_seqs=2), ServerSettings(model_name=MODEL),
                     text2image=backends[0], image_edit=backends[1])
    running = RunningServer(app).start()
    running.wait_healthy()
    yield running
    running.stop()


def test_openai_client_generations(server, backends):
    client = openai_client(server)
    r = client.images.generate(prompt="a red fox", n=2, size=f"{SIDE}x{SIDE}", response_format="b64_json",
                               extra_body={"seed": 5})
    want = backends[0].generate("a red fox", n=2, size=(SIDE, SIDE), seed=5)
    assert len(r.data) == 2
    for got, image in zip(r.data, want):
        np.testing.assert_array_equal(b64_image(got.b64_json), pixels(image))
    # url: a file under the server's image directory, served by name
    r = client.images.generate(prompt="a red fox", size=f"{SIDE}x{SIDE}", response_format="url",
                               extra_body={"seed": 5})
    assert r.data[0].url.startswith(server.url + "/images/")
    png = httpx.get(r.data[0].url, timeout=10)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(pixels(Image.open(io.BytesIO(png.content))), pixels(want[0]))
    assert httpx.get(server.url + "/images/../../etc/passwd", timeout=10).status_code == 404
    assert httpx.get(server.url + "/images/" + "0" * 32 + ".png", timeout=10).status_code == 404


def test_openai_client_edits_multipart_and_json(server, backends, photo):
    client = openai_client(server)
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    r = client.images.edit(image=("photo.png", buf.getvalue(), "image/png"), prompt="make it red\nadd a hat",
                           response_format="b64_json", extra_body={"seed": 3})
    want = backends[1].edit(photo, ["make it red", "add a hat"], seed=3)
    np.testing.assert_array_equal(b64_image(r.data[0].b64_json), pixels(want))
    r = httpx.post(server.url + "/v1/images/edits", timeout=60, json={
        "image": "data:image/png;base64," + png_b64(photo), "prompt": "make it red\nadd a hat", "seed": 3})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(b64_image(r.json()["data"][0]["b64_json"]), pixels(want))
    # multipart without Authorization is what a cross-site form sends: refused
    r = httpx.post(server.url + "/v1/images/edits", files={"image": ("p.png", buf.getvalue(), "image/png")},
                   data={"prompt": "x"}, timeout=10)
    assert r.status_code == 415


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "size": "33x32"}, "size"), ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "n": 9}, "n"), ({"prompt": ""}, "prompt"), ({"prompt": "x", "response_format": "png"}, "response_format"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
])
def test_bad_generation_requests_get_400(server, body, param):
    r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_bad_edit_image_gets_400(server):
    for image in ("not base64!", base64.b64encode(b"not an image").decode()):
        r = httpx.post(server.url + "/v1/images/edits", json={"image": image, "prompt": "x"}, timeout=10)
        assert r.status_code == 400 and "image" in r.json()["error"]["message"], r.text


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "画一只狐狸"}]}


def test_run_instructions_draws_the_answers_prompt(server, backends, monkeypatch):
    script_chat(server, monkeypatch, DRAW)
    steps = metric(server.url, "aquilachat_image_steps_total")
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "aquilachat": {"run_instructions": True}},
                   timeout=60).json()
    assert r["choices"][0]["message"]["content"] == DRAW  # the text stays
    (result,) = r["aquilachat"]["instructions"]
    assert result["kind"] == "text2image" and result["steps"] == ["a red fox in the snow"] and result["error"] is None
    assert result["preface"] == "好的，我来画。" and len(result["images"]) == 1
    assert b64_image(result["images"][0]["b64_json"]).shape[:2] == (SIDE, SIDE)
    assert metric(server.url, "aquilachat_image_steps_total") == steps + STEPS  # progress on /metrics
    # off by default: no field, no image
    r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=60).json()
    assert "aquilachat" not in r and metric(server.url, "aquilachat_image_steps_total") == steps + STEPS


def test_run_instructions_streamed(server, monkeypatch):
    script_chat(server, monkeypatch, DRAW)
    client = openai_client(server)
    chunks = list(client.chat.completions.create(**CHAT, stream=True, extra_body={"aquilachat": {"run_instructions": True}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DRAW
    last = chunks[-1]
    assert last.choices == [] and last.aquilachat["instructions"][0]["kind"] == "text2image"
    assert len(last.aquilachat["instructions"][0]["images"]) == 1


def test_run_instructions_edit_needs_the_image(server, backends, monkeypatch, photo):
    script_chat(server, monkeypatch, EDIT)
    body = {**CHAT, "aquilachat": {"run_instructions": True}}
    (result,) = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["aquilachat"]["instructions"]
    assert result["images"] == [] and "aquilachat.image" in result["error"]
    body["aquilachat"]["image"] = "data:image/png;base64," + png_b64(photo)
    (result,) = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["aquilachat"]["instructions"]
    assert result["error"] is None and result["steps"] == ["Make her smile.", "Add glasses."]
    assert b64_image(result["images"][0]["b64_json"]).shape[:2] == (SIDE, SIDE)


def test_without_backends_the_answer_names_the_option(model_dir, monkeypatch):
    with serve(lambda: LLM(model_dir, device="cpu", max_num_seqs=1),
               ServerSettings(model_name=MODEL, run_instructions=True)) as s:
        for text, missing in ((DRAW, MISSING_TEXT2IMAGE), (EDIT, MISSING_EDIT)):
            script_chat(s, monkeypatch, text)
            r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
                **CHAT, "aquilachat": {"image": png_b64(Image.new("RGB", (8, 8)))}})
            assert r.status_code == 200
            assert r.json()["aquilachat"]["instructions"][0]["error"] == missing
        r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 400 and "--image-model" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/images/edits", json={"prompt": "x", "image": "aGk="}, timeout=10)
        assert r.status_code == 400 and "--image-edit-model" in r.json()["error"]["message"]
        # the request's own option wins over the server's
        script_chat(s, monkeypatch, DRAW)
        r = httpx.post(s.url + "/v1/chat/completions", json={**CHAT, "aquilachat": {"run_instructions": False}},
                       timeout=60)
        assert "aquilachat" not in r.json()


def test_decode_image_accepts_data_urls_and_refuses_garbage(photo):
    np.testing.assert_array_equal(pixels(decode_image("data:image/png;base64," + png_b64(photo))), pixels(photo))
    with pytest.raises(ValueError, match="image"):
        decode_image(b"GIF89a garbage")


def test_openai_images_backend_against_our_server(server, photo):
    """The remote backend (--image-url) speaks the OpenAI images API: our own server serves it."""
    remote = OpenAIImagesBackend(server.url + "/v1", api_key="k", timeout=60)
    images = remote.generate("a red fox", n=2, size=(SIDE, SIDE))
    assert [im.size for im in images] == [(SIDE, SIDE)] * 2
    steps = metric(server.url, "aquilachat_image_steps_total")
    edited = remote.edit(photo, ["make it red", "add a hat"])  # one multipart request per step
    assert edited.size == (SIDE, SIDE)
    assert metric(server.url, "aquilachat_image_steps_total") == steps + 2 * STEPS
