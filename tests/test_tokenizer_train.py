"""Tokenizer training (``aquilachat tokenizer train``): Aquila layout, transformers gives identical
ids, exact round trip, CJK-run splitting, streaming, and bad input files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquilachat import tokenizer_train
from aquilachat.cli import main
from aquilachat.errors import DataError, ValidationError
from aquilachat.tokenizer import AQUILA_SPECIAL_TOKENS, Tokenizer
from aquilachat.tokenizer_train import (check_text_file, cjk_split_pattern, iter_text_batches,
                                        train_tokenizer)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 1500  # small: the whole module trains in a few seconds on 2 cores
K = 6  # max_cjk_run of the shared-data tokenizer (smaller than the default to exercise the split)


def shared_data_dir() -> Path | None:
    """``$AQUILACHAT_SHARED_DATA``, ``<repo>/../shared/data`` or ``/work/shared/data``; None if absent."""
    for candidate in (os.environ.get("AQUILACHAT_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _lines(path: Path, start: int, stop: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line for i, line in enumerate(f) if start <= i < stop]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Training files cut from the shared Chinese + English corpus (into a temporary directory),
    and held-out text from other parts of it."""
    data = shared_data_dir()
    pd = data / "corpus" / "zh" / "peoples_daily" / "199801.txt" if data else None
    if pd is None or not pd.exists():
        pytest.skip("../shared/data/corpus is not present")
    tmp = tmp_path_factory.mktemp("tok_corpus")
    zh = tmp / "zh.txt"
    zh.write_text("".join(_lines(pd, 0, 1500)), encoding="utf-8")  # about 250 KB
    en = tmp / "en.txt"
    en.write_text("".join(_lines(data / "corpus" / "en" / "tinyshakespeare" / "input.txt", 0, 6000)), encoding="utf-8")
    c4 = [json.loads(line)["text"] for line in _lines(data / "corpus" / "en" / "c4_demo.jsonl", 250, 260)]
    held_out = [line.rstrip("\n") for line in _lines(pd, 19000, 19030)] + c4 + [
        "混合文本 mixed text: 我用Python写代码，def f(x):\n\treturn x ** 2  # 平方\r\n",
        "  leading spaces,\ttabs and\u00a0NBSP; emoji 🦅🐍; 日本語のテキスト; 한국어 텍스트; ＡＢＣ１２３",
        "</s> [CLS] <|endoftext|> are plain text here",
    ]
    return {"files": [zh, en], "held_out": held_out}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_out")
    tok = train_tokenizer(corpus["files"], vocab_size=VOCAB, out=out, max_cjk_run=K)
    return tok, out


def test_files_and_aquila_layout(trained):
    tok, out = trained
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB and vocab["<|endoftext|>"] == 0
    assert sorted(vocab.values()) == list(range(VOCAB))
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len([m for m in merges if not m.startswith("#")]) == VOCAB - 257  # <|endoftext|> + 256 bytes
    assert tok.vocab_size == VOCAB + 8
    assert [tok.token_to_id(t) for t in AQUILA_SPECIAL_TOKENS] == list(range(VOCAB, VOCAB + 8))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (VOCAB + 6, VOCAB + 7, 0, 0)
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "[CLS]", "eos_token": "</s>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    pre = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    assert pre["pretokenizers"][0] == {"type": "Split", "pattern": {"Regex": cjk_split_pattern(K)},
                                       "behavior": "Isolated", "invert": False}
    assert pre["pretokenizers"][1]["type"] == "ByteLevel" and pre["pretokenizers"][1]["use_regex"] is True


def test_transformers_gives_identical_ids(trained, corpus):
    transformers = pytest.importorskip("transformers")
    tok, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    texts = corpus["held_out"]
    for text in texts:
        # transformers matches special-token text (the last held-out text has some); so does allow_special
        ids = tok.encode(text, allow_special=True)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:40]
        assert hf.decode(ids) == text
    assert tok.encode(texts[-1], allow_special=True)[0] == tok.eos_token_id
    assert hf(texts[:3], add_special_tokens=False)["input_ids"] == [tok.encode(t) for t in texts[:3]]


def test_reload_and_round_trip_held_out(trained, corpus):
    tok, out = trained
    again = Tokenizer.from_dir(out)
    for text in corpus["held_out"]:
        ids = tok.encode(text)
        assert again.encode(text) == ids
        assert tok.decode(ids) == text
        assert max(ids) < VOCAB  # user text never becomes a special token
    # the learned vocabulary compresses held-out Chinese news: fewer tokens than UTF-8 bytes
    zh = "".join(corpus["held_out"][:30])
    assert len(tok.encode(zh)) < 0.6 * len(zh.encode("utf-8"))


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=60))
def test_round_trip_any_text(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_long_cjk_runs_are_cut_every_k_characters(trained):
    """A run of n Han characters tokenizes exactly as its ceil(n/K) chunks do one by one: no token
    spans a chunk boundary, and no learned token holds more than K CJK characters."""
    tok, _ = trained
    run = "中华人民共和国国务院总理在人民大会堂发表重要讲话指出我们要坚持改革开放"
    chunks = [run[i:i + K] for i in range(0, len(run), K)]
    assert tok.encode(run) == [i for c in chunks for i in tok.encode(c)]
    assert tok.encode(" " + run)[: len(tok.encode(" " + chunks[0]))] == tok.encode(" " + chunks[0])
    cjk = re.compile(tokenizer_train.CJK_CLASS.replace(r"\p{Han}", r"\u3400-\u9fff\uf900-\ufaff")
                     .replace(r"\p{Hiragana}", r"\u3040-\u309f").replace(r"\p{Katakana}", r"\u30a0-\u30ff")
                     .replace(r"\p{Hangul}", r"\uac00-\ud7af"))
    longest = max(len(cjk.findall(tok.decode([i]))) for i in range(VOCAB))
    assert 2 <= longest <= K


def test_default_split_and_no_split(tmp_path):
    text = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳" * 40 + "\n"
    f = tmp_path / "qzw.txt"
    f.write_text(text, encoding="utf-8")
    split = train_tokenizer([f], vocab_size=400, out=None)
    whole = train_tokenizer([f], vocab_size=400, out=None, max_cjk_run=None)
    # A 32-character line repeated: without the split BPE may learn tokens longer than 16 characters.
    # (So small a corpus gives fewer than 400 - 257 merges; the specials follow the learned vocabulary.)
    longest = lambda t: max(len(t.decode([i])) for i in range(t.vocab_size - 8))  # noqa: E731
    assert longest(split) <= tokenizer_train.DEFAULT_MAX_CJK_RUN < longest(whole)
    for t in (split, whole):
        assert t.decode(t.encode(text)) == text


# --------------------------------------------------------------------------- streaming
def test_iter_text_batches_streams_whole_lines(tmp_path):
    a = tmp_path / "a.txt"
    a.write_bytes("\ufeffline one\r\nline two\n\n".encode("utf-8") + ("长" * 25).encode("utf-8") + b"\nlast")
    b = tmp_path / "b.txt"
    b.write_text("b1\nb2\n", encoding="utf-8")
    batches = list(iter_text_batches([a, b], chunk_chars=10, batch_texts=2))
    pieces = [p for batch in batches for p in batch]
    assert all(len(batch) <= 2 for batch in batches)
    assert all(len(p) <= 10 for p in pieces)  # whole lines up to chunk_chars, long lines cut at chunk_chars
    assert "".join(pieces) == "line one\nline two\n\n" + "长" * 25 + "\nlast" + "b1\nb2\n"
    assert pieces[:3] == ["line one\n", "line two\n\n", "长" * 10]  # lines joined while they fit


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content, message", [
    (b"", r"empty\.txt: empty file"),
    (b" \n\n\t\n", r"empty\.txt: no text \(whitespace only\)"),
    (b"good line\nbad \xff line\n", r"empty\.txt:2: not UTF-8 text \(invalid byte 0xff at byte offset 14\)"),
    (b"one\ntwo\nthr\x00ee", r"empty\.txt:3: NUL byte at byte offset 11; binary file"),
    (b"ends in half a character \xe4\xb8", r"empty\.txt:1: not UTF-8 text \(truncated character"),
])
def test_check_text_file_errors(tmp_path, content, message):
    (tmp_path / "empty.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        check_text_file(tmp_path / "empty.txt")


def test_check_text_file_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_train, "_CHECK_BLOCK", 4)  # characters split across 4-byte blocks
    good = "第一行\n第二行 ok\n第三行\n".encode("utf-8")
    (tmp_path / "g.txt").write_bytes(good)
    assert check_text_file(tmp_path / "g.txt") == len(good)
    bad = "第一行\n第二行\n".encode("utf-8") + "第".encode("utf-8")[:2] + b"x\n"
    (tmp_path / "b.txt").write_bytes(bad)
    with pytest.raises(DataError, match=r"b\.txt:3: not UTF-8 text"):
        check_text_file(tmp_path / "b.txt")


def test_bad_files_raise_or_are_skipped(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("你好，世界。hello world\n" * 20, encoding="utf-8")
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x7fELF\x00\x00\x01")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"model\.bin:1: NUL byte"):
        train_tokenizer([good, binary], vocab_size=300, out=None)
    skipped = []
    tok = train_tokenizer([good, binary, latin1, empty], vocab_size=300, out=None, skip_bad_files=True,
                          on_skip=lambda path, reason: skipped.append(path.name))
    assert skipped == ["model.bin", "latin1.txt", "empty.txt"]
    assert tok.decode(tok.encode("你好 café")) == "你好 café"
    with pytest.raises(DataError, match=r"no usable input: all 2 file\(s\) were skipped"):
        train_tokenizer([binary, empty], vocab_size=300, out=None, skip_bad_files=True)
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        train_tokenizer([good, tmp_path / "missing.txt"], vocab_size=300, out=None, skip_bad_files=True)
    with pytest.raises(DataError, match="no input files"):
        train_tokenizer([], vocab_size=300, out=None)


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 256}, "vocab_size must be an integer >= 257"),
    ({"vocab_size": 300, "min_frequency": 0}, "min_frequency must be a positive integer"),
    ({"vocab_size": 300, "max_cjk_run": 0}, "max_cjk_run must be a positive integer"),
])
def test_bad_parameters(tmp_path, kwargs, message):
    f = tmp_path / "t.txt"
    f.write_text("text\n", encoding="utf-8")
    with pytest.raises(ValidationError, match=message):
        train_tokenizer([f], out=None, **kwargs)


# --------------------------------------------------------------------------- command line
def test_cli_train(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("北京欢迎你。Beijing welcomes you.\n" * 50, encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(good), str(bad), "--vocab-size", "300", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.txt:1: NUL byte" in err and not out.exists()
    assert main(["tokenizer", "train", "--input", str(good), str(bad), "--vocab-size", "280", "--out", str(out),
                 "--skip-bad-files", "--max-cjk-run", "4"]) == 0
    captured = capsys.readouterr()
    assert "skipped " in captured.err and "bad.txt" in captured.err
    assert "280-entry BPE vocabulary + 8 special tokens = 288 ids; used 1 file(s), skipped 1" in captured.out
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 288 and tok.decode(tok.encode("北京欢迎你")) == "北京欢迎你"
