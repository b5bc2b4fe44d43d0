"""Reading data files: one reader for records and texts, one error format.

Every data file the toolkit reads (training sets, evaluation sets, tokenizer samples and corpora)
goes through this module, so each command accepts the same files and reports problems the same
way:

- **Compression**: a name ending in ``.gz`` is gzip-decompressed, streamed.
- **Encoding**: UTF-8. A byte-order mark at the start is dropped. A line that is not UTF-8, or that
  holds a NUL byte (a binary file), is an error naming the line and byte offset.
- **Line ends**: ``\\n`` or ``\\r\\n`` (read as ``\\n``); a lone ``\\r`` is kept as a character.
  Lines are numbered from 1, counting ``\\n``.
- **Records** (:func:`iter_records`): a file whose first non-blank character is ``[`` is one JSON
  array, each element reported at the line where it starts; any other file is JSON Lines, one
  JSON value per line, blank lines skipped. So a ``.json`` file that really holds JSON Lines
  (BELLE's ``eval_set.json``) reads correctly, and so does a JSON array in a ``.jsonl`` file (but
  JSON Lines whose first row is itself an array read as an array: rows are objects or strings).
- **Texts** (:func:`iter_texts`): a ``*.jsonl`` or ``*.json`` file (``.gz`` or not) holds records,
  each a JSON string or an object with a string field; any other file is plain text, read as one
  document or as one text per line.

Errors are :class:`~aquilachat.errors.DataError` with the message ``path:line: what``
(``path: what`` for a whole-file problem: missing, not gzip, no JSON array end). Nothing is
skipped silently: blank lines of JSON Lines hold no record; every other row is yielded or raises
(``bad_rows="yield"`` hands a bad row to the caller as a ``DataError`` value instead, for
training's ``skip_bad_rows``, which counts what it skips).
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from .errors import DataError

__all__ = ["RECORD_SUFFIXES", "BLOCK_BYTES", "is_records_file", "iter_blocks", "iter_lines", "read_text", "iter_records", "iter_objects",
           "iter_texts"]

#: Names (before an optional ``.gz``) that :func:`iter_texts` reads as records, not plain text.
RECORD_SUFFIXES = (".jsonl", ".json")

#: Bytes read (and checked) at a time.
BLOCK_BYTES = 1 << 20

BadRows = Literal["raise", "yield"]


def is_records_file(path: str | os.PathLike) -> bool:
    """True for ``*.jsonl`` / ``*.json`` names, gzipped or not (the others are plain text)."""
    return Path(path).name.lower().removesuffix(".gz").endswith(RECORD_SUFFIXES)


def _open(path: Path) -> IO[bytes]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def iter_blocks(path: str | os.PathLike, *, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """Yield the decoded text of a file in blocks of at most ``block_bytes`` bytes (a BOM dropped,
    line ends as stored). Checks every byte in C-speed passes: memory holds one block.

    Raises:
        DataError: a missing file, a bad gzip stream, a NUL byte, or bytes that are not UTF-8
            (``path:line: ...`` with the byte offset in the decompressed stream).
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    lines_before, offset, at_start = 0, 0, True  # newlines and bytes in the blocks already read
    try:
        with _open(path) as f:
            while block := f.read(block_bytes):
                nul = block.find(b"\x00")
                if nul >= 0:
                    line = lines_before + block.count(b"\n", 0, nul) + 1
                    raise DataError(f"{path}:{line}: NUL byte at byte offset {offset + nul}; binary file, not text")
                pending = decoder.getstate()[0]  # the bytes of a character cut by the block boundary
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as exc:
                    bad = exc.start - len(pending)  # position in this block (negative: in `pending`)
                    line = lines_before + (block.count(b"\n", 0, bad) if bad > 0 else 0) + 1
                    raise DataError(f"{path}:{line}: not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x} "
                                    f"at byte offset {offset + bad})") from None
                lines_before += block.count(b"\n")
                offset += len(block)
                if at_start and text:
                    text, at_start = text.removeprefix("\ufeff"), False
                if text:
                    yield text
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lines_before + 1}: not UTF-8 text (truncated character at end of file)") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc})") from None


def iter_lines(path: str | os.PathLike, *, max_chars: int | None = None,
               block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for each line of a text file, its line end kept (``\\n``;
    ``\\r\\n`` is read as ``\\n``).

    Streams (:func:`iter_blocks`): memory holds one block and one line, or with ``max_chars`` one
    piece of at most ``max_chars`` characters (a longer line comes as several pieces, each with
    the line's number; their concatenation is the line).

    Raises:
        DataError: as :func:`iter_blocks`.
    """
    if max_chars is not None and max_chars < 2:
        raise ValueError(f"max_chars must be at least 2, got {max_chars}")
    lineno, carry = 1, ""
    for block in iter_blocks(path, block_bytes=block_bytes):
        *lines, carry = (carry + block).split("\n")
        for line in lines:
            line = (line[:-1] if line.endswith("\r") else line) + "\n"
            while max_chars is not None and len(line) > max_chars:
                yield lineno, line[:max_chars]
                line = line[max_chars:]
            yield lineno, line
            lineno += 1
        while max_chars is not None and len(carry) > max_chars:
            cut = max_chars - 1 if carry[max_chars - 1] == "\r" else max_chars  # keep \r\n together
            yield lineno, carry[:cut]
            carry = carry[cut:]
    if carry:
        yield lineno, carry


def read_text(path: str | os.PathLike) -> str:
    """The whole file as one string (``\\r\\n`` read as ``\\n``, BOM dropped).

    Raises:
        DataError: as :func:`iter_lines`.
    """
    return "".join(text for _, text in iter_lines(path))


def _invalid_json(path: Path, line: int, exc: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{line}: invalid JSON: {exc.msg} (column {exc.colno})")


def _line_of(text: str, pos: int, start_pos: int, start_line: int) -> int:
    return start_line + text.count("\n", start_pos, pos)


def _iter_json_array(path: Path, text: str, first_line: int) -> Iterator[tuple[int, Any]]:
    """Elements of the JSON array ``text`` (which starts on ``first_line`` of ``path``), each with
    the line where it starts; decoded one element at a time, so a syntax error names its line."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(text.index("[") + 1)
    line_pos, line = 0, first_line
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        line = _line_of(text, pos, line_pos, line)
        line_pos = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{_line_of(text, exc.pos, line_pos, line)}: invalid JSON: {exc.msg} "
                            "(the JSON array cannot be read past this point)") from None
        yield line, value
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            after = skip_ws(pos + 1)
            if after < n:
                raise DataError(f"{path}:{_line_of(text, after, line_pos, line)}: unexpected data after the JSON array")
            return
        where = f"{path}:{_line_of(text, pos, line_pos, line)}" if pos < n else f"{path}"
        raise DataError(f"{where}: invalid JSON: expected ',' or ']' in the array"
                        + ("" if pos < n else " (the file ends inside the array)"))


def iter_records(path: str | os.PathLike, *, bad_rows: BadRows = "raise") -> Iterator[tuple[int, Any]]:
    """Yield ``(line, value)`` for each row of a JSON Lines file or element of a JSON array
    (the form is told from the first non-blank character, not the name; see the module docstring).

    Args:
        bad_rows: ``"raise"`` on a JSON Lines row that is not valid JSON, or ``"yield"`` it as
            ``(line, DataError)`` so that the caller can count and skip it. A JSON array that is
            malformed raises either way (nothing after the error can be read).

    Raises:
        DataError: as :func:`iter_lines`; invalid JSON (``path:line: invalid JSON: ...``).
    """
    path = Path(path)
    lines = iter_lines(path)
    for lineno, text in lines:
        if not text.strip():
            continue
        if text.lstrip().startswith("["):
            yield from _iter_json_array(path, text + "".join(t for _, t in lines), lineno)
            return
        break
    else:
        return
    for lineno, text in _chain_first(lineno, text, lines):
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text.removesuffix("\n"))  # so an error's column is on this line
        except json.JSONDecodeError as exc:
            err = _invalid_json(path, lineno, exc)
            if bad_rows == "raise":
                raise err from None
            yield lineno, err


def _chain_first(lineno: int, text: str, rest: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    yield lineno, text
    yield from rest


def iter_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, object)`` for each record of ``path`` (:func:`iter_records`), every one of
    which must be a JSON object.

    Raises:
        DataError: as :func:`iter_records`; a row that is not an object
            (``path:line: expected a JSON object, got list``).
    """
    for lineno, row in iter_records(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _text_of(row: Any, fields: Sequence[str], path: Path, lineno: int) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON string or an object with field {fields[0]!r}, "
                        f"got {type(row).__name__}")
    parts = []
    for key in fields:
        if key not in row:
            raise DataError(f"{path}:{lineno}: missing field {key!r} (keys: {', '.join(sorted(row)) or 'none'})")
        if not isinstance(row[key], str):
            raise DataError(f"{path}:{lineno}: field {key!r} must be a string, got {type(row[key]).__name__}")
        parts.append(row[key])
    return "".join(parts)


def iter_texts(path: str | os.PathLike, *, field: str | Sequence[str] = "text", per_line: bool = False,
               bad_rows: BadRows = "raise") -> Iterator[tuple[int, str | DataError]]:
    """Yield ``(line, text)`` for each text of ``path``.

    A records file (:func:`is_records_file`) gives one text per record: a JSON string is the text
    itself; an object gives its ``field`` (several names are joined in order, as
    ``["prompt", "canonical_solution"]``). Any other file is plain text: the whole file as one text
    (line 1), or with ``per_line`` one text per line, the line end removed.

    Args:
        bad_rows: ``"raise"`` on a bad record (invalid JSON, wrong type, missing or non-string
            field), or ``"yield"`` it as ``(line, DataError)``.

    Raises:
        DataError: as :func:`iter_records`; ``path:line: missing field 'text' (keys: ...)``,
            ``path:line: field 'text' must be a string, got int``.
    """
    path = Path(path)
    fields = [field] if isinstance(field, str) else list(field)
    if not is_records_file(path):
        if per_line:
            for lineno, text in iter_lines(path):
                yield lineno, text.removesuffix("\n")
        else:
            yield 1, read_text(path)
        return
    for lineno, row in iter_records(path, bad_rows=bad_rows):
        if not isinstance(row, DataError):
            try:
                row = _text_of(row, fields, path, lineno)
            except DataError as exc:
                if bad_rows == "raise":
                    raise
                row = exc
        yield lineno, row
