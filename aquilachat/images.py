"""Image backends: what carries out ``#text2image#`` and ``#InstructFace#`` instructions
(:mod:`aquilachat.instructions`) and serves ``/v1/images/*``.

One small interface, :class:`ImageBackend`: ``generate(prompt)`` draws images from text,
``edit(image, steps)`` applies edit instructions to an image, one after the other (AquilaChat's
multi-step face editor took one instruction per line). Three implementations:

- :class:`DiffusersBackend` over a local diffusers pipeline directory (``model_index.json``):
  any text-to-image pipeline diffusers loads (AltDiffusion, the Aquila answers' original target,
  Stable Diffusion, ...) for ``--image-model``, or an image-to-image pipeline taking ``image=``
  (InstructPix2Pix) for ``--image-edit-model``. diffusers itself runs the pipeline; nothing of it
  is reimplemented here. diffusers is the optional extra ``aquilachat[image]``.
- :class:`OpenAIImagesBackend` over any OpenAI-compatible images server (``--image-url``):
  ``POST {url}/images/generations`` and ``{url}/images/edits`` (OpenAI API reference, "Images").

Calls block (seconds to minutes): the server runs them in a worker thread
(:mod:`aquilachat.server.image_serving`). ``cancel`` events stop a diffusers run between
denoising steps; ``on_step`` is called after each step (progress on ``/metrics``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import AquilaChatError, ValidationError

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["ImageBackend", "DiffusersBackend", "OpenAIImagesBackend", "ImageCancelled", "ImageBackendError",
           "decode_image", "encode_png", "parse_size"]

#: Largest side of a requested image, in pixels.
MAX_IMAGE_SIDE = 2048


class ImageBackendError(AquilaChatError):
    """An image backend failed (a missing pipeline, an unreachable server, a refused request)."""


class ImageCancelled(Exception):
    """The run was cancelled (timeout or client gone) between two denoising steps."""


def parse_size(size: str | None) -> tuple[int, int] | None:
    """OpenAI's ``size`` (``"512x512"``: width x height in pixels) as ``(width, height)``.

    Raises:
        ValidationError: not ``WxH``, a side below 8 or above :data:`MAX_IMAGE_SIDE` pixels, or not a
            multiple of 8 (diffusion models work on latents 8 times smaller).
    """
    if size is None:
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not match:
        raise ValidationError("size", f"size must be WIDTHxHEIGHT in pixels, e.g. 512x512 (got {size!r})")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if not 8 <= side <= MAX_IMAGE_SIDE or side % 8:
            raise ValidationError("size", f"size: each side must be a multiple of 8 from 8 to {MAX_IMAGE_SIDE} "
                                          f"pixels (got {size})")
    return width, height


def decode_image(data: str | bytes, field: str = "image") -> "Image":
    """An RGB image from file bytes, base64 text or a ``data:image/...;base64,`` URL (PNG, JPEG, WebP...).

    Raises:
        ValidationError: not base64, or not an image Pillow can read (the message names ``field``).
    """
    from PIL import Image as PILImage
    if isinstance(data, str):
        payload = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(field, f"{field} is not base64 image data (or a data: URL)") from None
    try:
        image = PILImage.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises several types for bad files
        raise ValidationError(field, f"{field} is not an image Pillow can read: {exc}") from None
    return image.convert("RGB")


def encode_png(image: "Image") -> bytes:
    """The image as PNG file bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class ImageBackend:
    """Draws and edits images. Subclasses implement what they can; the other raises
    :class:`ImageBackendError`.

    ``size`` is ``(width, height)`` in pixels (``None``: the model's default); ``seed`` makes a
    run reproducible on one machine; ``cancel`` is checked between steps; ``on_step`` is called
    after each denoising step.
    """

    #: What the backend is, for logs and errors (a directory or URL).
    name: str = "image backend"

    def generate(self, prompt: str, *, n: int = 1, size: tuple[int, int] | None = None, seed: int | None = None,
                 cancel: threading.Event | None = None, on_step: Callable[[], None] | None = None) -> list["Image"]:
        """``n`` images drawn from ``prompt``."""
        raise ImageBackendError(f"{self.name} cannot draw images from text")

    def edit(self, image: "Image", steps: Sequence[str], *, size: tuple[int, int] | None = None,
             seed: int | None = None, cancel: threading.Event | None = None,
             on_step: Callable[[], None] | None = None) -> "Image":
        """``image`` with each edit instruction of ``steps`` applied in order (the output of one
        step is the input of the next)."""
        raise ImageBackendError(f"{self.name} cannot edit images")


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImageBackendError("image generation needs diffusers: pip install 'aquilachat[image]'") from None
    return diffusers


class DiffusersBackend(ImageBackend):
    """A local diffusers pipeline directory (``model_index.json``), loaded on first use with
    ``DiffusionPipeline.from_pretrained`` (diffusers picks the pipeline class the directory names).

    Args:
        path: the pipeline directory.
        device: ``"cpu"``, ``"cuda"``, ... (default: cuda when available, else cpu).
        num_inference_steps: denoising steps per image (``None``: the pipeline's default).

    Raises:
        ImageBackendError: ``path`` has no ``model_index.json``, or diffusers is not installed.
    """

    def __init__(self, path: str | Path, *, device: str | None = None, num_inference_steps: int | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "model_index.json").is_file():
            raise ImageBackendError(f"{self.path}: not a diffusers pipeline directory (no model_index.json)")
        _import_diffusers()
        self.name = str(self.path)
        self.device = device
        self.num_inference_steps = num_inference_steps
        self._pipe = None
        self._lock = threading.Lock()  # a pipeline is not thread-safe: one run at a time

    def pipeline(self):
        """The loaded pipeline (loads it on the first call)."""
        if self._pipe is None:
            import torch
            diffusers = _import_diffusers()
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            pipe = diffusers.DiffusionPipeline.from_pretrained(self.path)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe.to(device)
        return self._pipe

    def _run(self, cancel, on_step, seed, **kwargs) -> list["Image"]:
        import torch

        def step_end(pipe, step, timestep, callback_kwargs):
            if cancel is not None and cancel.is_set():
                raise ImageCancelled()
            if on_step is not None:
                on_step()
            return callback_kwargs

        with self._lock:
            pipe = self.pipeline()
            if self.num_inference_steps is not None:
                kwargs["num_inference_steps"] = self.num_inference_steps
            if seed is not None:
                kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
            return pipe(callback_on_step_end=step_end, output_type="pil", **kwargs).images

    def generate(self, prompt, *, n=1, size=None, seed=None, cancel=None, on_step=None):
        kwargs = {"width": size[0], "height": size[1]} if size else {}
        return self._run(cancel, on_step, seed, prompt=prompt, num_images_per_prompt=n, **kwargs)

    def edit(self, image, steps, *, size=None, seed=None, cancel=None, on_step=None):
        if size:
            image = image.resize(size)
        for i, step in enumerate(steps):
            image = self._run(cancel, on_step, None if seed is None else seed + i, prompt=step, image=image)[0]
        return image


class OpenAIImagesBackend(ImageBackend):
    """Any OpenAI-compatible images server: ``{url}/images/generations`` (JSON) and
    ``{url}/images/edits`` (multipart, one request per edit step), asking for ``b64_json``.

    Args:
        url: the API base, e.g. ``http://host:8000/v1``.
        api_key: sent as ``Authorization: Bearer``.
        model: the ``model`` field of each request (``None``: left out).
        timeout: seconds per request.
    """

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.name = self.url
        self.model = model
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _images(self, response) -> list["Image"]:
        if response.status_code != 200:
            raise ImageBackendError(f"{self.url} answered {response.status_code}: {response.text[:300]}")
        try:
            return [decode_image(item["b64_json"], "b64_json") for item in response.json()["data"]]
        except (KeyError, TypeError, json.JSONDecodeError, ValidationError) as exc:
            raise ImageBackendError(f"{self.url}: not an images response with b64_json ({exc})") from None

    def _post(self, path: str, **kwargs):
        import httpx
        try:
            return httpx.post(self.url + path, headers=self.headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise ImageBackendError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None

    def _fields(self, size, n: int = 1) -> dict:
        body: dict = {"n": n, "response_format": "b64_json"}
        if size:
            body["size"] = f"{size[0]}x{size[1]}"
        if self.model:
            body["model"] = self.model
        return body

    def generate(self, prompt, *, n=1, size=None, seed=None, cancel=None, on_step=None):
        return self._images(self._post("/images/generations", json={"prompt": prompt, **self._fields(size, n)}))

    def edit(self, image, steps, *, size=None, seed=None, cancel=None, on_step=None):
        for step in steps:
            if cancel is not None and cancel.is_set():
                raise ImageCancelled()
            data = {k: str(v) for k, v in {"prompt": step, **self._fields(size)}.items()}
            image = self._images(self._post("/images/edits", data=data,
                                            files={"image": ("image.png", encode_png(image), "image/png")}))[0]
            if on_step is not None:
                on_step()
        return image
