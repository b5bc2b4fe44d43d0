"""`aquilachat chat` and `aquilachat generate` as a user runs them."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch

from aquilachat.cli import main
from aquilachat.llm import LLM
from aquilachat.sampling import SamplingParams
from aquilachat.sampling_params import CLI_FIELDS, PARAMS
from tests.helpers import bad_sampling_values, make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tokenizer_dir):
    out = tmp_path_factory.mktemp("tiny_cli")
    make_tiny_model(out, byte_tokenizer_dir)
    return out


def test_chat_one_answer_matches_llm(tiny_dir, capsys):
    args = ["chat", "用golang实现冒泡排序算法", "--model", str(tiny_dir), "--temperature", "0", "--max-tokens", "30"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    want = LLM(str(tiny_dir), device="cpu").chat([{"role": "user", "content": "用golang实现冒泡排序算法"}],
                                                  SamplingParams(temperature=0, top_p=0.9, max_tokens=30))[0].text
    assert printed == want.lstrip() + "\n"


def test_interactive_history_reset_exit(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\n/reset\nhello\n/exit\nnever\n"))
    assert main(["chat", "--model", str(tiny_dir), "--temperature", "0", "--max-tokens", "12"]) == 0
    captured = capsys.readouterr()
    answers = captured.out.splitlines()
    llm = LLM(str(tiny_dir), device="cpu")
    p = SamplingParams(temperature=0, top_p=0.9, max_tokens=12)
    a1 = llm.chat([{"role": "user", "content": "hello"}], p)[0].text
    a2 = llm.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": a1.lstrip()},
                   {"role": "user", "content": "and again"}], p)[0].text
    # after /reset the same question gets the first answer again (no history)
    assert "\n".join(answers) == "\n".join([a1.lstrip(), a2.lstrip(), a1.lstrip()])
    assert "history cleared" in captured.err


def test_generate_json(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--prompt", "你好",
                 "--temperature", "0", "--max-tokens", "5", "--json"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["prompt"] for l in lines] == ["hi", "你好"]
    assert all(len(l["outputs"][0]["token_ids"]) <= 5 for l in lines)


def test_bad_sampling_value_is_one_line(tiny_dir, capsys):
    assert main(["chat", "hi", "--model", str(tiny_dir), "--top-p", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_p" in err and "Traceback" not in err


@pytest.mark.parametrize("name", CLI_FIELDS)
def test_every_sampling_option_is_checked_with_the_same_ranges(name, capsys):
    """chat, generate and eval take the same options with the same ranges (one line naming the
    field, before any model is loaded)."""
    flag = "--" + name.replace("_", "-")
    cases = []
    for value in bad_sampling_values(name):
        if PARAMS[name].kind is list:
            if isinstance(value, list):
                cases.append([arg for v in value for arg in (flag, v)])
        elif PARAMS[name].kind is dict:  # --logit-bias ID=VALUE, repeatable
            if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                cases.append([f"{flag}={k}={v}" for k, v in value.items()])
        elif isinstance(value, (int, float)) and not (PARAMS[name].kind is int and isinstance(value, float)):
            cases.append([flag, str(value)])  # strings and fractions of integers: argparse's own errors
    if PARAMS[name].kind is dict:
        cases += [[flag, "5"], [flag, "5=high"]]  # not ID=VALUE
    assert cases
    for command in (["chat", "hi"], ["generate", "--prompt", "hi"], ["eval", "code"]):
        for argv in cases:
            assert main([*command, "--model", "./not/here", *argv]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and name in err and "not/here" not in err, (command, argv, err)


def test_non_finite_model_cli_exit_code(tmp_path, byte_tokenizer_dir):
    model = make_tiny_model(tmp_path / "nan", byte_tokenizer_dir)
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)
    from aquilachat.checkpoint import save_hf
    save_hf(model, tmp_path / "nan", tokenizer_dir=byte_tokenizer_dir)
    proc = subprocess.run([sys.executable, "-m", "aquilachat", "chat", "你好", "--model", str(tmp_path / "nan")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    err_lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err_lines) == 1 and "error" in err_lines[0] and "Traceback" not in proc.stderr


def test_missing_model_is_one_line(capsys):
    assert main(["chat", "hi", "--model", "./definitely/not/here"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not/here" in err


def test_interactive_history_longer_than_context_is_trimmed(tiny_dir, capsys, monkeypatch):
    """The tiny model has a 256-token window: a long conversation drops its oldest exchanges
    instead of failing, and an answer that reaches the window ends with finish_reason length."""
    long_line = "人工智能是计算机科学的一个分支。" * 6
    monkeypatch.setattr(sys, "stdin", io.StringIO((long_line + "\n") * 4 + "/exit\n"))
    assert main(["chat", "--model", str(tiny_dir), "--temperature", "0", "--max-tokens", "100"]) == 0
    captured = capsys.readouterr()
    assert "no longer fit" in captured.err and "error" not in captured.err
    assert len(captured.out.splitlines()) >= 4


def test_generate_takes_the_new_sampling_options_and_no_prefix_caching(tiny_dir, capsys):
    """--logit-bias ID=VALUE (repeatable), --min-tokens, --min-p, --no-prefix-caching: what LLM gives."""
    llm = LLM(str(tiny_dir), device="cpu", enable_prefix_caching=False)
    forced = llm.tokenizer.encode(" fox")[0]
    eos = llm.tokenizer.eos_token_id
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_tokens=6, min_tokens=6, min_p=0.1,
                            logit_bias={forced: 4.0, eos: 100.0})
    want = llm.generate(["hi"], params)[0]
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--seed", "3", "--max-tokens", "6",
                 "--min-tokens", "6", "--min-p", "0.1", "--logit-bias", f"{forced}=4", "--logit-bias", f"{eos}=100",
                 "--no-prefix-caching", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["outputs"][0]
    assert out["token_ids"] == want.token_ids and len(out["token_ids"]) == 6  # EOS held back by min_tokens
