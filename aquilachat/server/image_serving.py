"""Serving images: ``/v1/images/generations``, ``/v1/images/edits``, and chat answers whose
``#text2image#`` / ``#InstructFace#`` blocks are carried out (``run_instructions``).

Like :mod:`.serving`, nothing here touches HTTP. Every image job runs in one worker thread, off
the event loop, at most :data:`~.limits.MAX_RUNNING_IMAGE_JOBS` at once with
:data:`~.limits.MAX_WAITING_IMAGE_JOBS` waiting (then 429), each bounded by
:data:`~.limits.IMAGE_TIMEOUT_S` (then 504; a diffusers run stops at its next denoising step, and a
job whose client has gone is cancelled the same way). Progress is counted for ``/metrics``.

A chat answer's instruction never turns into an error of the chat request: the answer's text is
returned as generated, and the ``aquilachat`` field says what came of the block, with the images
or an ``error`` (naming the missing ``--image-*`` option when the server has no backend for it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from ..errors import ValidationError
from ..images import ImageBackend, ImageBackendError, ImageCancelled, decode_image, encode_png, parse_size
from ..instructions import INSTRUCT_FACE, TEXT2IMAGE, Instruction, InstructionStream, parse_instruction
from .limits import (IMAGE_TIMEOUT_S, MAX_EDIT_STEPS, MAX_IMAGE_BODY_BYTES, MAX_RUNNING_IMAGE_JOBS,
                     MAX_STORED_IMAGES, MAX_WAITING_IMAGE_JOBS, QUEUE_FULL_RETRY_AFTER_S)
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionWithImages, ImageData,
                       ImageEditRequest, ImageGenerationRequest, ImagesResponse, InstructionResult,
                       InstructionResults)
from .serving import APIError, Serving, Stream

__all__ = ["ImageServing", "ImageStore", "MISSING_TEXT2IMAGE", "MISSING_EDIT"]

log = logging.getLogger("aquilachat.server")

#: What the answer says when the server has no backend for the instruction.
MISSING_TEXT2IMAGE = "this server draws no images: start aquilachat serve with --image-model DIR or --image-url URL"
MISSING_EDIT = "this server edits no images: start aquilachat serve with --image-edit-model DIR or --image-url URL"
_IMAGE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")


class ImageStore:
    """PNG files kept for ``response_format: "url"`` in one directory, at most ``max_files`` (the
    oldest deleted first), served by name (32 hex digits + ``.png``)."""

    def __init__(self, directory: Path, max_files: int = MAX_STORED_IMAGES) -> None:
        self.directory = Path(directory)
        self.max_files = max_files
        self._names: list[str] = []
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        """Keep ``png``; return its name."""
        name = f"{uuid.uuid4().hex}.png"
        (self.directory / name).write_bytes(png)
        with self._lock:
            self._names.append(name)
            while len(self._names) > self.max_files:
                (self.directory / self._names.pop(0)).unlink(missing_ok=True)
        return name

    def path(self, name: str) -> Path | None:
        """The file of ``name``, or None (unknown, deleted, or not a name this store makes)."""
        if not _IMAGE_NAME.match(name):
            return None
        path = self.directory / name
        return path if path.is_file() else None


@dataclass
class ImageStats:
    """Counters for ``/metrics``."""

    running: int = 0
    waiting: int = 0
    steps: int = 0       # denoising (or remote edit) steps done
    images: int = 0      # images made
    failed: int = 0      # jobs that failed, timed out or were cancelled


class ImageServing:
    """The image routes and instruction runs over a text-to-image and an edit backend (either may
    be None).

    Args:
        text2image: draws ``#text2image#`` blocks and ``/v1/images/generations``.
        edit: applies ``#InstructFace#`` steps and ``/v1/images/edits``.
        store: where ``url`` images are kept (None: ``url`` is refused).
        run_instructions: the default of a chat request's ``aquilachat.run_instructions``.
    """

    def __init__(self, text2image: ImageBackend | None, edit: ImageBackend | None, *, store: ImageStore | None,
                 run_instructions: bool = False) -> None:
        self.text2image = text2image
        self.edit_backend = edit
        self.store = store
        self.run_instructions = run_instructions
        self.stats = ImageStats()
        self._executor = ThreadPoolExecutor(max_workers=MAX_RUNNING_IMAGE_JOBS, thread_name_prefix="aquilachat-image")
        self._slots = asyncio.Semaphore(MAX_RUNNING_IMAGE_JOBS)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ jobs
    def _on_step(self) -> None:
        self.stats.steps += 1

    async def _job(self, work: Callable[[threading.Event], list]) -> list:
        """Run ``work(cancel)`` in the image thread, within the limits (module docstring).

        Raises:
            APIError: 429 (too many waiting), 504 (timeout), 400 (the backend refused the input),
                502 (the backend failed).
        """
        if self.stats.waiting >= MAX_WAITING_IMAGE_JOBS and self._slots.locked():
            raise APIError(429, f"{MAX_WAITING_IMAGE_JOBS} image jobs are waiting already; retry later",
                           type="server_busy", code="image_queue_full",
                           headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
        cancel = threading.Event()
        self.stats.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.stats.waiting -= 1
        self.stats.running += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, work, cancel)
        try:
            images = await asyncio.wait_for(asyncio.shield(future), IMAGE_TIMEOUT_S)
        except TimeoutError:
            cancel.set()
            self.stats.failed += 1
            raise APIError(504, f"the image job took longer than {IMAGE_TIMEOUT_S} s and was stopped",
                           type="timeout_error", code="image_timeout") from None
        except asyncio.CancelledError:  # the client has gone
            cancel.set()
            self.stats.failed += 1
            raise
        except ValidationError as exc:
            self.stats.failed += 1
            raise APIError(400, str(exc), param=exc.field) from None
        except (ImageBackendError, ImageCancelled) as exc:
            self.stats.failed += 1
            raise APIError(502, f"the image backend failed: {exc}", type="image_backend_error",
                           code="image_backend_error") from None
        except Exception as exc:  # noqa: BLE001 - a pipeline's own error: the server keeps serving
            self.stats.failed += 1
            log.exception("image job failed")
            raise APIError(502, f"the image backend failed: {type(exc).__name__}", type="image_backend_error",
                           code="image_backend_error") from None
        finally:
            self.stats.running -= 1
            self._slots.release()
        self.stats.images += len(images)
        return images

    def _generate(self, prompt: str, n: int, size, seed) -> Callable[[threading.Event], list]:
        if self.text2image is None:
            raise APIError(400, MISSING_TEXT2IMAGE, code="image_backend_missing")
        backend = self.text2image
        return lambda cancel: backend.generate(prompt, n=n, size=size, seed=seed, cancel=cancel,
                                               on_step=self._on_step)

    def _edit(self, image_data: str | bytes, steps: list[str], size, seed, field: str) -> Callable:
        if self.edit_backend is None:
            raise APIError(400, MISSING_EDIT, code="image_backend_missing")
        if not steps:
            raise APIError(400, "the edit prompt has no step (one instruction per line)", param="prompt")
        if len(steps) > MAX_EDIT_STEPS:
            raise APIError(400, f"at most {MAX_EDIT_STEPS} edit steps (lines), got {len(steps)}", param="prompt")
        backend = self.edit_backend

        def work(cancel: threading.Event) -> list:
            image = decode_image(image_data, field)  # in the worker: decoding a large image takes a while
            return [backend.edit(image, steps, size=size, seed=seed, cancel=cancel, on_step=self._on_step)]
        return work

    def _data(self, images: list, response_format: str, base_url: str) -> list[ImageData]:
        out = []
        for image in images:
            png = encode_png(image)
            if response_format == "url":
                if self.store is None:
                    raise APIError(400, "this server keeps no image files; use response_format b64_json",
                                   param="response_format")
                out.append(ImageData(url=f"{base_url.rstrip('/')}/images/{self.store.put(png)}"))
            else:
                out.append(ImageData(b64_json=base64.b64encode(png).decode("ascii")))
        return out

    @staticmethod
    def _size(size: str | None):
        try:
            return parse_size(size)
        except ValidationError as exc:
            raise APIError(400, str(exc), param="size") from None

    # ------------------------------------------------------------------ routes
    async def generations(self, req: ImageGenerationRequest, base_url: str) -> ImagesResponse:
        """``POST /v1/images/generations``.

        Raises:
            APIError: 400 (no text-to-image backend, bad size), 429, 502, 504 (see :meth:`_job`).
        """
        work = self._generate(req.prompt, req.n, self._size(req.size), req.seed)
        return ImagesResponse(data=self._data(await self._job(work), req.response_format, base_url))

    async def edits(self, req: ImageEditRequest, base_url: str, image: str | bytes | None = None) -> ImagesResponse:
        """``POST /v1/images/edits``: ``req.prompt``'s lines applied in order to the image
        (``image``: the uploaded file's bytes of a multipart request, else ``req.image``).

        Raises:
            APIError: 400 (no edit backend, not an image, too many steps, bad size), 429, 502, 504.
        """
        steps = [line.strip() for line in req.prompt.splitlines() if line.strip()]
        work = self._edit(req.image if image is None else image, steps, self._size(req.size), req.seed, "image")
        return ImagesResponse(data=self._data(await self._job(work), req.response_format, base_url))

    # ------------------------------------------------------------------ instructions in chat answers
    def wants_instructions(self, req: ChatCompletionRequest) -> bool:
        """Whether ``req`` runs its answer's instructions (its own option, else the server's)."""
        option = req.aquilachat.run_instructions if req.aquilachat is not None else None
        return self.run_instructions if option is None else option

    async def carry_out(self, index: int, instruction: Instruction, image: str | None) -> InstructionResult:
        """Run one instruction block; failures go in ``error``, never raise (but a cancelled
        request stays cancelled)."""
        result = InstructionResult(index=index, kind=instruction.kind, preface=instruction.preface,
                                   steps=list(instruction.steps), images=[])
        try:
            if instruction.kind == TEXT2IMAGE:
                work = self._generate(instruction.prompt, 1, None, None)
            elif image is None:
                raise APIError(400, "an #InstructFace# answer edits an image: send it as aquilachat.image")
            else:
                work = self._edit(image, list(instruction.steps), None, None, "aquilachat.image")
            result.images = self._data(await self._job(work), "b64_json", "")
        except APIError as exc:
            result.error = exc.message
        return result

    async def chat(self, serving: Serving, req: ChatCompletionRequest) -> ChatCompletionResponse | Stream:
        """``POST /v1/chat/completions``: :meth:`Serving.chat`, then, with ``run_instructions``,
        the answers' instruction blocks carried out (non-streamed: the response's ``aquilachat``
        field; streamed: one last chunk with no choices and that field, before ``[DONE]``)."""
        result = await serving.chat(req)
        if not self.wants_instructions(req):
            return result
        image = req.aquilachat.image if req.aquilachat is not None else None
        if isinstance(result, Stream):
            return Stream(self._stream(result, image), result.close, result.media_type)
        results = [await self.carry_out(c.index, found, image) for c in result.choices
                   if (found := parse_instruction(c.message.content)) is not None]
        return ChatCompletionWithImages(**dict(result), aquilachat=InstructionResults(instructions=results))

    async def _stream(self, stream: Stream, image: str | None) -> AsyncIterator[str]:
        answers: dict[int, InstructionStream] = {}
        last: dict = {}
        async for chunk in stream.chunks:
            data = chunk.removeprefix("data: ").strip()
            if data == "[DONE]" and last:
                results = [await self.carry_out(i, found, image) for i, s in sorted(answers.items())
                           if (found := s.finish()) is not None]
                extra = {"id": last["id"], "object": last["object"], "created": last["created"],
                         "model": last["model"], "choices": [],
                         "aquilachat": InstructionResults(instructions=results).model_dump(mode="json")}
                yield f"data: {json.dumps(extra, ensure_ascii=False)}\n\n"
            elif data.startswith("{"):
                event = json.loads(data)
                if "choices" in event:
                    last = event
                    for choice in event["choices"]:
                        answers.setdefault(choice["index"], InstructionStream()).feed(
                            choice["delta"].get("content") or "")
            yield chunk


def body_limit(path: str, default: int) -> int:
    """The body size limit of ``path``: :data:`~.limits.MAX_IMAGE_BODY_BYTES` on the routes that
    carry an image, ``default`` elsewhere."""
    return MAX_IMAGE_BODY_BYTES if path in ("/v1/images/edits", "/v1/chat/completions") else default


def image_store_dir() -> Path:
    """A fresh private temporary directory for an :class:`ImageStore`."""
    import tempfile
    return Path(tempfile.mkdtemp(prefix="aquilachat-images-"))

