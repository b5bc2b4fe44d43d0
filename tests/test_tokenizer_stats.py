"""Tokenizer comparison (``aquilachat tokenizer stats``): hand-counted samples, the four loaders,
bad input, and the real tokenizers of ``../shared/data`` against their published ids."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import sys
from pathlib import Path

import pytest

from aquilachat.cli import main
from aquilachat.errors import DataError, TokenizerError
from aquilachat.tokenizer import bytes_to_unicode
from aquilachat.tokenizer_stats import (TIKTOKEN_PATTERNS, compute_stats, format_markdown, load_token_counter,
                                        read_samples, read_tiktoken_ranks, stats_to_json)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$AQUILACHAT_SHARED_DATA``, ``<repo>/../shared/data`` or ``/work/shared/data``; None if absent."""
    for candidate in (os.environ.get("AQUILACHAT_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def shared_tokenizers() -> Path:
    data = shared_data_dir()
    if data is None or not (data / "tokenizers").is_dir():
        pytest.skip("../shared/data/tokenizers is not present")
    return data / "tokenizers"


# --------------------------------------------------------------------------- a hand-countable tokenizer
# 256 byte symbols plus three merges, in merge order: h+e -> he, l+l -> ll, he+ll -> hell.
MERGES = [(b"h", b"e"), (b"l", b"l"), (b"he", b"ll")]
# The samples and their token counts by hand, for the byte-level BPE above (GPT-2 and cl100k regexes
# give the same pieces here):
#   "hello world" -> "hello" | " world":  hello: h e l l o -> he l l o -> he ll o -> hell o = 2 tokens;
#                                          " world": 6 bytes, no merge applies   = 6 tokens   -> 8
#   "hell"        -> hell                                                        = 1 token    -> 1
#   "中文"        -> 6 UTF-8 bytes (e4 b8 ad e6 96 87), no merge                 = 6 tokens
#   "x = 1"       -> GPT-2: "x" | " =" | " 1" = 1 + 2 + 2; cl100k: "x" | " =" | " " | "1" = 1+2+1+1 -> 5
SAMPLES = {"en": ["hello world", "", "hell"], "zh": ["中文"], "code": ["x = 1"]}
HAND = {  # samples, characters, UTF-8 bytes, tokens (blank samples are not samples)
    "en": (2, 11 + 4, 11 + 4, 8 + 1),
    "zh": (1, 2, 6, 6),
    "code": (1, 5, 5, 5),
}
# The same samples with a SentencePiece *char* model: one token per character, a space becomes
# "▁", plus the "▁" dummy prefix at the start of each text:
#   "hello world" -> ▁ h e l l o ▁ w o r l d = 12;  "hell" -> ▁ h e l l = 5;  "中文" -> ▁ 中 文 = 3;
#   "x = 1" -> ▁ x ▁ = ▁ 1 = 6.  Vocabulary: <unk> <s> </s> + 13 distinct characters = 16.
HAND_SPM_TOKENS = {"en": 12 + 5, "zh": 3, "code": 6}


def _write_bpe_dir(path: Path) -> Path:
    b2u = bytes_to_unicode()
    u = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    vocab = {u(bytes([b])): b for b in range(256)}
    for a, b in MERGES:
        vocab[u(a + b)] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{u(a)} {u(b)}\n" for a, b in MERGES), encoding="utf-8")
    return path


def _write_tiktoken(path: Path) -> Path:
    ranks = [bytes([b]) for b in range(256)] + [a + b for a, b in MERGES]
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    return path


def _write_spm_char_model(path: Path) -> Path:
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "hell", "中文", "x = 1"]), model_writer=out,
                                   model_type="char", vocab_size=100, hard_vocab_limit=False, character_coverage=1.0,
                                   normalization_rule_name="identity", minloglevel=2)
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture()
def bpe_dir(tmp_path) -> Path:
    return _write_bpe_dir(tmp_path / "tiny_bpe")


def _check_hand_counts(row, tokens=None):
    for lang, (n, chars, nbytes, hand_tokens) in HAND.items():
        tok = hand_tokens if tokens is None else tokens[lang]
        s = row.languages[lang]
        assert (s.samples, s.chars, s.bytes, s.tokens) == (n, chars, nbytes, tok), lang
        assert s.avg_tokens == pytest.approx(tok / n)
        assert s.chars_per_token == pytest.approx(chars / tok)
        assert s.bytes_per_token == pytest.approx(nbytes / tok)


def test_hand_counted_stats_bpe_dir_and_tiktoken(bpe_dir, tmp_path):
    pytest.importorskip("tiktoken")
    samples = {k: [t for t in v if t] for k, v in SAMPLES.items()}
    counters = [load_token_counter(bpe_dir, name="bpe"), load_token_counter(_write_tiktoken(tmp_path / "tiny.tiktoken"))]
    assert [(c.name, c.kind, c.vocab_size) for c in counters] == [("bpe", "hf", 259), ("tiny", "tiktoken", 259)]
    rows = compute_stats(counters, samples)
    for row in rows:
        _check_hand_counts(row)
    # en: 9 tokens / 2 samples = 4.5 tokens per sample; 15 chars / 9 tokens = 1.667 chars per token
    md = format_markdown(rows, baseline="bpe")
    assert "| bpe | hf | 259 | 4.5 | 6.0 | 5.0 |" in md
    assert "| bpe | 1.667 | 1.667 | 0.333 | 1.000 | 1.000 | 1.000 |" in md
    assert "| tiny | 1.000 | 1.000 | 1.000 |" in md  # ratio to the baseline
    js = stats_to_json(rows)
    assert js["samples"]["zh"] == {"samples": 1, "chars": 2, "bytes": 6}
    assert js["tokenizers"][1]["languages"]["en"]["avg_tokens_per_sample"] == 4.5


def test_hand_counted_stats_sentencepiece(tmp_path):
    counter = load_token_counter(_write_spm_char_model(tmp_path / "char.model"))
    assert (counter.kind, counter.vocab_size) == ("sentencepiece", 16)
    [row] = compute_stats([counter], {k: [t for t in v if t] for k, v in SAMPLES.items()})
    _check_hand_counts(row, HAND_SPM_TOKENS)


def test_tokenizer_json_file(bpe_dir, tmp_path):
    from aquilachat.tokenizer import Tokenizer
    Tokenizer.from_dir(bpe_dir).save(tmp_path / "saved")
    counter = load_token_counter(tmp_path / "saved" / "tokenizer.json", name="json")
    [row] = compute_stats([counter], {k: [t for t in v if t] for k, v in SAMPLES.items()})
    _check_hand_counts(row)


def test_cli_stats_json_and_markdown(bpe_dir, tmp_path, capsys):
    en = tmp_path / "en.jsonl"
    en.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SAMPLES["en"]), encoding="utf-8")
    zh = tmp_path / "zh.txt"
    zh.write_text("中文\n\n", encoding="utf-8")
    code = tmp_path / "code.jsonl.gz"
    with gzip.open(code, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "x =", "canonical_solution": " 1"}) + "\n")
    args = ["tokenizer", "stats", "--tokenizer", f"tiny={bpe_dir}", "--en", str(en), "--zh", str(zh),
            "--code", str(code), "--code-field", "prompt+canonical_solution"]
    assert main(args + ["--format", "json"]) == 0
    js = json.loads(capsys.readouterr().out)
    langs = js["tokenizers"][0]["languages"]
    assert {k: (v["samples"], v["tokens"]) for k, v in langs.items()} == {k: (v[0], v[3]) for k, v in HAND.items()}
    assert main(args) == 0
    assert "| tiny | hf | 259 | 4.5 | 6.0 | 5.0 |" in capsys.readouterr().out
    assert main(args[:-4] + ["--samples", "1"] + ["--format", "json"]) == 0  # first sample only
    assert json.loads(capsys.readouterr().out)["samples"]["en"] == {"samples": 1, "chars": 11, "bytes": 11}


# --------------------------------------------------------------------------- samples and bad input
def test_read_samples_formats(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"prompt": "def f():", "canonical_solution": "\\n    return 1\\n"}\n\n"plain string"\n', encoding="utf-8")
    assert read_samples([p], field="prompt+canonical_solution") == ["def f():\n    return 1\n", "plain string"]
    t = tmp_path / "b.txt"
    t.write_bytes("\ufeff第一行\r\n\r\n  \nsecond\n".encode("utf-8"))
    assert read_samples([t]) == ["第一行", "second"]
    assert read_samples([t, p], field="prompt+canonical_solution", limit=3) == ["第一行", "second", "def f():\n    return 1\n"]


@pytest.mark.parametrize("content, message", [
    (b"ok\n\xff\xfe\n", r"bad\.txt:2: not UTF-8"),
    (b"ok\nab\x00c\n", r"bad\.txt:2: NUL byte"),
    (b"", r"no samples in .*bad\.txt"),
    (b"\n \n", r"no samples in .*bad\.txt"),
])
def test_read_samples_bad_text(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_samples([tmp_path / "bad.txt"])


def test_read_samples_bad_jsonl(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.jsonl:2: missing field 'text' \(keys: prompt\)"):
        read_samples([p])
    p.write_text('{"text": "a"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'text' must be a string, got int"):
        read_samples([p])
    p.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.jsonl:2: invalid JSON"):
        read_samples([p])
    g = tmp_path / "s.jsonl.gz"
    g.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"s\.jsonl\.gz: not a valid gzip file"):
        read_samples([g])
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        read_samples([tmp_path / "missing.txt"])


def test_cli_bad_input_is_one_line(bpe_dir, tmp_path, capsys):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    assert main(["tokenizer", "stats", "--tokenizer", str(bpe_dir), "--en", str(tmp_path / "bin.txt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bin.txt:1: NUL byte" in err
    (tmp_path / "en.txt").write_text("hello\n", encoding="utf-8")
    assert main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "nothing.model"), "--en", str(tmp_path / "en.txt")]) == 1
    assert "nothing.model: tokenizer not found" in capsys.readouterr().err


def test_tiktoken_rank_file_errors(tmp_path):
    p = _write_tiktoken(tmp_path / "t.tiktoken")
    assert len(read_tiktoken_ranks(p)) == 259
    lines = p.read_bytes().splitlines(keepends=True)
    (tmp_path / "cut.tiktoken").write_bytes(b"".join(lines[:-1]) + lines[-1][:5])  # a line cut mid-way
    with pytest.raises(TokenizerError, match=r"cut\.tiktoken:259: expected '<base64 token> <rank>'"):
        read_tiktoken_ranks(tmp_path / "cut.tiktoken")
    (tmp_path / "nobytes.tiktoken").write_bytes(b"".join(lines[1:]))  # byte 0x00 has no rank
    with pytest.raises(TokenizerError, match=r"1 of the 256 single bytes have no rank \(first: 0x00\)"):
        read_tiktoken_ranks(tmp_path / "nobytes.tiktoken")
    (tmp_path / "dup.tiktoken").write_bytes(b"".join(lines) + lines[0])
    with pytest.raises(TokenizerError, match=r"\.tiktoken:260: .* appears twice"):
        read_tiktoken_ranks(tmp_path / "dup.tiktoken")


@pytest.mark.parametrize("module, suffix", [("tiktoken", ".tiktoken"), ("sentencepiece", ".model")])
def test_missing_optional_package_is_named(tmp_path, monkeypatch, module, suffix):
    path = tmp_path / f"tok{suffix}"
    path.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(TokenizerError, match=rf"needs the optional package '{module}'.*tokenizers-extra"):
        load_token_counter(path)


def test_unknown_tokenizer_kind(tmp_path):
    (tmp_path / "weird.bin").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(TokenizerError, match="unknown tokenizer file kind"):
        load_token_counter(tmp_path / "weird.bin")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_token_counter(tmp_path / "empty_dir")


# --------------------------------------------------------------------------- the real tokenizers
def test_shared_tokenizers_give_published_ids(shared_tokenizers):
    """Known ids of 'hello world' / 'Hello world' (GPT-2 encoder.json, Meta's LLaMA model, OpenAI cl100k)."""
    pytest.importorskip("tiktoken")
    pytest.importorskip("sentencepiece")
    expected = {
        "gpt2": [[31373, 995], [15496, 995]],
        "gpt2/tokenizer.json": [[31373, 995], [15496, 995]],
        "llama/tokenizer.model": [[22172, 3186], [15043, 3186]],
        "cl100k/cl100k_base.tiktoken": [[15339, 1917], [9906, 1917]],
    }
    counters = {rel: load_token_counter(shared_tokenizers / rel) for rel in [*expected, "aquila"]}
    for rel, ids in expected.items():
        assert counters[rel].encode_batch(["hello world", "Hello world"]) == ids, rel
    sizes = {rel: counters[rel].vocab_size for rel in ("gpt2", "llama/tokenizer.model", "aquila", "cl100k/cl100k_base.tiktoken")}
    # cl100k: the file holds ranks 0..100255 only; OpenAI's special tokens (100257..) are not in it.
    assert sizes == {"gpt2": 50257, "llama/tokenizer.model": 32000, "aquila": 100008,
                     "cl100k/cl100k_base.tiktoken": 100256}


def test_cl100k_matches_tiktoken_own_definition(shared_tokenizers, monkeypatch):
    """Our cl100k (rank file + copied regex) encodes as tiktoken's own ``cl100k_base`` definition
    built from the same ranks (its download is replaced by the local file)."""
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken_ext.openai_public as openai_public
    path = shared_tokenizers / "cl100k" / "cl100k_base.tiktoken"
    ranks = read_tiktoken_ranks(path)
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks)
    spec = openai_public.cl100k_base()
    assert TIKTOKEN_PATTERNS["cl100k_base"] == spec["pat_str"]
    official = tiktoken.Encoding(name="cl100k_official", pat_str=spec["pat_str"], mergeable_ranks=spec["mergeable_ranks"],
                                 special_tokens={})
    ours = load_token_counter(path)
    texts = ["Hello, world! 123456 it's", "中华人民共和国成立于1949年。\n\n  def f(x):\r\n\treturn x", "<|endoftext|> ok"]
    assert ours.encode_batch(texts) == [official.encode_ordinary(t) for t in texts]


def test_aquila_counts_match_transformers(shared_tokenizers):
    """The directory loader (vocab.json + merges.txt + Aquila's specials) gives transformers' ids."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(shared_tokenizers / "aquila"))
    ours = load_token_counter(shared_tokenizers / "aquila")
    texts = ["北京是中华人民共和国的首都。", "Aquila is a bilingual model, 悟道·天鹰!", "for i in range(10):\n    print(i)"]
    assert ours.encode_batch(texts) == [hf.encode(t, add_special_tokens=False) for t in texts]
