"""aquilachat.io: every format reads to the same records and texts; every error names path:line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aquilachat.errors import DataError
from aquilachat.io import iter_blocks, iter_lines, iter_objects, iter_records, iter_texts, read_text

ROWS = [{"a": 1}, [1, 2], "text", None, 0, {"b": "你好\u2028world"}]  # \u2028: not a line end in JSON


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.lower().endswith(".gz") else data)
    return path


def _jsonl(rows, *, bom=False, crlf=False, blank_after=()) -> bytes:
    end = "\r\n" if crlf else "\n"
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r, ensure_ascii=False))
        if i in blank_after:
            lines.append("   ")
    text = end.join(lines) + end
    return ("\ufeff" if bom else "").encode() + text.encode("utf-8")


# ---------------------------------------------------------------------------- records
@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.JSONL.GZ", "d.data"])
@pytest.mark.parametrize("bom, crlf", [(False, False), (True, True), (True, False), (False, True)])
def test_jsonl_forms_read_the_same(tmp_path, name, bom, crlf):
    path = _write(tmp_path / name, _jsonl(ROWS, bom=bom, crlf=crlf, blank_after=(1,)))
    # every row is yielded (None, 0 and "" included) at its own line; the blank line 3 holds none
    assert list(iter_records(path)) == [(1, ROWS[0]), (2, ROWS[1]), (4, ROWS[2]), (5, None), (6, 0), (7, ROWS[5])]


@pytest.mark.parametrize("name", ["a.json", "a.json.gz", "a.jsonl"])
def test_json_array_elements_carry_their_lines(tmp_path, name):
    text = '\n[\n  {"a": 1},\n  {\n    "b": 2\n  },\n\n  {"c": 3}, "s"\n]\n'
    path = _write(tmp_path / name, b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert list(iter_records(path)) == [(3, {"a": 1}), (4, {"b": 2}), (8, {"c": 3}), (8, "s")]
    _write(path, b"[]")
    assert list(iter_records(path)) == []


@pytest.mark.parametrize("text, message", [
    ('[\n {"a": 1},\n {"b": }\n]', r"x\.json:3: invalid JSON: Expecting value"),
    ('[\n {"a": 1}\n {"b": 2}\n]', r"x\.json:3: invalid JSON: expected ',' or ']'"),
    ('[\n {"a": 1},\n {"b": 2}\n', r"x\.json: invalid JSON: .*the file ends inside the array"),
    ('[\n {"a": 1}\n]\n{"b": 2}\n', r"x\.json:4: unexpected data after the JSON array"),
])
def test_json_array_errors(tmp_path, text, message):
    path = _write(tmp_path / "x.json", text.encode())
    with pytest.raises(DataError, match=message):
        list(iter_records(path))


def test_bad_json_line_names_path_and_line(tmp_path):
    path = _write(tmp_path / "b.jsonl.gz", b'{"a": 1}\n\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(DataError, match=r"b\.jsonl\.gz:3: invalid JSON: Expecting ',' delimiter \(column 8\)"):
        list(iter_records(path))
    rows = list(iter_records(path, bad_rows="yield"))  # for skip_bad_rows: the caller counts it
    assert [line for line, _ in rows] == [1, 3, 4]
    assert rows[0][1] == {"a": 1} and rows[2][1] == {"a": 3}
    assert isinstance(rows[1][1], DataError) and str(rows[1][1]).startswith(f"{path}:3: invalid JSON")


def test_row_of_the_wrong_type_is_named(tmp_path):
    path = _write(tmp_path / "o.jsonl", b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"o\.jsonl:2: expected a JSON object, got list"):
        list(iter_objects(path))
    _write(path, b'"x"\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"o\.jsonl:2: field 'text' must be a string, got int"):
        list(iter_texts(path))
    _write(path, b'"x"\n{"body": "y"}\n')
    with pytest.raises(DataError, match=r"o\.jsonl:2: missing field 'text' \(keys: body\)"):
        list(iter_texts(path))
    _write(path, b'"x"\n7\n')
    with pytest.raises(DataError, match=r"o\.jsonl:2: expected a JSON string or an object with field 'text', got int"):
        list(iter_texts(path))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                  lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                                  max_leaves=6), max_size=8),
       bom=st.booleans(), crlf=st.booleans(), gz=st.booleans(), array=st.booleans())
def test_any_json_values_round_trip(tmp_path_factory, rows, bom, crlf, gz, array):
    """Oracle: ``json.dumps``. Whatever the container, compression, BOM or line ends, every value
    comes back, in order, at the line it was written on."""
    path = tmp_path_factory.mktemp("rt") / ("r.json" + (".gz" if gz else ""))
    if array:
        body = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"
        want = [(i + 2, r) for i, r in enumerate(rows)]
    else:
        assume(not (rows and isinstance(rows[0], list)))  # that file starts with '[': a JSON array
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        want = [(i + 1, r) for i, r in enumerate(rows)]
    if crlf:
        body = body.replace("\n", "\r\n")
    _write(path, ("\ufeff" if bom else "").encode() + body.encode("utf-8"))
    assert list(iter_records(path)) == want


# ---------------------------------------------------------------------------- texts
def test_texts_of_plain_and_record_files(tmp_path):
    txt = _write(tmp_path / "a.txt.gz", "\ufeff第一行\r\n\r\n  \nsecond\rx\n".encode())
    assert read_text(txt) == "第一行\n\n  \nsecond\rx\n"  # a lone \r is a character, not a line end
    assert list(iter_texts(txt)) == [(1, "第一行\n\n  \nsecond\rx\n")]
    assert list(iter_texts(txt, per_line=True)) == [(1, "第一行"), (2, ""), (3, "  "), (4, "second\rx")]
    rec = _write(tmp_path / "b.json", json.dumps(["p", {"text": "q", "other": 1}]).encode())
    assert list(iter_texts(rec)) == [(1, "p"), (1, "q")]
    code = _write(tmp_path / "c.jsonl", b'{"prompt": "def f():", "canonical_solution": "\\n    return 1"}\n')
    assert list(iter_texts(code, field=["prompt", "canonical_solution"])) == [(1, "def f():\n    return 1")]
    bad = _write(tmp_path / "d.jsonl", b'"ok"\n{"text": 1}\n{oops\n"fine"\n')
    got = list(iter_texts(bad, bad_rows="yield"))
    assert [line for line, _ in got] == [1, 2, 3, 4] and got[0][1] == "ok" and got[3][1] == "fine"
    assert [str(e).split(": ", 1)[0] for _, e in got[1:3]] == [f"{bad}:2", f"{bad}:3"]


# ---------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("content, message", [
    (b"good line\nbad \xff line\n", r"f\.txt:2: not UTF-8 text \(invalid byte 0xff at byte offset 14\)"),
    (b"one\ntwo\nthr\x00ee", r"f\.txt:3: NUL byte at byte offset 11; binary file, not text"),
    (b"ends in half a character \xe4\xb8", r"f\.txt:1: not UTF-8 text \(truncated character at end of file\)"),
    ("第一行\n第二行\n".encode() + "第".encode()[:2] + b"x\n", r"f\.txt:3: not UTF-8 text \(invalid byte 0xe7"),
])
@pytest.mark.parametrize("block_bytes", [1, 2, 3, 4, 7, 1 << 20])
def test_bad_bytes_name_line_and_offset_whatever_the_block(tmp_path, content, message, block_bytes):
    path = _write(tmp_path / "f.txt", content)
    with pytest.raises(DataError, match=message):
        list(iter_blocks(path, block_bytes=block_bytes))
    with pytest.raises(DataError, match=message):
        list(iter_lines(path, block_bytes=block_bytes))


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        list(iter_records(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r": not a regular file"):
        list(iter_lines(tmp_path))
    _write(tmp_path / "n.jsonl.gz", b"")
    (tmp_path / "n.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"n\.jsonl\.gz: not a valid gzip file"):
        list(iter_records(tmp_path / "n.jsonl.gz"))
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-12])  # cut short
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: not a valid gzip file \(Compressed file ended"):
        list(iter_records(tmp_path / "t.jsonl.gz"))


@pytest.mark.parametrize("block_bytes", [1, 2, 5, 11, 1 << 20])
def test_long_lines_come_in_pieces(tmp_path, block_bytes):
    raw = "\ufeffline one\r\nline two\n\n".encode() + ("长" * 25).encode() + b"\r\nab\r\nlast"
    path = _write(tmp_path / "l.txt", raw)
    pieces = list(iter_lines(path, max_chars=10, block_bytes=block_bytes))
    assert all(len(p) <= 10 for _, p in pieces)
    assert "".join(p for _, p in pieces) == "line one\nline two\n\n" + "长" * 25 + "\nab\nlast"
    assert pieces[:4] == [(1, "line one\n"), (2, "line two\n"), (3, "\n"), (4, "长" * 10)]
    assert [n for n, _ in pieces] == [1, 2, 3, 4, 4, 4, 5, 6]
    assert list(iter_lines(path, block_bytes=block_bytes)) == list(iter_lines(path))
