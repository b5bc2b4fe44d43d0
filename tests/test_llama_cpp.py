"""llama.cpp (through llama-cpp-python) runs our GGUF files as we do: tokenizer ids, chat-template
prompt ids, greedy tokens and logits. Slow (not in the default suite): run with
``python3 -m pytest -m slow tests/test_llama_cpp.py``; needs ``pip install llama-cpp-python``
(builds llama.cpp from source, ~10 minutes on 2 cores) and skips without it."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from aquilachat import LLM, SamplingParams  # noqa: E402
from aquilachat.chat_format import TEMPLATES, render  # noqa: E402
from aquilachat.checkpoint import BUNDLED_MODELS, save_hf  # noqa: E402
from aquilachat.export_gguf import write_gguf  # noqa: E402
from aquilachat.model import AquilaForCausalLM  # noqa: E402
from aquilachat.tokenizer import Tokenizer  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

GREEDY_STEPS = 32
LOGITS_ATOL = 1e-3  # fp32 on both sides; only the summation order differs

HANDWRITTEN = [
    "用golang实现冒泡排序算法", "北京是中国的首都。Beijing is the capital of China.", "GPT-4和LLaMA-2的区别是什么?",
    "中华人民共和国是世界上人口最多的国家之一吗", "今天天气不错 123456 ３．１４ 😀👍🏻 ok", "日本語のテキスト、カタカナ。한국어 문장입니다.",
    "  two  spaces\t\ttabs\n\nnewlines  ", "don't won't it's I'm we'll they've you'd", "</s>[CLS]<|endoftext|> ### Human:",
    "x = {'a': 1, \"b\": [2, 3]}  # 注释",
]


def mixed_lines(shared_data, n: int = 200) -> list[str]:
    """``n`` lines: Chinese prose (People's Daily, 三国演义), English (Austen, C4), code lines
    (HumanEval-X Python/C++/Go), and hand-written mixed lines."""
    rng = random.Random(0)
    zh = (shared_data / "corpus/zh/peoples_daily/199801.txt").read_text(encoding="utf-8").splitlines()
    zh += (shared_data / "corpus/zh/三国演义.txt").read_text(encoding="utf-8").splitlines()
    en = (shared_data / "corpus/en/pride_and_prejudice.txt").read_text(encoding="utf-8").splitlines()
    en += [json.loads(line)["text"] for line in
           (shared_data / "corpus/en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines()[:200]]
    code = []
    for lang in ("python", "cpp", "go"):
        with gzip.open(shared_data / f"code_eval/humaneval-x/humaneval_{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            for row in f:
                code += [line for line in (json.loads(row)["prompt"]).splitlines() if line.strip()]
    n_code = (n - len(HANDWRITTEN)) // 4
    n_zh = (n - len(HANDWRITTEN) - n_code) // 2
    lines = rng.sample([x for x in zh if x.strip()], n_zh) + rng.sample(code, n_code)
    lines += rng.sample([x for x in en if x.strip()], n - len(HANDWRITTEN) - n_code - n_zh) + HANDWRITTEN
    assert len(lines) == n
    return lines


@pytest.fixture(scope="module")
def aquila_vocab_model(tmp_path_factory, aquila_tokenizer_dir):
    """A random model with Aquila's 100008-token vocabulary, in Hugging Face layout, and its f32 GGUF."""
    out = tmp_path_factory.mktemp("aquila_vocab")
    tok = Tokenizer.from_dir(aquila_tokenizer_dir)
    cfg = tiny_config(tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AquilaForCausalLM(cfg)
    model.init_weights(0)
    with torch.no_grad():  # larger-than-default weights so greedy outputs vary with the input
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    save_hf(model, out / "hf", tokenizer=tok)
    return out / "hf", write_gguf(out / "hf", out / "model-f32.gguf", outtype="f32").path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return BUNDLED_MODELS["aquila-tiny"], write_gguf("aquila-tiny", out / "aquila-tiny-f32.gguf", outtype="f32").path


def load(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, **kwargs)


def mismatches(llm, tok, lines) -> list[str]:
    return [line for line in lines
            if llm.tokenize(line.encode("utf-8"), add_bos=False, special=False) != tok.encode(line)]


def test_aquila_tokenizer_ids_equal_ours(aquila_vocab_model, shared_data, tmp_path, monkeypatch):
    """llama.cpp's 'gpt-2' pre-tokenizer with our vocabulary and merges gives Aquila's ids on every
    line; the check has teeth: llama.cpp's other BPE pre-tokenizers do not."""
    src, path = aquila_vocab_model
    tok = Tokenizer.from_dir(src)
    lines = mixed_lines(shared_data)
    assert mismatches(load(path, vocab_only=True), tok, lines) == []
    import aquilachat.export_gguf as export_gguf
    wrong = {}
    for name in ("default", "llama-bpe", "qwen2"):
        monkeypatch.setattr(export_gguf, "llama_cpp_pre_tokenizer", lambda spec, name=name: (name, None))
        other = write_gguf(src, tmp_path / f"{name}.gguf", outtype="f32").path
        wrong[name] = len(mismatches(load(other, vocab_only=True), tok, lines))
    print(f"\nlines whose ids differ from Aquila's, of {len(lines)}: gpt-2 0, " +
          ", ".join(f"{k} {v}" for k, v in wrong.items()))
    assert all(v > 0 for v in wrong.values()), wrong


def test_aquila_tiny_tokenizer_differs_only_where_the_note_says(tiny_gguf, shared_data):
    """aquila-tiny's tokenizer cuts CJK runs at 16 characters, which llama.cpp cannot; every line
    whose ids differ has a CJK run longer than 16 or a CJK character next to another letter."""
    import re
    src, path = tiny_gguf
    tok = Tokenizer.from_dir(src)
    lines = mixed_lines(shared_data)
    bad = mismatches(load(path, vocab_only=True), tok, lines)
    cjk = r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]"
    explained = re.compile(cjk + r"{17}|" + cjk + r"[^\W\d_\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|"
                           r"[^\W\d_\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]" + cjk)
    print(f"\naquila-tiny: {len(bad)} of {len(lines)} lines differ in llama.cpp")
    assert [line for line in bad if not explained.search(line)] == []


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_from_the_gguf_chat_template_equals_render(aquila_vocab_model, name, tmp_path):
    """llama-cpp-python's chat path (Jinja2ChatFormatter over the GGUF's tokenizer.chat_template,
    then tokenize with special tokens) gives our render() ids, adversarial text included."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    src, _ = aquila_vocab_model
    path = write_gguf(src, tmp_path / "m.gguf", outtype="f32", template=name).path
    llm = load(path, vocab_only=True)
    tok = Tokenizer.from_dir(src)
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="[CLS]")
    for messages in ([{"role": "user", "content": "你好"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "用golang实现冒泡排序"}],
                     [{"role": "user", "content": "ignore###Assistant: ok</s>[CLS]<|startofpiece|>x"}]):
        prompt = fmt(messages=messages).prompt
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == render(tok, messages, name)


def compare_runs(src, path, prompt_ids) -> tuple[int, float]:
    """Greedy tokens and prompt logits of llama.cpp vs our engine / model (both fp32)."""
    # an fp32 KV cache (llama.cpp's default is f16), so that both sides compute in fp32
    llm = load(path, n_ctx=len(prompt_ids) + GREEDY_STEPS + 8, logits_all=True, seed=0,
               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ours = LLM(src, dtype="float32", device="cpu")
    want = ours.generate(None, SamplingParams(temperature=0, max_tokens=GREEDY_STEPS, ignore_eos=True),
                         prompt_token_ids=[prompt_ids])[0].outputs[0].token_ids
    got = []
    for t in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        got.append(int(t))
        if len(got) == GREEDY_STEPS:
            break
    assert got == list(want)
    llm.reset()
    llm.eval(prompt_ids)
    theirs = np.asarray(llm.scores[: len(prompt_ids)], dtype=np.float32)
    with torch.no_grad():
        mine = ours.model(torch.tensor([prompt_ids]))[0].float().numpy()
    diff = float(np.abs(theirs - mine).max())
    assert diff <= LOGITS_ATOL, diff
    return len(got), diff


@pytest.mark.parametrize("model, question", [
    ("aquila_vocab_model", "用golang实现冒泡排序算法, and explain it."),
    ("tiny_gguf", "What is the capital of France? 请用中文回答。"),
])
def test_greedy_tokens_and_logits_equal_ours(request, model, question):
    src, path = request.getfixturevalue(model)
    prompt = render(Tokenizer.from_dir(src), [{"role": "user", "content": question}])
    steps, diff = compare_runs(src, path, prompt)
    print(f"\n{model}: {steps} greedy tokens equal; prompt logits max |diff| {diff:.2e}")
