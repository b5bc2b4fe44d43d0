"""Perplexity and bits per byte against transformers' LlamaForCausalLM on a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from aquilachat.checkpoint import load_model, load_tokenizer, save_hf
from aquilachat.config import ModelConfig
from aquilachat.errors import DataError, ValidationError
from aquilachat.evaluation.ppl import perplexity, read_documents, windows
from aquilachat.model import AquilaForCausalLM
from aquilachat.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "人工智能是计算机科学的一个分支。你好，世界！用golang实现冒泡排序算法。",
    "def bubble_sort(a):\n    for i in range(len(a)):\n        pass\n",
]


def _byte_tokenizer(out: Path) -> Tokenizer:
    """A byte-level BPE with ~300 entries plus [CLS] (BOS) and </s>, saved in HF layout."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 5, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("[CLS]", "</s>")])
    wrapped = Tokenizer(tok, special_tokens_map={"bos_token": "[CLS]", "eos_token": "</s>",
                                                 "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    wrapped.save(out)
    return Tokenizer.from_dir(out)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppl_model")
    tok = _byte_tokenizer(out)
    preset = ModelConfig.from_preset("tiny").__dict__.copy()
    preset.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  max_position_embeddings=256)
    model = AquilaForCausalLM(ModelConfig(**preset))
    model.init_weights(seed=0)
    with torch.no_grad():  # sharper random distributions than N(0, 0.02), so the test is not trivial
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    save_hf(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    m = transformers.LlamaForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
    return m.eval()


def test_windows_score_every_token_once_with_enough_context():
    for n, L, S in [(1, 8, 4), (2, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 5), (100, 16, 15), (37, 10, 1)]:
        scored = []
        for begin, end, first in windows(n, L, S):
            assert 0 <= begin < first <= end <= n and end - begin <= L
            if begin > 0:
                assert first - begin >= L - S
            scored += range(first, end)
        assert scored == list(range(1, n)), (n, L, S)
    with pytest.raises(ValidationError):
        list(windows(10, 8, 8))  # stride must leave at least one token of context
    with pytest.raises(ValidationError):
        list(windows(10, 1, 1))


def test_single_window_equals_transformers_loss(tiny_checkpoint, hf_model):
    model, tok = load_model(tiny_checkpoint, device="cpu"), load_tokenizer(tiny_checkpoint)
    text = TEXTS[0] + TEXTS[1]
    ids = [tok.bos_token_id] + tok.encode(text)
    assert len(ids) <= 256
    res = perplexity(model, tok, [text])
    with torch.no_grad():
        loss = hf_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean NLL of ids[1:]
    assert res.tokens == len(ids) - 1 and res.windows == 1
    assert res.nll_nats / res.tokens == pytest.approx(loss, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    # with BOS every byte of the text is scored
    assert res.bytes == len(text.encode("utf-8"))
    assert res.bits_per_byte == pytest.approx(loss * res.tokens / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


def test_sliding_windows_equal_brute_force_transformers(tiny_checkpoint, hf_model):
    """Each token's NLL equals transformers' with the context the stride rule gives it."""
    model, tok = load_model(tiny_checkpoint, device="cpu"), load_tokenizer(tiny_checkpoint)
    text = "".join(TEXTS) * 3
    ids = [tok.bos_token_id] + tok.encode(text)
    L, S = 64, 24
    n = len(ids)
    assert n > 3 * L
    res = perplexity(model, tok, [text], context=L, stride=S, batch_size=3)
    begin_of = {}
    for t in range(1, n):
        if t < L:
            begin_of[t] = 0
        else:  # the block of S targets containing t ends at min(L + j*S, n); its context starts L before
            j = -(-(t - L + 1) // S)
            begin_of[t] = min(L + j * S, n) - L
    expected = 0.0
    with torch.no_grad():
        # one transformers forward per distinct context start: with causal attention, the logits
        # at position t of ids[begin:] depend on ids[begin:t+1] only
        for begin in sorted(set(begin_of.values())):
            targets = [t for t in begin_of if begin_of[t] == begin]
            assert max(targets) - begin < L
            logits = hf_model(torch.tensor([ids[begin:max(targets) + 1]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            expected -= sum(logp[t - 1 - begin, ids[t]].item() for t in targets)
    assert res.tokens == n - 1
    assert res.nll_nats == pytest.approx(expected, rel=1e-5)
    assert res.windows == 1 + -(-(n - L) // S)


def test_no_bos_skips_first_token_and_its_bytes(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint, device="cpu"), load_tokenizer(tiny_checkpoint)
    text = TEXTS[1]
    ids = tok.encode(text)
    res = perplexity(model, tok, [text], add_bos=False)
    assert res.tokens == len(ids) - 1
    assert res.bytes == len(text.encode()) - len(tok.token_bytes(ids[0]))


def test_documents_are_scored_separately_and_max_tokens(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint, device="cpu"), load_tokenizer(tiny_checkpoint)
    both = perplexity(model, tok, TEXTS[:2])
    a, b = perplexity(model, tok, TEXTS[:1]), perplexity(model, tok, TEXTS[1:2])
    assert both.nll_nats == pytest.approx(a.nll_nats + b.nll_nats, rel=1e-6)
    assert both.tokens == a.tokens + b.tokens and both.documents == 2
    capped = perplexity(model, tok, TEXTS, max_tokens=10)
    assert capped.tokens == 10 and capped.documents == 1


def test_read_documents_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    assert read_documents(tmp_path / "a.txt") == ["hello\nworld\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n', encoding="utf-8")
    assert read_documents(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c.jsonl:2: missing field 'text'"):
        read_documents(tmp_path / "c.jsonl")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "p"}, "q"]), encoding="utf-8")
    assert read_documents(tmp_path / "d.json") == ["p", "q"]
    (tmp_path / "e.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="not UTF-8"):
        read_documents(tmp_path / "e.txt")


def test_cli_ppl_writes_reports(tiny_checkpoint, tmp_path, capsys):
    from aquilachat.cli import main
    data = tmp_path / "doc.txt"
    data.write_text("".join(TEXTS) * 2, encoding="utf-8")
    out = tmp_path / "report"
    rc = main(["eval", "ppl", "--model", str(tiny_checkpoint), "--data", str(data), "--context", "64",
               "--stride", "32", "--output", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    rep = json.loads((out / "ppl.json").read_text())
    r = rep["files"][str(data)]
    assert r["context"] == 64 and r["stride"] == 32 and r["perplexity"] > 1
    meta = rep["metadata"]
    assert meta["datasets"][0]["sha256"] and meta["packages"]["torch"] and meta["date"]
    assert (out / "ppl.md").read_text().startswith("# Perplexity")
    assert (out / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "ppl", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "missing.txt"),
                 "--output", str(out)]) == 1
    assert "missing.txt" in capsys.readouterr().err
