"""``LLM``: the offline Python entry point (vLLM's ``LLM`` shape) over the engine."""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence as Seq

import torch

from .chat_format import get_template, render, template_name_of
from .checkpoint import load_model, resolve_model_path
from .engine import Engine
from .errors import ValidationError
from .output_processor import OutputTracker
from .outputs import RequestOutput
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["LLM", "DEFAULT_MODEL"]

DEFAULT_MODEL = "aquila-tiny"


class LLM:
    """A loaded model with its tokenizer, chat template and engine.

    Args:
        model: a bundled name (``"aquila-tiny"``), a checkpoint directory (Hugging Face or
            FlagAI layout) or a Hugging Face repo id.
        dtype: ``"auto"`` (the checkpoint's dtype; float32 for float16 checkpoints on the CPU),
            ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``, ...
        template: chat template name for :meth:`chat` (default: the template of the checkpoint's
            ``chat_template`` when it is one of ours, else ``aquila-chat``).
        max_num_seqs: sequences decoded together (KV cache slots).
        max_model_len: context window in tokens (default: the model's).
        kv_cache_tokens: KV-token budget for admitting sequences (default: ``max_num_seqs *
            max_model_len``, i.e. no limit beyond the slots); see :class:`~aquilachat.engine.Engine`.

    Raises:
        CheckpointError, ConfigError, TokenizerError: the model cannot be loaded (message names the file).
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto",
                 device: str = "auto", template: str | None = None, max_num_seqs: int = 16,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None) -> None:
        path = resolve_model_path(model)
        self.model_name = str(model)
        self.model = load_model(path, dtype=dtype, device=device)
        self.config = self.model.config
        self.tokenizer = Tokenizer.from_dir(path)
        self.template = get_template(template or template_name_of(self.tokenizer.chat_template))
        eos = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.engine = Engine(self.model, eos_token_ids=sorted(eos),
                             allowed=self.tokenizer.decodable_mask(self.config.vocab_size),
                             max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             kv_cache_tokens=kv_cache_tokens)
        self.tokenizer.token_bytes(0)  # builds the detokenizer's byte table now (0.4 s for 100k ids), not in a request

    # ------------------------------------------------------------------ helpers
    def default_params(self, params: SamplingParams | None) -> SamplingParams:
        """``params`` with the template's stop strings added (a copy)."""
        params = params or SamplingParams()
        stops = list(params.stop) + [s for s in self.template.stop if s not in params.stop]
        return params.replace(stop=stops)

    def encode_chat(self, messages: Seq[dict]) -> list[int]:
        """Prompt ids of one conversation in this model's template."""
        return render(self.tokenizer, messages, self.template)

    # ------------------------------------------------------------------ running
    def _run(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams, *,
             on_delta: Callable[[int, int, str], None] | None = None,
             cap_to_context: bool = False) -> list[RequestOutput]:
        """Generate for already tokenized prompts; ``on_delta(prompt_index, answer_index, text)``
        receives streamed text."""
        for _, ids in prompts:  # validate everything before any work
            self.engine.check_request(ids, params, cap_to_context=cap_to_context)
        trackers: list[list[OutputTracker]] = []
        for p, (_, ids) in enumerate(prompts):
            row = []
            for i in range(params.n):
                seq = self.engine.add(ids, params, seed_offset=i, cap_to_context=cap_to_context)
                row.append(OutputTracker(seq, self.tokenizer, index=i))
            trackers.append(row)
        by_seq = {t.seq.seq_id: (p, t) for p, row in enumerate(trackers) for t in row}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    p, tracker = by_seq[out.seq.seq_id]
                    delta, stopped = tracker.update()
                    if stopped:
                        self.engine.finish(tracker.seq, "stop", tracker.stop_string)
                    if delta and on_delta is not None:
                        on_delta(p, tracker.index, delta)
        except BaseException:
            for row in trackers:  # leave the engine clean for the next call
                for t in row:
                    self.engine.finish(t.seq, "abort")
            while self.engine.has_unfinished():
                self.engine.step()
            raise
        return [RequestOutput(request_id=str(p), prompt=text, prompt_token_ids=list(ids),
                              outputs=[t.completion() for t in trackers[p]])
                for p, (text, ids) in enumerate(prompts)]

    def generate(self, prompts: list[str] | str, params: SamplingParams | None = None, *,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """Raw completion (no template) of each prompt; returns one :class:`RequestOutput` per prompt.

        Raises:
            ValidationError: a prompt too long for the context window with ``params.max_tokens``,
                or an empty prompt, before any generation.
        """
        params = params or SamplingParams()
        if prompt_token_ids is not None:
            items = [(None, list(ids)) for ids in prompt_token_ids]
        else:
            if isinstance(prompts, str):
                prompts = [prompts]
            items = [(p, self.tokenizer.encode(p)) for p in prompts]
        return self._run(items, params)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None, *,
             on_delta: Callable[[int, int, str], None] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or several (a list of
        such lists) in the chat template; the template's stop strings are added to ``params``.

        Raises:
            ValidationError: malformed messages or a conversation too long for the context window.
        """
        if not isinstance(messages, list) or not messages:
            raise ValidationError("messages must be a non-empty list")
        conversations = messages if isinstance(messages[0], list) else [messages]
        items = [(None, self.encode_chat(c)) for c in conversations]
        return self._run(items, self.default_params(params), on_delta=on_delta)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None, *,
                    cap_to_context: bool = False) -> Iterator[str]:
        """Answer one conversation, yielding text deltas as they are generated (never half a
        UTF-8 character, never a piece of a stop string). After the iterator ends,
        :attr:`last_output` holds the :class:`RequestOutput`.

        Raises:
            ValidationError: malformed messages, or prompt + max_tokens beyond the context window
                (with ``cap_to_context``, max_tokens is capped instead: finish_reason "length").
        """
        params = self.default_params(params).replace(n=1)
        ids = self.encode_chat(messages)
        self.engine.check_request(ids, params, cap_to_context=cap_to_context)
        seq = self.engine.add(ids, params, cap_to_context=cap_to_context)
        tracker = OutputTracker(seq, self.tokenizer)
        self.last_output = None
        try:
            while not tracker.done or self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.seq is not seq:
                        continue
                    delta, stopped = tracker.update()
                    if stopped:
                        self.engine.finish(seq, "stop", tracker.stop_string)
                    if delta:
                        yield delta
                if not self.engine.has_unfinished():
                    break
        finally:
            if not seq.finished:
                self.engine.finish(seq, "abort")
                while self.engine.has_unfinished():
                    self.engine.step()
        self.last_output = RequestOutput("0", None, ids, [tracker.completion()])
