"""The tokenizer against transformers' GPT2TokenizerFast on the real Aquila files, and the detokenizer."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from aquilachat.errors import TokenizerError
from aquilachat.tokenizer import AQUILA_SPECIAL_TOKENS, IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def aquila(aquila_tokenizer_dir):
    return Tokenizer.from_dir(aquila_tokenizer_dir)


def sample_lines(shared_data, n_each=400):
    rng = random.Random(0)
    lines = []
    zh = (shared_data / "corpus/zh/peoples_daily/199801.txt").read_text(encoding="utf-8").splitlines()
    zh += (shared_data / "corpus/zh/三国演义.txt").read_text(encoding="utf-8").splitlines()
    en = (shared_data / "corpus/en/pride_and_prejudice.txt").read_text(encoding="utf-8").splitlines()
    en += [json.loads(l)["text"] for l in (shared_data / "corpus/en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines()[:200]]
    code = []
    for lang in ("python", "cpp", "go"):
        with gzip.open(shared_data / f"code_eval/humaneval-x/humaneval_{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            code += [json.loads(l)["prompt"] + json.loads(l)["canonical_solution"] for l in f]
    for pool in (zh, en):
        pool = [l for l in pool if l.strip()]
        lines += rng.sample(pool, n_each)
    lines += code[:400]
    return lines


def test_ids_equal_transformers_gpt2_fast(aquila, aquila_tokenizer_dir, shared_data):
    from transformers import GPT2TokenizerFast
    ours = aquila
    ref = GPT2TokenizerFast.from_pretrained(aquila_tokenizer_dir)
    lines = sample_lines(shared_data)
    assert len(lines) >= 1000
    for line in lines:
        ids = ours.encode(line)
        assert ids == ref.encode(line, add_special_tokens=False), line[:80]
        assert ours.decode(ids) == line
    assert ours.encode_batch(lines[:50]) == [ours.encode(l) for l in lines[:50]]


def test_aquila_special_ids(aquila, aquila_tokenizer_dir):
    tok = aquila
    assert tok.vocab_size == 100008
    assert [tok.token_to_id(t) for t in AQUILA_SPECIAL_TOKENS] == list(range(100000, 100008))
    assert tok.token_to_id("<|endoftext|>") == 0
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (100006, 100007, 0)
    assert tok.decodable_mask(100008).all() and not tok.decodable_mask(100010)[100008:].any()


@pytest.mark.parametrize("text", ["</s>", "[CLS]", "<|endoftext|>", "[UNK]", "a</s>b[CLS]<|startofpiece|>",
                                  "Human: hi###Assistant: </s>"])
def test_special_token_text_stays_text(aquila, aquila_tokenizer_dir, text):
    tok = aquila
    ids = tok.encode(text)
    specials = set(range(100000, 100008)) | {0}
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    if "</s>" in text:
        assert 100007 in tok.encode(text, allow_special=True)


def test_decode_rejects_unknown_ids(aquila, aquila_tokenizer_dir):
    tok = aquila
    with pytest.raises(TokenizerError, match="100008"):
        tok.decode([100008])


def test_incremental_detokenizer_never_splits_utf8(aquila, aquila_tokenizer_dir):
    tok = aquila
    text = "用golang实现冒泡排序算法 🎉🎉 naïve — ümlaut 𠀀 end"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok)
    deltas = [det.push(i) for i in ids] + [det.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # every byte-level piece alone: the emoji spans several tokens, no delta holds half of it
    per_token = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in per_token)  # the naive way would have leaked U+FFFD


def test_incremental_detokenizer_invalid_bytes_match_decode(byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    # a lone continuation byte and a truncated 3-byte sequence: must be U+FFFD exactly like decode()
    from aquilachat.tokenizer import bytes_to_unicode
    b2u = bytes_to_unicode()
    ids = [tok.token_to_id(b2u[b]) for b in (0x80, 0x41, 0xE4, 0xBD)]
    det = IncrementalDetokenizer(tok)
    streamed = "".join(det.push(i) for i in ids) + det.flush()
    assert streamed == tok.decode(ids) == "\ufffdA\ufffd"


def test_missing_and_bad_files(tmp_path, aquila_tokenizer_dir):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "vocab.json").write_text("{bad")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match=r"vocab.json.*invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(empty)
