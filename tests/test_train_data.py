"""Training data: the loss mask on the real SFT files for every template and format, readers,
bad rows, the report, packing, collation, pretraining text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aquilachat.chat_format import TEMPLATES, get_template, render_text
from aquilachat.errors import DataError
from aquilachat.io import iter_records
from aquilachat.tokenizer import Tokenizer
from aquilachat.train.data import (IGNORE_INDEX, build_pretrain_dataset, build_sft_dataset, collate,
                                   detect_format, pack_units)
from tests.train_helpers import synthetic_rows, write_jsonl

ROWS_PER_FILE = 15

# real files of ../shared/data/sft: (path, container, expected format)
REAL_FILES = [
    ("aquila_chat/sft_samples.jsonl", "jsonl", "conversations"),      # FlagAI conversations v3
    ("aquila_chat/convo_samples.jsonl", "jsonl", "conversations"),    # FlagAI, multi-turn
    ("aquila_chat/alpaca_data_train.jsonl", "jsonl", "conversations"),
    ("fastchat/dummy_conversation.json", "array", "conversations"),   # ShareGPT JSON
    ("medicalgpt/sharegpt_zh_1K_format.jsonl", "jsonl", "conversations"),  # ShareGPT JSONL
    ("llama_factory/alpaca_zh_demo.json", "array", "alpaca"),         # Alpaca JSON
    ("llama_factory/identity.json", "array", "alpaca"),
    ("medicalgpt/Belle_open_source_1k.json", "jsonl", "alpaca"),      # Alpaca JSONL named .json
]


@pytest.fixture(scope="module")
def aquila_tok(aquila_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(aquila_tokenizer_dir)


def _head(path: Path, n: int) -> list:
    return [row for _, row in zip(range(n), iter_records(path))]


def _write_subset(tmp: Path, name: str, rows: list, container: str) -> Path:
    out = tmp / Path(name).name
    if container == "array":
        out.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    else:
        write_jsonl(out, rows)
    return out


def _oracle_messages(row: dict, fmt: str) -> list[dict]:
    """The conversation of a row, computed independently of the readers under test."""
    if fmt == "alpaca":
        user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    if fmt == "openai":
        msgs = list(row["messages"])
    else:
        role = {"human": "user", "gpt": "assistant", "system": "system"}
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in row["conversations"]]
        if row.get("instruction"):
            msgs.insert(0, {"role": "system", "content": row["instruction"]})
    while msgs[-1]["role"] == "user":  # an unanswered last question carries no target
        msgs = msgs[:-1]
    return msgs


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of mask == 1."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def _check_masks(tok, dataset, rows, fmt, template):
    tpl = get_template(template)
    assert len(dataset) == len(rows)
    for unit, row in zip(dataset.units, rows):
        msgs = _oracle_messages(row, fmt)
        ids, mask = unit.ids.tolist(), unit.mask
        # the whole sample is the template's rendering of the conversation
        assert tok.decode(ids) == render_text(msgs, tpl, generation_prompt=False), unit.source
        # supervised = exactly each assistant answer with its end-of-turn marker, in order
        answers = [tpl.answer_prefix + tpl.clean(m["content"]) + tpl.end_of_turn
                   for m in msgs if m["role"] == "assistant"]
        runs = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
        assert runs == answers, unit.source
        # and the end-of-turn marker is the last supervised token(s) of the sample
        assert mask[-1] == 1 and runs[-1].endswith(tpl.end_of_turn)


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("name, container, fmt", REAL_FILES, ids=[f[0] for f in REAL_FILES])
def test_loss_mask_on_real_files(shared_data, aquila_tok, tmp_path, template, name, container, fmt):
    src = shared_data / "sft" / name
    if not src.exists():
        pytest.skip(f"{src} is not present")
    rows = [r for _, r in _head(src, ROWS_PER_FILE)]
    path = _write_subset(tmp_path, name, rows, container)
    ds = build_sft_dataset([path], aquila_tok, template=template, max_seq_len=1_000_000)
    assert ds.report.files[0]["format"] == fmt
    assert ds.report.eot_supervised == ds.report.eot_expected == len(rows)
    _check_masks(aquila_tok, ds, rows, fmt, template)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_loss_mask_openai_messages(shared_data, aquila_tok, tmp_path, template):
    """OpenAI ``messages`` rows, made from the real ShareGPT file (with a system message)."""
    src = shared_data / "sft" / "medicalgpt" / "sharegpt_zh_1K_format.jsonl"
    if not src.exists():
        pytest.skip(f"{src} is not present")
    role = {"human": "user", "gpt": "assistant"}
    rows = []
    for _, r in _head(src, ROWS_PER_FILE):
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]]
        rows.append({"messages": [{"role": "system", "content": "你是一个乐于助人的助手。"}] + msgs})
    path = write_jsonl(tmp_path / "openai.jsonl", rows)
    ds = build_sft_dataset([path], aquila_tok, template=template, max_seq_len=1_000_000)
    assert ds.report.files[0]["format"] == "openai"
    _check_masks(aquila_tok, ds, rows, "openai", template)


def test_formats_detected_on_whole_real_files(shared_data):
    sft = shared_data / "sft"
    expected = {name: fmt for name, _, fmt in REAL_FILES}
    for name, fmt in expected.items():
        path = sft / name
        if path.exists():
            line, first = next(iter_records(path))
            assert line >= 1 and detect_format(path, first) == fmt, name


def test_flagai_convo_samples_report(shared_data, aquila_tok):
    """80 of FlagAI's 100 convo_samples end with an unanswered question: trained without it."""
    path = shared_data / "sft" / "aquila_chat" / "convo_samples.jsonl"
    if not path.exists():
        pytest.skip("convo_samples.jsonl is not present")
    ds = build_sft_dataset([path], aquila_tok, template="aquila-legacy", max_seq_len=2048)
    r = ds.report
    assert r.samples == 100 and r.trailing_user_dropped == 80 and r.bad_rows == 0
    assert r.tokens == sum(len(u) for u in ds.units)
    assert r.supervised_tokens == sum(int(u.mask.sum()) for u in ds.units)
    assert r.eot_supervised == r.eot_expected == 100 - r.truncated
    assert "end-of-turn '</s>' supervised" in r.format() and "[OK]" in r.format()


def test_bad_rows_name_file_and_line(tmp_path, byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    rows = [json.dumps(r) for r in synthetic_rows(4)]
    rows.insert(2, '{"conversations": [{"from": "human", "value": "hi"}')  # line 3: broken JSON
    rows.insert(4, json.dumps({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"},
                                                 {"from": "gpt", "value": "z"}]}))  # line 5: starts with gpt
    rows.insert(5, json.dumps({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "z"}]}))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        build_sft_dataset([path], tok, template="aquila-chat", max_seq_len=512)
    ds = build_sft_dataset([path], tok, template="aquila-chat", max_seq_len=512, skip_bad_rows=True)
    assert ds.report.bad_rows == 3 and ds.report.samples == 4
    msgs = ds.report.bad_row_messages
    assert msgs[0].startswith(f"{path}:3:")
    assert msgs[1].startswith(f"{path}:5:") and "expected 'user'" in msgs[1]
    assert msgs[2].startswith(f"{path}:6:") and "content must be a string" in msgs[2]
    assert ds.report.files[0]["skipped"] == 3
    # alpaca row without output, inside a JSON array: the element's line is named
    arr = tmp_path / "alp.json"
    arr.write_text('[\n {"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c", "input": ""}\n]')
    with pytest.raises(DataError, match=r"alp\.json:3: .*'output'"):
        build_sft_dataset([arr], tok, template="aquila-chat", max_seq_len=512, data_format="alpaca")


def test_report_counts_truncation(tmp_path, byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12))
    full = build_sft_dataset([path], tok, template="aquila-chat", max_seq_len=10_000)
    lengths = [len(u) for u in full.units]
    cut = sorted(lengths)[len(lengths) // 2]
    ds = build_sft_dataset([path], tok, template="aquila-chat", max_seq_len=cut)
    r = ds.report
    assert r.truncated == sum(n > cut for n in lengths)
    assert r.eot_expected == 12 - r.truncated - r.dropped_no_target  # truncated rows lose their marker
    assert r.eot_supervised == r.eot_expected
    assert all(len(u) <= cut for u in ds.units)
    assert r.tokens == sum(len(u) for u in ds.units)
    assert 0 < r.supervised_share < 1
    assert json.loads(json.dumps(r.to_dict()))["truncated"] == r.truncated


def test_samples_are_immutable_and_stable(tmp_path, byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(6))
    a = build_sft_dataset([path], tok, template="aquila", max_seq_len=512)
    b = build_sft_dataset([path], tok, template="aquila", max_seq_len=512)
    for u, v in zip(a.units, b.units):
        assert np.array_equal(u.ids, v.ids) and np.array_equal(u.mask, v.mask)
        with pytest.raises(ValueError):
            u.ids[0] = 1  # read-only: nothing can rewrite a sample in place
    collate(a.units[:2], 0)
    assert np.array_equal(a.units[0].ids, b.units[0].ids)


def test_packing_preserves_tokens_and_targets(tmp_path, byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(10))
    plain = build_sft_dataset([path], tok, template="aquila-v2", max_seq_len=300)
    packed = build_sft_dataset([path], tok, template="aquila-v2", max_seq_len=300, packing=True)
    assert len(packed) < len(plain) and all(len(u) <= 300 for u in packed.units)
    assert np.array_equal(np.concatenate([u.ids for u in packed.units]), np.concatenate([u.ids for u in plain.units]))
    assert np.array_equal(np.concatenate([u.mask for u in packed.units]), np.concatenate([u.mask for u in plain.units]))
    # every sample starts with an unsupervised prompt token, so packing adds no target
    assert sum(u.num_targets for u in packed.units) == sum(u.num_targets for u in plain.units)
    assert pack_units(plain.units, 10_000)[0].source.count("+") == len(plain) - 1


def test_collate_labels(tmp_path, byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(3))
    ds = build_sft_dataset([path], tok, template="aquila-chat", max_seq_len=512)
    x, y = collate(ds.units, pad_id=0)
    T = max(len(u) for u in ds.units)
    assert x.shape == y.shape == (3, T) and x.dtype == y.dtype == torch.long
    for b, u in enumerate(ds.units):
        n = len(u)
        assert x[b, :n].tolist() == u.ids.tolist() and (x[b, n:] == 0).all()
        for t in range(T):
            want = int(u.ids[t + 1]) if t + 1 < n and u.mask[t + 1] else IGNORE_INDEX
            assert int(y[b, t]) == want
        assert int((y[b] != IGNORE_INDEX).sum()) == u.num_targets


def test_pretrain_text_and_jsonl(tmp_path, byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    (tmp_path / "a.txt").write_text("hello world\n" * 20, encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "你好，世界！" * 5}, {"text": "the quick brown fox"}])
    eos = tok.eos_token_id
    ds = build_pretrain_dataset([tmp_path], tok, max_seq_len=16, eos_id=eos)
    stream = (tok.encode("hello world\n" * 20) + [eos] + tok.encode("你好，世界！" * 5) + [eos]
              + tok.encode("the quick brown fox") + [eos])
    n = len(stream) // 16
    assert len(ds) == n and ds.report.samples == 3
    assert np.concatenate([u.ids for u in ds.units]).tolist() == stream[: n * 16]
    assert all(u.mask.all() for u in ds.units)
    write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}, {"body": "y"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: missing field 'text' \(keys: body\)"):
        build_pretrain_dataset([tmp_path / "c.jsonl"], tok, max_seq_len=4, eos_id=eos)
    with pytest.raises(DataError, match="fewer than one row"):
        build_pretrain_dataset([tmp_path / "b.jsonl"], tok, max_seq_len=100_000, eos_id=eos)


def test_sft_refuses_plain_text(tmp_path, byte_tokenizer_dir):
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    (tmp_path / "a.txt").write_text("just text")
    with pytest.raises(DataError, match="pretraining data"):
        build_sft_dataset([tmp_path / "a.txt"], tok, template="aquila-chat", max_seq_len=64)
    with pytest.raises(DataError, match="aquilachat pretrain"):
        build_sft_dataset([tmp_path / "a.txt"], tok, template="aquila-chat", max_seq_len=64, data_format="text")
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cannot tell the format.*'question'"):
        build_sft_dataset([tmp_path / "odd.jsonl"], tok, template="aquila-chat", max_seq_len=64)
