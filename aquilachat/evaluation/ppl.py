"""Token-level perplexity and bits per byte (``aquilachat eval ppl``).

Definitions (for ``N`` scored tokens ``x_i`` with model probabilities ``p(x_i | x_<i)``):

- perplexity = ``exp(-(1/N) sum_i ln p(x_i | x_<i))`` — depends on the tokenizer;
- bits per byte = ``-(sum_i ln p(x_i | x_<i)) / ln 2 / B``, where ``B`` is the number of UTF-8
  bytes the scored tokens spell — comparable across tokenizers, since every model is charged for
  the same bytes.

Each document is tokenized on its own, with the tokenizer's BOS token in front when it has one
(``add_bos``), so that its first text token is scored too and ``B`` is the whole document.
Without BOS the first token has no context and is not scored (nor are its bytes counted).

Documents longer than the context ``L`` are scored with a sliding window of stride ``S``
(default ``L // 2``, at most ``L - 1``), as in Hugging Face's "Perplexity of fixed-length models"
guide: the first window scores tokens ``1 .. L-1``; each further window scores the next ``S``
tokens and spans the ``L`` tokens ending with them. Every token is scored exactly once and,
after the first window, with at least ``L - S`` tokens of context. ``S = L - 1`` is the fastest
(about ``N / (L-1)`` windows) and gives the highest perplexity; smaller strides cost about
``N / S`` forward passes of ``L`` tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from ..errors import ValidationError
from ..io import iter_texts

__all__ = ["PerplexityResult", "read_documents", "windows", "score_ids", "perplexity", "evaluate_files"]


@dataclass
class PerplexityResult:
    """Totals over the scored documents.

    Attributes:
        nll_nats: summed negative log-likelihood (natural log) of the scored tokens.
        tokens: number of scored tokens; ``bytes``: UTF-8 bytes they spell.
        perplexity: ``exp(nll_nats / tokens)``; ``bits_per_byte``: ``nll_nats / ln 2 / bytes``.
    """

    nll_nats: float
    tokens: int
    bytes: int
    documents: int
    windows: int
    context: int
    stride: int
    add_bos: bool

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens_per_byte": self.tokens_per_byte}


def read_documents(path: str | os.PathLike, *, field: str = "text") -> list[str]:
    """Documents of a data file (:func:`aquilachat.io.iter_texts`): a plain text file is one
    document; ``.jsonl`` / ``.json`` (``.gz`` or not; JSON Lines or a JSON array) hold one document
    per record, a JSON string or an object with a string ``field``.

    Raises:
        DataError: a missing or unreadable file, a row without the field or with a non-string
            value, naming ``file:line``.
    """
    return [text for _, text in iter_texts(path, field=field)]


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Sliding windows over ``n_tokens`` ids: yields ``(begin, end, first_scored)``; the window
    is ``ids[begin:end]`` and it scores target positions ``first_scored .. end - 1``.

    The first window is ``[0, min(context, n))`` and scores positions ``1..`` (position 0 has no
    context). Each later window scores the next ``stride`` positions and ends at the last of
    them, beginning ``context`` tokens earlier, so every position is scored exactly once, with at
    least ``context - stride`` tokens of context.

    Raises:
        ValidationError: ``context < 2`` or ``stride`` outside ``1..context-1``.
    """
    if context < 2:
        raise ValidationError(f"context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context - 1:
        raise ValidationError(f"stride must be in 1..context-1={context - 1}, got {stride}")
    if n_tokens < 2:
        return
    end = min(context, n_tokens)
    yield 0, end, 1
    while end < n_tokens:
        first = end
        end = min(first + stride, n_tokens)
        yield max(0, end - context), end, first


def score_ids(model: Any, ids: Sequence[int], *, context: int, stride: int, batch_size: int = 1) -> tuple[float, list[int], int]:
    """Summed NLL (nats) of ``ids[1:]`` given the preceding ids, with sliding windows.

    ``model(input_ids [B, T]) -> logits [B, T, V]`` (``AquilaForCausalLM``). Windows of equal
    length are batched ``batch_size`` at a time. Returns ``(nll, scored positions, windows)``.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    all_ids = torch.tensor(list(ids), dtype=torch.long)
    spans = list(windows(len(ids), context, stride))
    total = 0.0
    scored: list[int] = []
    i = 0
    with torch.inference_mode():
        while i < len(spans):
            length = spans[i][1] - spans[i][0]
            group = [spans[i]]
            while len(group) < batch_size and i + len(group) < len(spans) and \
                    spans[i + len(group)][1] - spans[i + len(group)][0] == length:
                group.append(spans[i + len(group)])
            batch = torch.stack([all_ids[b:e] for b, e, _ in group]).to(device)  # (B, T)
            logits = model(batch)  # (B, T, V) fp32
            for row, (b, e, first) in enumerate(group):
                # logits at position t predict token t + 1: targets first..e-1 use positions first-1..e-2
                lo, hi = first - 1 - b, e - 1 - b
                nll = F.cross_entropy(logits[row, lo:hi].float(), batch[row, lo + 1:hi + 1], reduction="sum")
                total += float(nll.double())
                scored.extend(range(first, e))
            i += len(group)
    return total, scored, len(spans)


def perplexity(model: Any, tokenizer: Any, documents: Sequence[str], *, context: int | None = None,
               stride: int | None = None, add_bos: bool = True, batch_size: int = 1,
               max_tokens: int | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity and bits per byte of ``documents`` (see the module docstring for definitions).

    Args:
        model: ``forward(input_ids [B, T]) -> logits [B, T, V]``, with ``.config.max_position_embeddings``.
        tokenizer: ``encode(text) -> ids``, ``token_bytes(id) -> bytes``, ``bos_token_id``.
        context: window length in tokens (default: the model's context length).
        stride: window stride in tokens (default ``context // 2``).
        max_tokens: stop after scoring about this many tokens (documents are cut, whole windows).

    Raises:
        ValidationError: bad context/stride, or nothing to score.
    """
    context = int(context or model.config.max_position_embeddings)
    if context > model.config.max_position_embeddings:
        raise ValidationError(f"context {context} exceeds the model's {model.config.max_position_embeddings} positions")
    stride = int(stride or max(1, context // 2))
    bos = tokenizer.bos_token_id if add_bos else None
    nll, tokens, nbytes, nwin, ndocs = 0.0, 0, 0, 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(documents), desc="documents", unit="doc")
    for text in documents:
        ids = ([bos] if bos is not None else []) + tokenizer.encode(text)
        if max_tokens is not None:
            ids = ids[: max_tokens - tokens + 1]
        doc_nll, scored, n = score_ids(model, ids, context=context, stride=stride, batch_size=batch_size)
        nll += doc_nll
        tokens += len(scored)
        nbytes += sum(len(tokenizer.token_bytes(ids[t])) for t in scored)
        nwin += n
        ndocs += 1
        if bar is not None:
            bar.update(1)
        if max_tokens is not None and tokens >= max_tokens:
            break
    if bar is not None:
        bar.close()
    if tokens == 0:
        raise ValidationError("nothing to score: the documents have fewer than 2 tokens")
    return PerplexityResult(nll, tokens, nbytes, ndocs, nwin, context, stride, bos is not None)


def evaluate_files(model_path: str, files: Sequence[str | os.PathLike], *, context: int | None = None,
                   stride: int | None = None, add_bos: bool = True, batch_size: int = 1,
                   max_tokens: int | None = None, dtype: str = "auto", device: str = "auto",
                   field: str = "text", progress: bool = True,
                   quantization: str | None = None) -> tuple[dict[str, PerplexityResult], dict[str, Any]]:
    """Load a checkpoint (``quantization``: ``int8`` / ``int4`` weight-only at load time, see
    :mod:`aquilachat.quantization`) and score each file; returns per-file results and model facts."""
    from ..checkpoint import Checkpoint
    ckpt = Checkpoint.open(model_path)  # resolved once (a Hub id: one download)
    model = ckpt.load_model(dtype=dtype, device=device, quantization=quantization)
    tokenizer = ckpt.load_tokenizer()
    out = {}
    for f in files:
        docs = read_documents(f, field=field)
        out[str(f)] = perplexity(model, tokenizer, docs, context=context, stride=stride, add_bos=add_bos,
                                 batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    qconfig = ckpt.quantization_for(quantization)
    info = {"path": str(model_path), "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
            "quantization": qconfig.description if qconfig else None,
            "parameters": model.num_parameters(), "vocab_size": model.config.vocab_size,
            "max_position_embeddings": model.config.max_position_embeddings,
            "tokenizer_vocab_size": tokenizer.vocab_size}
    return out, info
