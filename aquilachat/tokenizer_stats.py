"""Compare tokenizers: average tokens per sample, characters and bytes per token.

The measure is the one of the comparison table published with Aquila (FlagAI ``examples/Aquila``
README): the average number of tokens per sample over a set of English, Chinese and code samples
(GPT-2 1717 / 1764 / 2323, LLaMA 1805 / 1257 / 1970, Aquila 1575 / 477 / 1679 on 10,000 samples
each). Tokens are counted without BOS/EOS or any other added token, and text that looks like a
special token (``<|endoftext|>``, ``</s>``) is counted as plain text, for every tokenizer kind.

Tokenizer files read (:func:`load_token_counter`):

- a directory with ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (Hugging Face / GPT-2
  layout, Aquila's eight specials included), through :class:`aquilachat.tokenizer.Tokenizer`;
- a ``tokenizer.json`` file (``tokenizers`` library);
- a SentencePiece ``.model`` file (LLaMA), needs the ``sentencepiece`` package;
- a tiktoken rank file (``<base64 token> <rank>`` per line, e.g. ``cl100k_base.tiktoken``), needs
  the ``tiktoken`` package. The file holds no special tokens and no pre-tokenization regex; the
  regex is chosen by file name (:data:`TIKTOKEN_PATTERNS`, copied from tiktoken's
  ``tiktoken_ext/openai_public.py``), cl100k's when the name is not known.

The last two are the ``tokenizers-extra`` extra of the package and are imported only when such a
file is read.

Sample files (:func:`read_samples`, read by :mod:`aquilachat.io`): ``.jsonl`` / ``.json`` (one record
per line or a JSON array; the sample is the record's ``field``, or several fields joined,
``"prompt+canonical_solution"``; a record that is a JSON string is the sample itself) or plain
text (one sample per non-empty line, line end removed), either one optionally gzip-compressed
(``.gz``).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, TokenizerError
from .io import iter_texts

__all__ = [
    "TokenCounter", "LanguageStats", "TokenizerStats", "load_token_counter", "read_tiktoken_ranks",
    "read_samples", "compute_stats", "format_markdown", "stats_to_json", "TIKTOKEN_PATTERNS",
    "PUBLISHED_AQUILA_TABLE",
]

#: The table published with Aquila: average tokens per sample (English, Chinese, code), 10,000 samples each.
PUBLISHED_AQUILA_TABLE = {
    "gpt2": {"en": 1717, "zh": 1764, "code": 2323},
    "llama": {"en": 1805, "zh": 1257, "code": 1970},
    "aquila": {"en": 1575, "zh": 477, "code": 1679},
}

_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

#: Pre-tokenization regex per tiktoken encoding name (the rank file's stem), from tiktoken
#: ``tiktoken_ext/openai_public.py`` (tiktoken 0.5-0.9). Other names get cl100k's.
TIKTOKEN_PATTERNS = {
    "r50k_base": _R50K_PAT, "p50k_base": _R50K_PAT, "gpt2": _R50K_PAT,
    "cl100k_base": _CL100K_PAT, "o200k_base": _O200K_PAT,
}

_EXTRA_HINT = "pip install 'aquilachat[tokenizers-extra]'"


def _import_optional(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TokenizerError(f"{purpose} needs the optional package '{module}', which is not installed: "
                             f"{_EXTRA_HINT} (or pip install {module})") from None


# ---------------------------------------------------------------------------------- tokenizers
@dataclass
class TokenCounter:
    """A loaded tokenizer of any kind, reduced to what the comparison needs.

    Attributes:
        name: label in the table.
        kind: ``"hf"`` (tokenizers library), ``"sentencepiece"`` or ``"tiktoken"``.
        path: the file or directory read.
        vocab_size: number of ids the files define (special tokens included where the files list
            them; a tiktoken rank file lists none).
    """

    name: str
    kind: str
    path: str
    vocab_size: int
    _encode_batch: object = field(repr=False, default=None)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, nothing added (no BOS/EOS), special-token text as plain text."""
        return self._encode_batch(list(texts))

    def count(self, text: str) -> int:
        """Number of tokens of one text."""
        return len(self.encode_batch([text])[0])


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one ``<base64 token bytes> <rank>`` pair per line (blank lines ignored).

    This is the format of OpenAI's ``*.tiktoken`` files (tiktoken ``load.load_tiktoken_bpe``),
    read here from a local path without tiktoken's download cache.

    Raises:
        TokenizerError: a malformed line (bad base64, rank not an integer), a token or rank that
            appears twice, or a file lacking one of the 256 single bytes (then some text could not
            be encoded). The message names the file and line.
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', "
                                         f"got {raw[:60]!r}")
                try:
                    token = base64.b64decode(parts[0], validate=True)
                    rank = int(parts[1])
                except (binascii.Error, ValueError):
                    raise TokenizerError(f"{path}:{lineno}: bad base64 token or rank in {raw[:60]!r}") from None
                if token in ranks or rank in seen_ranks:
                    raise TokenizerError(f"{path}:{lineno}: token {token!r} or rank {rank} appears twice")
                ranks[token] = rank
                seen_ranks.add(rank)
    except IsADirectoryError:
        raise TokenizerError(f"{path}: is a directory, expected a tiktoken rank file") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken rank file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} of the 256 single bytes have no rank (first: 0x{missing[0]:02x}); "
                             "the file is cut short or not a byte-level rank file")
    return ranks


def _hf_counter(name: str, path: Path) -> TokenCounter:
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import Tokenizer
    if path.is_dir():
        tok = Tokenizer.from_dir(path)
        return TokenCounter(name, "hf", str(path), tok.vocab_size,
                            lambda texts: tok.encode_batch(texts, allow_special=False))
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a plain Exception
        raise TokenizerError(f"{path}: cannot be read as a tokenizer.json: {exc}") from None
    backend.encode_special_tokens = True  # special-token text counts as plain text

    def encode_batch(texts):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    return TokenCounter(name, "hf", str(path), backend.get_vocab_size(with_added_tokens=True), encode_batch)


def _sentencepiece_counter(name: str, path: Path) -> TokenCounter:
    spm = _import_optional("sentencepiece", f"reading the SentencePiece model {path}")
    try:
        proc = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: cannot be read as a SentencePiece model: {exc}") from None

    def encode_batch(texts):
        return proc.encode(texts)  # no BOS/EOS: add_bos/add_eos default to False

    return TokenCounter(name, "sentencepiece", str(path), proc.get_piece_size(), encode_batch)


def _tiktoken_counter(name: str, path: Path) -> TokenCounter:
    tiktoken = _import_optional("tiktoken", f"reading the tiktoken rank file {path}")
    ranks = read_tiktoken_ranks(path)
    stem = path.name.split(".")[0]
    enc = tiktoken.Encoding(name=f"aquilachat:{stem}", pat_str=TIKTOKEN_PATTERNS.get(stem, _CL100K_PAT),
                            mergeable_ranks=ranks, special_tokens={})

    def encode_batch(texts):
        return [enc.encode_ordinary(t) for t in texts]

    return TokenCounter(name, "tiktoken", str(path), len(ranks), encode_batch)


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except binascii.Error:
        return False
    return True


def load_token_counter(path: str | os.PathLike, *, name: str | None = None) -> TokenCounter:
    """Load a tokenizer of any supported kind (see the module docstring) for counting.

    The kind is found from the path: a directory (``tokenizer.json`` / ``vocab.json`` +
    ``merges.txt``, else a single ``*.model`` or ``*.tiktoken`` file inside), a ``.json`` file,
    a ``.model`` file, a ``.tiktoken`` file, or a file whose first line is ``<base64> <rank>``.

    Raises:
        TokenizerError: the path is missing, of no known kind or malformed (the message names
            it), or the optional package for its kind is not installed (the message names it).
    """
    path = Path(path)
    name = name or path.stem or str(path)
    if not path.exists():
        raise TokenizerError(f"{path}: tokenizer not found")
    if path.is_dir():
        if (path / "tokenizer.json").exists() or ((path / "vocab.json").exists() and (path / "merges.txt").exists()):
            return _hf_counter(name, path)
        for pattern, loader in (("*.model", _sentencepiece_counter), ("*.tiktoken", _tiktoken_counter)):
            found = sorted(path.glob(pattern))
            if len(found) == 1:
                return loader(name, found[0])
        raise TokenizerError(f"{path}: no tokenizer.json, vocab.json + merges.txt, single *.model or single "
                             "*.tiktoken file in this directory")
    if path.name in ("vocab.json", "merges.txt"):
        return _hf_counter(name, path.parent)
    if path.suffix == ".json":
        return _hf_counter(name, path)
    if path.suffix == ".model":
        return _sentencepiece_counter(name, path)
    if path.suffix == ".tiktoken" or _looks_like_tiktoken(path):
        return _tiktoken_counter(name, path)
    raise TokenizerError(f"{path}: unknown tokenizer file kind (expected a directory, tokenizer.json, "
                         "a SentencePiece .model or a tiktoken rank file)")


# ---------------------------------------------------------------------------------- samples
def read_samples(paths: Sequence[str | os.PathLike], *, field: str = "text", limit: int | None = None) -> list[str]:
    """Read text samples from ``.jsonl``/``.json``/text files (optionally ``.gz``), in order, at most
    ``limit`` (files are read by :func:`aquilachat.io.iter_texts`).

    Args:
        paths: sample files. ``*.jsonl`` / ``*.json`` (JSON Lines or a JSON array): the sample is
            ``record[field]`` (``field`` may join several with ``+``: ``"prompt+canonical_solution"``),
            or the record itself if it is a string. Any other name: plain text, one sample per line
            (the line end removed).
        field: JSON field(s) holding the sample text.
        limit: keep the first ``limit`` samples (all if ``None``).

    Empty samples (blank lines, empty strings) are skipped, not counted.

    Raises:
        DataError: a missing file, a NUL byte (binary file), a line that is not UTF-8, invalid JSON,
            a missing or non-string field, a bad gzip stream, or no samples at all; the message
            names the file and line (and field): ``path:line: what``.
    """
    if limit is not None and limit < 1:
        raise DataError(f"the number of samples must be positive, got {limit}")
    fields = [f for f in field.split("+") if f]
    if not fields:
        raise DataError(f"no field name in {field!r}")
    samples: list[str] = []
    for path in paths:
        for _, text in iter_texts(path, field=fields, per_line=True):
            if not text.strip():
                continue
            samples.append(text)
            if limit is not None and len(samples) >= limit:
                return samples
    if not samples:
        raise DataError(f"no samples in {', '.join(map(str, paths))} (files empty or all lines blank)")
    return samples


# ---------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class LanguageStats:
    """Totals of one tokenizer on one sample set.

    ``avg_tokens`` = tokens / samples (the published measure), ``chars_per_token`` = characters
    (Unicode code points) / tokens, ``bytes_per_token`` = UTF-8 bytes / tokens.
    """

    samples: int
    chars: int
    bytes: int
    tokens: int

    @property
    def avg_tokens(self) -> float:
        return self.tokens / self.samples

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float("nan")


@dataclass
class TokenizerStats:
    """One table row: a tokenizer and its :class:`LanguageStats` per sample set (in input order)."""

    name: str
    kind: str
    path: str
    vocab_size: int
    languages: dict[str, LanguageStats]


def compute_stats(counters: Sequence[TokenCounter], samples: Mapping[str, Sequence[str]], *,
                  batch_size: int = 256) -> list[TokenizerStats]:
    """Count tokens of every sample set with every tokenizer.

    Args:
        counters: loaded tokenizers (:func:`load_token_counter`).
        samples: ``{language: [text, ...]}``, each list non-empty.
        batch_size: texts encoded per call (only token counts are kept, so memory is one batch).

    Raises:
        DataError: an empty sample list.
    """
    sizes = {}
    for lang, texts in samples.items():
        if not texts:
            raise DataError(f"no {lang} samples")
        sizes[lang] = (sum(len(t) for t in texts), sum(len(t.encode("utf-8")) for t in texts))
    rows = []
    for counter in counters:
        langs = {}
        for lang, texts in samples.items():
            tokens = 0
            for start in range(0, len(texts), batch_size):
                tokens += sum(len(ids) for ids in counter.encode_batch(texts[start:start + batch_size]))
            chars, nbytes = sizes[lang]
            langs[lang] = LanguageStats(samples=len(texts), chars=chars, bytes=nbytes, tokens=tokens)
        rows.append(TokenizerStats(counter.name, counter.kind, counter.path, counter.vocab_size, langs))
    return rows


def format_markdown(rows: Sequence[TokenizerStats], *, baseline: str | None = None) -> str:
    """Markdown tables: tokens per sample (and vocabulary size), then characters and bytes per
    token, then (with ``baseline``, a row name) tokens per sample relative to that row.

    Raises:
        DataError: ``baseline`` names no row.
    """
    if not rows:
        return ""
    langs = list(rows[0].languages)
    first = rows[0].languages
    out = ["Samples: " + ", ".join(f"{lang} {first[lang].samples} ({first[lang].chars:,} characters, "
                                   f"{first[lang].bytes:,} bytes)" for lang in langs), ""]
    out.append("| tokenizer | kind | vocab size | " + " | ".join(f"{lang} tokens/sample" for lang in langs) + " |")
    out.append("|---|---|---:|" + "---:|" * len(langs))
    for r in rows:
        out.append(f"| {r.name} | {r.kind} | {r.vocab_size} | "
                   + " | ".join(f"{r.languages[lang].avg_tokens:.1f}" for lang in langs) + " |")
    out += ["", "| tokenizer | " + " | ".join(f"{lang} chars/token | {lang} bytes/token" for lang in langs) + " |",
            "|---|" + "---:|---:|" * len(langs)]
    for r in rows:
        out.append(f"| {r.name} | " + " | ".join(
            f"{r.languages[lang].chars_per_token:.3f} | {r.languages[lang].bytes_per_token:.3f}" for lang in langs) + " |")
    if baseline is not None:
        base = next((r for r in rows if r.name == baseline), None)
        if base is None:
            raise DataError(f"baseline {baseline!r} is not one of the tokenizers ({', '.join(r.name for r in rows)})")
        out += ["", f"| tokens/sample ÷ {baseline} | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
        for r in rows:
            out.append(f"| {r.name} | " + " | ".join(
                f"{r.languages[lang].tokens / base.languages[lang].tokens:.3f}" for lang in langs) + " |")
    return "\n".join(out) + "\n"


def stats_to_json(rows: Sequence[TokenizerStats]) -> dict:
    """JSON-ready dict: ``{"samples": {lang: {samples, chars, bytes}}, "tokenizers": [{name, kind,
    path, vocab_size, languages: {lang: {samples, tokens, avg_tokens_per_sample, chars_per_token,
    bytes_per_token}}}]}``."""
    samples = {}
    if rows:
        samples = {lang: {"samples": s.samples, "chars": s.chars, "bytes": s.bytes}
                   for lang, s in rows[0].languages.items()}
    return {
        "samples": samples,
        "tokenizers": [
            {"name": r.name, "kind": r.kind, "path": r.path, "vocab_size": r.vocab_size,
             "languages": {lang: {"samples": s.samples, "tokens": s.tokens, "avg_tokens_per_sample": s.avg_tokens,
                                  "chars_per_token": s.chars_per_token, "bytes_per_token": s.bytes_per_token}
                           for lang, s in r.languages.items()}}
            for r in rows
        ],
    }
