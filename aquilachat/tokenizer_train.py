"""Train a byte-level BPE tokenizer in Aquila's layout, with bounded memory on Chinese.

The model is GPT-2's byte-level BPE (Radford et al. 2019, openai/gpt-2 ``encoder.py``), trained
with the ``tokenizers`` library's ``BpeTrainer``. The pre-tokenizer is

    Sequence([Split(cjk_split_pattern(K), "isolated"), ByteLevel(add_prefix_space=False, use_regex=True)])

so the GPT-2 regex still separates words, numbers, punctuation and spaces, but a run of CJK
characters (Han, Hiragana, Katakana, Hangul; one optional leading space) is first cut into chunks
of at most ``K`` characters. Why: GPT-2's regex treats a run of letters as one word, and Chinese
has no spaces, so without the cut a whole clause (or a whole line, in text without punctuation)
becomes one "word". BPE trainers keep every distinct word as a list of symbols plus an index of
where each pair occurs, and re-scan a word for every merge that touches it, so very long words make
training time grow faster than the corpus (huggingface/tokenizers issues #422, #1395). With the cut
no word is longer than ``K`` characters, and time and memory grow linearly with the corpus (about
100 MiB per MB of distinct Chinese at a 32k vocabulary; the measured figures are in
``docs/tokenizers.md``). The same pre-tokenizer is saved in ``tokenizer.json``, so inference cuts
text exactly as training did.

Layout of the result (as Aquila's ``Aquila-tokenizer-hf``): id 0 is ``<|endoftext|>``, the learned
vocabulary (256 byte symbols, then merges) follows, and the eight special tokens of
:data:`aquilachat.tokenizer.AQUILA_SPECIAL_TOKENS` come after it, ``[CLS]`` being BOS and ``</s>``
EOS. Aquila-7B has 100000 + 8 ids.

Input is streamed by :mod:`aquilachat.io` (``.gz`` or not): files are read line by line (a line
longer than :data:`CHUNK_CHARS` is read in pieces) and fed to ``Tokenizer.train_from_iterator`` in batches, never read into one string.
Before training each file is checked in one streaming pass: an empty file, a binary file (a NUL
byte) or a file that is not UTF-8 is a :class:`~aquilachat.errors.DataError` naming the file and
line, or, with ``skip_bad_files=True``, a counted skip reported through ``on_skip``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .errors import DataError, ValidationError
from .io import iter_blocks, iter_lines
from .tokenizer import AQUILA_SPECIAL_TOKENS, Tokenizer

__all__ = [
    "train_tokenizer", "build_pre_tokenizer", "cjk_split_pattern", "check_text_file", "iter_text_batches",
    "DEFAULT_MAX_CJK_RUN", "ENDOFTEXT", "CJK_CLASS",
]

#: Token at id 0, as in GPT-2 and Aquila (also the unknown and padding token in Aquila's map).
ENDOFTEXT = "<|endoftext|>"

#: Default longest run of CJK characters the pre-tokenizer lets through as one piece. 16 is the
#: length of the longest all-Han token in Aquila's 100k vocabulary (习近平新时代中国特色社会主义思想);
#: 99.6 % of its Han tokens have 6 characters or fewer. On held-out news it costs 1.3 % of compression
#: against no split, K = 4 costs 11 % (bench/tokenizer_memory.py, docs/tokenizers.md).
DEFAULT_MAX_CJK_RUN = 16

#: Characters counted as CJK by the split: scripts written without spaces between words (plus Hangul).
CJK_CLASS = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]"

#: Longest piece of one line handed to the trainer (characters); longer lines are cut.
CHUNK_CHARS = 1 << 16
#: Pieces of text per batch given to ``train_from_iterator`` (the Rust side works on a batch in parallel).
BATCH_TEXTS = 64
#: Block size of the validation pass (bytes).
_CHECK_BLOCK = 1 << 20

#: Aquila's special_tokens_map.json (FlagAI ``Aquila-tokenizer-hf``).
AQUILA_SPECIAL_TOKENS_MAP = {"bos_token": "[CLS]", "eos_token": "</s>", "unk_token": ENDOFTEXT,
                             "pad_token": ENDOFTEXT}


def cjk_split_pattern(max_cjk_run: int) -> str:
    """Regex (Oniguruma, as ``tokenizers.Regex``) matching one chunk of a CJK run.

    With ``Split(..., behavior="isolated")`` a run of ``n`` CJK characters becomes
    ``ceil(n / max_cjk_run)`` pieces of at most ``max_cjk_run`` characters, the first one keeping
    a single leading space (as GPT-2's ``" ?\\p{L}+"`` does for words).

    Raises:
        ValidationError: ``max_cjk_run`` is not a positive integer.
    """
    if isinstance(max_cjk_run, bool) or not isinstance(max_cjk_run, int) or max_cjk_run < 1:
        raise ValidationError(f"max_cjk_run must be a positive integer, got {max_cjk_run!r}")
    return f" ?{CJK_CLASS}{{1,{max_cjk_run}}}"


def build_pre_tokenizer(max_cjk_run: int | None = DEFAULT_MAX_CJK_RUN) -> pre_tokenizers.PreTokenizer:
    """The training and inference pre-tokenizer: CJK-run split, then GPT-2 byte-level regex split.

    ``max_cjk_run=None`` gives GPT-2's pre-tokenizer alone (no CJK split), for comparison: its
    memory on Chinese is what the split avoids (``bench/tokenizer_memory.py``).
    """
    if max_cjk_run is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(cjk_split_pattern(max_cjk_run)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def check_text_file(path: str | os.PathLike) -> int:
    """Check in one streaming pass (:func:`aquilachat.io.iter_blocks`) that ``path`` is a
    non-empty UTF-8 text file (``.gz`` or not); return its size in bytes as stored.

    A UTF-8 byte-order mark is allowed (and later dropped). Memory use is one 1 MiB block.

    Raises:
        DataError: the file is missing or a directory; empty or whitespace only; contains a NUL
            byte (binary); or is not valid UTF-8. The message names the file, and the line (1-based)
            of the first NUL byte or invalid byte sequence: ``path:line: what``.
    """
    path = Path(path)
    decoded = has_text = False
    for text in iter_blocks(path, block_bytes=_CHECK_BLOCK):
        decoded = True
        has_text = has_text or bool(text.strip())
    if not has_text:
        raise DataError(f"{path}: no text (whitespace only)" if decoded else f"{path}: empty file (no text)")
    return path.stat().st_size


def iter_text_batches(paths: Iterable[str | os.PathLike], *, chunk_chars: int = CHUNK_CHARS,
                      batch_texts: int = BATCH_TEXTS) -> Iterator[list[str]]:
    """Stream files as batches of text pieces for ``Tokenizer.train_from_iterator``.

    Consecutive whole lines (:func:`aquilachat.io.iter_lines`: line ends kept, ``\\r\\n`` read as
    ``\\n``, a BOM dropped) are joined into pieces of at most ``chunk_chars`` characters, so that
    blank lines and indentation reach the trainer as in the file; a longer line is cut into pieces
    of ``chunk_chars``. A batch holds at most ``batch_texts`` pieces, so at most
    ``batch_texts * chunk_chars`` characters are held.

    Raises:
        DataError: a file cannot be decoded as UTF-8 (check with :func:`check_text_file` first
            to fail before training starts).
    """
    batch: list[str] = []
    for path in paths:
        piece: list[str] = []
        size = 0
        for _, line in iter_lines(path, max_chars=chunk_chars):
            if piece and size + len(line) > chunk_chars:
                batch.append("".join(piece))
                piece, size = [], 0
                if len(batch) >= batch_texts:
                    yield batch
                    batch = []
            piece.append(line)
            size += len(line)
        if piece:
            batch.append("".join(piece))
    if batch:
        yield batch


def train_tokenizer(files: list[Path], *, vocab_size: int, out: Path | None, min_frequency: int = 2,
                    max_cjk_run: int | None = DEFAULT_MAX_CJK_RUN, skip_bad_files: bool = False,
                    on_skip: Callable[[Path, str], None] | None = None, show_progress: bool = False,
                    model_max_length: int = 2048) -> Tokenizer:
    """Train a byte-level BPE tokenizer on text files and save it in Aquila's layout.

    Args:
        files: UTF-8 text files, streamed in order.
        vocab_size: entries of the BPE vocabulary (``vocab.json``): ``<|endoftext|>`` at id 0, the
            256 byte symbols and ``vocab_size - 257`` merges. The tokenizer has ``vocab_size + 8``
            ids (Aquila: 100000 + 8). A corpus too small to give that many merges with
            ``min_frequency`` gives a smaller vocabulary; the specials then follow it directly.
        out: directory to write ``tokenizer.json``, ``vocab.json``, ``merges.txt``,
            ``special_tokens_map.json`` and ``tokenizer_config.json`` into (created if needed);
            ``None`` writes nothing.
        min_frequency: a pair seen fewer times than this (counted over the corpus) is not merged.
        max_cjk_run: longest CJK run kept as one pre-token (characters); see :func:`cjk_split_pattern`.
            ``None`` turns the split off (GPT-2's pre-tokenizer alone; unbounded memory on Chinese).
        skip_bad_files: skip (instead of raising on) files that are empty, binary or not UTF-8;
            each skip is reported as ``on_skip(path, reason)``.
        on_skip: called once per skipped file.
        show_progress: the ``tokenizers`` progress bar on stderr.
        model_max_length: written into ``tokenizer_config.json``.

    Returns:
        The trained :class:`~aquilachat.tokenizer.Tokenizer` (bos ``[CLS]``, eos ``</s>``, unk and
        pad ``<|endoftext|>``, as in Aquila's ``special_tokens_map.json``).

    Raises:
        ValidationError: ``vocab_size < 257``, ``min_frequency < 1`` or a bad ``max_cjk_run``.
        DataError: no input files, a missing file, a bad file without ``skip_bad_files``, or no
            usable file left after skipping. Messages name the file (and line).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValidationError(f"vocab_size must be an integer >= 257 (<|endoftext|> + 256 bytes), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValidationError(f"min_frequency must be a positive integer, got {min_frequency!r}")
    pre_tokenizer = build_pre_tokenizer(max_cjk_run)
    files = [Path(f) for f in files]
    if not files:
        raise DataError("no input files given")
    usable: list[Path] = []
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
        try:
            check_text_file(path)
        except DataError as exc:
            if not skip_bad_files:
                raise
            if on_skip is not None:
                on_skip(path, str(exc))
            continue
        usable.append(path)
    if not usable:
        raise DataError(f"no usable input: all {len(files)} file(s) were skipped as empty, binary or not UTF-8")

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(ENDOFTEXT, special=True, normalized=False)],  # trainer puts it at id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=show_progress,
    )
    backend.train_from_iterator(iter_text_batches(usable), trainer=trainer)
    base = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in AQUILA_SPECIAL_TOKENS])
    assert backend.token_to_id(ENDOFTEXT) == 0 and backend.token_to_id(AQUILA_SPECIAL_TOKENS[0]) == base

    tokenizer = Tokenizer(backend, special_tokens_map=dict(AQUILA_SPECIAL_TOKENS_MAP),
                          name_or_path=str(out) if out is not None else "", model_max_length=model_max_length)
    if out is not None:
        tokenizer.save(out)
    return tokenizer
