"""Training data: format detection, readers, rendering to ``(ids, loss_mask)``, packing, the report.

Formats (one per file, detected from the first row or named by ``data_format``):

==============  ===========================================================================
conversations   FlagAI / ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system",
                "value": ...}, ...]}``; a non-empty ``system`` (or FlagAI ``instruction``) field
                replaces the template's system message. JSONL or a JSON array.
sharegpt        the same reader (an alias).
openai          ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.
alpaca          ``{"instruction", "input", "output"}`` (+ optional ``system``, ``history``
                ``[[q, a], ...]``): the user turn is ``instruction`` then ``"\\n"`` then ``input``
                (as LLaMA-Factory's alpaca converter), the answer ``output``.
text            pretraining: a plain text file (any name but ``*.jsonl``/``*.json``) is one
                document; JSONL rows are strings or carry ``text_field``.
==============  ===========================================================================

Files are read by :mod:`aquilachat.io` (``.gz``, BOM and ``\\r\\n`` accepted): a file is a JSON array
when its first non-blank character is ``[``, otherwise JSON Lines (so a ``.json`` file that really
holds JSON Lines, like BELLE's, is read correctly). Every row is reported by ``file:line``; a
malformed row raises :class:`~aquilachat.errors.DataError` naming them, or is skipped and counted
when ``skip_bad_rows`` is set.

Conversations become ``(ids, loss_mask)`` through :func:`aquilachat.chat_format.render_for_training`,
the renderer the engine's templates use, so the mask is 1 on exactly the assistant answers and
their end-of-turn marker. Samples are immutable (read-only numpy arrays): nothing is rewritten in
place, so every epoch sees the same tokens.

Loss convention: ``mask[t] == 1`` means token ``t`` is a target, predicted from position ``t - 1``;
:func:`collate` turns that into ``labels[t - 1] = ids[t]`` (``-100`` elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..chat_format import get_template, render_for_training
from ..errors import DataError, ValidationError
from ..io import is_records_file, iter_records, iter_texts

__all__ = ["Unit", "TokenDataset", "DataReport", "detect_format", "row_to_messages",
           "build_sft_dataset", "build_pretrain_dataset", "pack_units", "collate", "IGNORE_INDEX",
           "expand_paths"]

IGNORE_INDEX = -100
_USER_ROLES = ("user", "human")
_DATA_SUFFIXES = (".jsonl", ".json", ".txt")
#: Bad-row messages kept in the report (the count is always exact).
MAX_REPORTED_BAD_ROWS = 20


# ---------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """One training row: token ids and loss mask (read-only ``int32`` / ``uint8`` arrays ``[T]``),
    and where it came from (``file:line`` or several for a packed row)."""

    ids: np.ndarray
    mask: np.ndarray
    source: str

    @staticmethod
    def make(ids: Sequence[int], mask: Sequence[int], source: str) -> "Unit":
        a = np.asarray(ids, dtype=np.int32)
        m = np.asarray(mask, dtype=np.uint8)
        a.flags.writeable = False
        m.flags.writeable = False
        return Unit(a, m, source)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_targets(self) -> int:
        """Supervised predictions: targets after the first position (``sum(mask[1:])``)."""
        return int(self.mask[1:].sum())


@dataclass
class DataReport:
    """What the dataset holds, printed before training and saved as ``data_report.json``.

    ``tokens`` counts every token of the kept samples (after truncation); ``supervised_tokens``
    those with loss mask 1. ``eot_supervised`` counts samples whose last supervised tokens are the
    template's end-of-turn marker, out of ``eot_expected`` (the samples that were not truncated).
    """

    mode: str
    template: str | None
    max_seq_len: int
    files: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    trailing_user_dropped: int = 0
    bad_rows: int = 0
    bad_row_messages: list[str] = field(default_factory=list)
    end_of_turn: str | None = None
    eot_supervised: int = 0
    eot_expected: int = 0
    units: int = 0
    packing: bool = False

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["supervised_share"] = self.supervised_share
        return d

    def format(self) -> str:
        """Human-readable summary (several lines)."""
        lines = [f"dataset ({self.mode}" + (f", template {self.template}" if self.template else "")
                 + f", max_seq_len {self.max_seq_len}):"]
        for f in self.files:
            lines.append(f"  {f['path']}: {f['format']}, {f['rows']} rows" +
                         (f", {f['skipped']} skipped" if f['skipped'] else ""))
        noun = "documents" if self.mode == "pretrain" else "samples"
        lines.append(f"  {noun}: {self.samples}" + (f" ({self.bad_rows} bad rows skipped)" if self.bad_rows else "")
                     + (f"; unanswered last questions dropped: {self.trailing_user_dropped}"
                        if self.trailing_user_dropped else ""))
        lines.append(f"  tokens: {self.tokens}, supervised: {self.supervised_tokens} "
                     f"({100 * self.supervised_share:.1f}%)")
        if self.mode != "pretrain":
            lines.append(f"  truncated to max_seq_len: {self.truncated}" +
                         (f"; dropped (no supervised token left): {self.dropped_no_target}"
                          if self.dropped_no_target else ""))
        if self.end_of_turn is not None:
            status = "OK" if self.eot_supervised == self.eot_expected else "MISSING"
            lines.append(f"  end-of-turn {self.end_of_turn!r} supervised: {self.eot_supervised}/"
                         f"{self.eot_expected} untruncated samples [{status}]")
        lines.append(f"  training rows: {self.units}" + (" (packed)" if self.packing else ""))
        return "\n".join(lines)


@dataclass
class TokenDataset:
    """Training rows (:class:`Unit`) plus the report. Indexing never copies or modifies a row."""

    units: list[Unit]
    report: DataReport

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> Unit:
        return self.units[i]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(u) for u in self.units], dtype=np.int64)


# ---------------------------------------------------------------------------- files and rows
def expand_paths(paths: Sequence[Path]) -> list[Path]:
    """Files, with directories expanded to their ``*.jsonl``/``*.json``/``*.txt`` files, gzipped
    or not (sorted).

    Raises:
        DataError: a directory without data files.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.name.lower().removesuffix(".gz").endswith(_DATA_SUFFIXES))
            if not found:
                raise DataError(f"{p}: directory has no {'/'.join(_DATA_SUFFIXES)} files")
            out.extend(found)
        else:
            out.append(p)
    return out


def detect_format(path: Path, first_row: Any) -> str:
    """The format of a file from its first row (see the module docstring).

    Raises:
        DataError: the row matches no format, naming its keys.
    """
    if not is_records_file(path):
        return "text"
    if isinstance(first_row, dict):
        if "conversations" in first_row:
            return "conversations"
        if "messages" in first_row:
            return "openai"
        if "instruction" in first_row and "output" in first_row:
            return "alpaca"
        if "text" in first_row:
            return "text"
        keys = ", ".join(map(repr, list(first_row)[:8]))
        raise DataError(f"{path}: cannot tell the format from the first row's keys ({keys}); expected "
                        "'conversations', 'messages', 'instruction'+'output' or 'text', or set data_format")
    raise DataError(f"{path}: cannot tell the format: the first row is a {type(first_row).__name__}, "
                    "not an object")


def _str_field(row: dict, key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValidationError(f"field {key!r} must be a string, got "
                              f"{'nothing' if value is None else type(value).__name__}")
    return value


def row_to_messages(row: Any, fmt: str) -> list[dict[str, str]]:
    """A row of a conversation format as OpenAI-style messages (``{"role", "content"}``), system
    first when the row has one. Nothing in ``row`` is modified.

    Raises:
        ValidationError: the row lacks the format's fields or has the wrong types.
    """
    if not isinstance(row, dict):
        raise ValidationError(f"expected a JSON object, got {type(row).__name__}")
    if fmt in ("conversations", "sharegpt", "openai"):
        key = "messages" if fmt == "openai" else "conversations"
        if key not in row and ("messages" if key == "conversations" else "conversations") in row:
            key = "messages" if key == "conversations" else "conversations"
        turns = row.get(key)
        if not isinstance(turns, list) or not turns:
            raise ValidationError(f"field {key!r} must be a non-empty list of messages")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise ValidationError(f"{key}[{i}] must be an object")
            messages.append({"role": t.get("role", t.get("from")), "content": t.get("content", t.get("value"))})
        system = row.get("system") if fmt == "openai" else (row.get("system") or row.get("instruction"))
        if system and isinstance(system, str) and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages
    if fmt == "alpaca":
        instruction = _str_field(row, "instruction")
        inp = _str_field(row, "input", required=False)
        output = _str_field(row, "output")
        messages: list[dict[str, str]] = []
        system = row.get("system")
        if system:
            if not isinstance(system, str):
                raise ValidationError("field 'system' must be a string")
            messages.append({"role": "system", "content": system})
        history = row.get("history") or []
        if not isinstance(history, list):
            raise ValidationError("field 'history' must be a list of [question, answer] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ValidationError(f"history[{i}] must be a [question, answer] pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = f"{instruction}\n{inp}" if inp else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return messages
    raise ValidationError(f"format {fmt!r} is not a conversation format")


# ---------------------------------------------------------------------------- SFT
class _BadRows:
    """Collects bad rows, or raises at the first one."""

    def __init__(self, skip: bool, report: DataReport) -> None:
        self.skip, self.report = skip, report

    def __call__(self, path: Path, line: int, err: Exception) -> None:
        msg = str(err) if isinstance(err, DataError) else f"{path}:{line}: {err}"
        if not self.skip:
            raise DataError(msg + " (set skip_bad_rows: true to skip such rows)")
        self.report.bad_rows += 1
        if len(self.report.bad_row_messages) < MAX_REPORTED_BAD_ROWS:
            self.report.bad_row_messages.append(msg)


def _ends_with_eot(tokenizer, ids: np.ndarray, mask: np.ndarray, eot: str) -> bool:
    """True when the last supervised run of ``ids`` ends with the end-of-turn text."""
    sup = np.flatnonzero(mask)
    if len(sup) == 0 or sup[-1] != len(ids) - 1:
        return False
    start = sup[-1]
    while start > 0 and mask[start - 1]:
        start -= 1
    return tokenizer.decode(ids[start:].tolist()).endswith(eot)


def build_sft_dataset(paths: Sequence[Path], tokenizer, *, template: str, max_seq_len: int,
                      data_format: str = "auto", skip_bad_rows: bool = False,
                      packing: bool = False) -> TokenDataset:
    """Read conversation files and render them with ``render_for_training``.

    Samples longer than ``max_seq_len`` are truncated (counted); a sample with no supervised
    token left after truncation is dropped (counted). With ``packing``, samples are concatenated
    in file order into rows of at most ``max_seq_len`` tokens (:func:`pack_units`).

    Raises:
        DataError: a bad row (``file:line``) unless ``skip_bad_rows``; no usable sample; a
            template whose end-of-turn marker is not supervised in an untruncated sample.
    """
    if data_format == "text":
        raise DataError("data_format 'text' is pretraining data; sft needs conversations "
                        "(use 'aquilachat pretrain')")
    tpl = get_template(template)
    report = DataReport(mode="sft", template=tpl.name, max_seq_len=max_seq_len, packing=packing,
                        end_of_turn=tpl.end_of_turn)
    bad = _BadRows(skip_bad_rows, report)
    units: list[Unit] = []
    for path in expand_paths(paths):
        rows = kept = 0
        before = report.bad_rows
        fmt = None if data_format == "auto" else data_format
        if fmt is None and not is_records_file(path):
            raise DataError(f"{path}: holds plain text (pretraining data; conversations are .jsonl or .json "
                            "files); sft needs conversations (use 'aquilachat pretrain', or set data_format)")
        for line, row in iter_records(path, bad_rows="yield"):
            rows += 1
            if isinstance(row, DataError):
                bad(path, line, row)
                continue
            if fmt is None:
                fmt = detect_format(path, row)
                if fmt == "text":
                    raise DataError(f"{path}: holds plain text (pretraining data); sft needs conversations "
                                    "(use 'aquilachat pretrain', or set data_format)")
            try:
                messages = row_to_messages(row, fmt)
                # a conversation that ends with an unanswered question (80 of FlagAI's 100
                # convo_samples do) trains on its answered turns; the last question is dropped
                if len(messages) > 1 and messages[-1].get("role") in _USER_ROLES:
                    messages = messages[:-1]
                    report.trailing_user_dropped += 1
                ids, mask = render_for_training(tokenizer, messages, tpl)
            except ValidationError as exc:
                bad(path, line, exc)
                continue
            truncated = len(ids) > max_seq_len
            if truncated:
                ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            unit = Unit.make(ids, mask, f"{path.name}:{line}")
            if unit.num_targets == 0:
                report.dropped_no_target += 1
                report.truncated += int(truncated)
                continue
            report.truncated += int(truncated)
            if not truncated:
                report.eot_expected += 1
                if _ends_with_eot(tokenizer, unit.ids, unit.mask, tpl.end_of_turn):
                    report.eot_supervised += 1
                else:
                    raise DataError(f"{unit.source}: the end-of-turn marker {tpl.end_of_turn!r} of template "
                                    f"{tpl.name!r} is not supervised; the model would never learn to stop")
            units.append(unit)
            kept += 1
            report.tokens += len(unit)
            report.supervised_tokens += int(unit.mask.sum())
        report.files.append({"path": str(path), "format": fmt or data_format, "rows": rows,
                             "skipped": report.bad_rows - before, "samples": kept})
    report.samples = len(units)
    if not units:
        raise DataError("no usable training sample in " + ", ".join(str(p) for p in paths)
                        + f" ({report.bad_rows} bad rows, {report.dropped_no_target} samples whose answer "
                        f"starts beyond max_seq_len {max_seq_len})")
    if packing:
        units = pack_units(units, max_seq_len)
    report.units = len(units)
    return TokenDataset(units, report)


def pack_units(units: Sequence[Unit], max_seq_len: int) -> list[Unit]:
    """Concatenate consecutive units greedily into rows of at most ``max_seq_len`` tokens.

    Masks are concatenated with the ids, so the supervised tokens are unchanged; attention is
    plain causal across the packed samples (a sample can see its predecessors in the row, as in
    most packed SFT), while no loss is taken on a sample's first token (a prompt token).
    """
    packed: list[Unit] = []
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    sources: list[str] = []
    length = 0

    def flush() -> None:
        if ids:
            packed.append(Unit.make(np.concatenate(ids), np.concatenate(masks), "+".join(sources)))
            ids.clear(), masks.clear(), sources.clear()

    for u in units:
        if length + len(u) > max_seq_len:
            flush()
            length = 0
        ids.append(u.ids)
        masks.append(u.mask)
        sources.append(u.source)
        length += len(u)
    flush()
    return packed


# ---------------------------------------------------------------------------- pretraining
def build_pretrain_dataset(paths: Sequence[Path], tokenizer, *, max_seq_len: int, eos_id: int,
                           text_field: str = "text", skip_bad_rows: bool = False) -> TokenDataset:
    """Tokenize documents, join them with ``eos_id`` after each, cut the stream into rows of
    ``max_seq_len`` tokens (the last partial row is dropped), loss on every token.

    Raises:
        DataError: a bad row unless ``skip_bad_rows``; not enough text for one row.
    """
    report = DataReport(mode="pretrain", template=None, max_seq_len=max_seq_len, packing=True)
    bad = _BadRows(skip_bad_rows, report)
    stream: list[np.ndarray] = []
    for path in expand_paths(paths):
        docs = 0
        before = report.bad_rows
        batch: list[str] = []

        def flush() -> None:
            for ids in tokenizer.encode_batch(batch):
                stream.append(np.asarray(ids + [eos_id], dtype=np.int32))
            batch.clear()

        for line, text in iter_texts(path, field=text_field, bad_rows="yield"):
            if isinstance(text, DataError):
                bad(path, line, text)
                continue
            docs += 1
            batch.append(text)
            if len(batch) >= 256:
                flush()
        flush()
        report.files.append({"path": str(path), "format": "text", "rows": docs,
                             "skipped": report.bad_rows - before, "samples": docs})
        report.samples += docs
    flat = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int32)
    n_rows = len(flat) // max_seq_len
    if n_rows == 0:
        raise DataError(f"the pretraining text has {len(flat)} tokens, fewer than one row of "
                        f"max_seq_len {max_seq_len}")
    units = []
    ones = np.ones(max_seq_len, dtype=np.uint8)
    for r in range(n_rows):
        units.append(Unit.make(flat[r * max_seq_len:(r + 1) * max_seq_len], ones, f"row{r}"))
    report.tokens = n_rows * max_seq_len
    report.supervised_tokens = report.tokens
    report.units = n_rows
    return TokenDataset(units, report)


# ---------------------------------------------------------------------------- batches
def collate(units: Sequence[Unit], pad_id: int):
    """Pad ``units`` to the longest and build next-token labels.

    Returns:
        ``(input_ids [B, T] int64, labels [B, T] int64)``: ``labels[b, t] = ids[b, t + 1]`` where
        ``mask[b, t + 1] == 1``, else ``-100`` (also on padding and the last position).
    """
    T = max(len(u) for u in units)
    input_ids = torch.full((len(units), T), pad_id, dtype=torch.long)
    labels = torch.full((len(units), T), IGNORE_INDEX, dtype=torch.long)
    for b, u in enumerate(units):
        ids = torch.from_numpy(u.ids.astype(np.int64))
        n = len(u)
        input_ids[b, :n] = ids
        target = torch.from_numpy(u.mask[1:].astype(bool))
        lab = torch.where(target, ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
        labels[b, : n - 1] = lab
    return input_ids, labels
