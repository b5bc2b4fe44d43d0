"""GGUF export read back with ``gguf.GGUFReader``: every tensor against the source, the q/k row order
against llama.cpp's rotary convention, q8_0 against ggml's block format, the metadata and tokenizer
tables, the Ollama Modelfile. (llama.cpp itself runs the files in the slow ``test_llama_cpp.py``.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from aquilachat.chat_format import TEMPLATES, jinja_template, render_text  # noqa: E402
from aquilachat.checkpoint import BUNDLED_MODELS, load_model, save_flagai, save_hf  # noqa: E402
from aquilachat.cli import main as cli_main  # noqa: E402
from aquilachat.errors import CheckpointError, ConfigError  # noqa: E402
from aquilachat.export_gguf import gguf_vocab, llama_cpp_pre_tokenizer, write_gguf  # noqa: E402
from aquilachat.model import AquilaForCausalLM  # noqa: E402
from aquilachat.tokenizer import Tokenizer  # noqa: E402
from tests.helpers import make_tiny_model, tiny_config  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def src(tmp_path_factory, byte_tokenizer_dir):
    """A random tiny model (GQA: 4 query heads, 2 key/value heads) in Hugging Face layout; its
    ``down_proj`` rows (intermediate 176) are not a multiple of 32."""
    out = tmp_path_factory.mktemp("gguf_src")
    make_tiny_model(out, byte_tokenizer_dir, intermediate_size=176)
    return out


def reader(path):
    return gguf.GGUFReader(path)


def fields(r) -> dict:
    return {k: f.contents() for k, f in r.fields.items()}


def tensors(r) -> dict:
    return {t.name: t for t in r.tensors}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``: rotate_half rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(model: AquilaForCausalLM) -> dict[str, torch.Tensor]:
    """The source tensors under llama.cpp's names, q/k rows in llama.cpp's order."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().float()
        if key.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        out[names.get_name(key, try_suffixes=(".weight",))] = t
    return out


def q8_0_blocks(raw: np.ndarray, cols: int) -> np.ndarray:
    """Decode ggml ``block_q8_0`` rows by hand (``ggml-common.h``: fp16 scale ``d`` then 32 int8
    ``qs``; value = d * q), independent of ``gguf.quants``."""
    blocks = raw.reshape(raw.shape[0], cols // 32, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # [rows, nblocks, 1]
    qs = blocks[..., 2:].copy().view(np.int8).astype(np.float32)  # [rows, nblocks, 32]
    return (d * qs).reshape(raw.shape[0], cols)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_tensors_bit_exact(src, tmp_path, outtype):
    model = load_model(src, device="cpu")
    result = write_gguf(src, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    want = expected_tensors(model)
    got = tensors(reader(result.path))
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        t = got[name]
        data = np.asarray(t.data)
        if w.dim() == 1 or outtype == "f32":
            assert t.tensor_type == Q.F32, name
            assert np.array_equal(data.view(np.uint32), w.numpy().view(np.uint32)), name
        elif outtype == "f16":
            assert t.tensor_type == Q.F16, name
            assert np.array_equal(data.view(np.uint16), w.half().numpy().view(np.uint16)), name
        else:
            assert t.tensor_type == Q.BF16, name
            want_bits = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(data.view(np.uint16).reshape(want_bits.shape), want_bits), name


def test_q8_0_block_format_and_error(src, tmp_path):
    model = load_model(src, device="cpu")
    result = write_gguf(src, tmp_path, outtype="q8_0")
    assert result.path.name == f"{src.name}-q8_0.gguf"
    got = tensors(reader(result.path))
    quantized = 0
    for name, w in expected_tensors(model).items():
        t = got[name]
        if w.dim() == 1:
            assert t.tensor_type == Q.F32
            continue
        if w.shape[1] % 32:  # ffn_down: 176 columns -> F16, as llama.cpp's converter does
            assert name.endswith("ffn_down.weight") and t.tensor_type == Q.F16
            continue
        assert t.tensor_type == Q.Q8_0, name
        quantized += 1
        x = w.numpy()
        deq = q8_0_blocks(np.asarray(t.data), x.shape[1])
        np.testing.assert_allclose(deq, gguf.quants.dequantize(np.asarray(t.data), Q.Q8_0), rtol=0, atol=0)
        # round-to-nearest with d = max|x| / 127 per block: error <= d / 2, plus d's fp16 rounding
        d = np.abs(x.reshape(x.shape[0], -1, 32)).max(axis=-1, keepdims=True) / 127
        err = np.abs(deq - x).reshape(d.shape[0], -1, 32)
        assert (err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-12).all(), name
    assert quantized >= 1 + 6 * 2  # token_embd, and q k v o gate up of each layer


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float, pairs: str) -> torch.Tensor:
    """Rotary embedding of ``x [T, heads, d]`` at positions ``pos [T]``. ``pairs="adjacent"``:
    ggml ``GGML_ROPE_TYPE_NORM`` (llama.cpp's llama), dims (2i, 2i+1); ``"halves"``: Hugging Face
    ``rotate_half``, dims (i, i + d/2). Both rotate pair i by ``pos * theta^(-2i/d)`` (RoFormer)."""
    d = x.shape[-1]
    ang = pos[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [T, d/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x = x.double()
    a, b = (x[..., 0::2], x[..., 1::2]) if pairs == "adjacent" else (x[..., : d // 2], x[..., d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if pairs == "adjacent":
        return torch.stack([ra, rb], dim=-1).reshape(x.shape)
    return torch.cat([ra, rb], dim=-1)


def test_qk_row_order_gives_the_same_attention_scores_under_llama_cpp_rope(src, tmp_path):
    """q.k per head after rotary: ours (HF weights, rotate_half) == llama.cpp's (GGUF weights,
    adjacent pairs). Wrong row order changes the scores at every position but 0."""
    model = load_model(src, device="cpu")
    cfg = model.config
    got = tensors(reader(write_gguf(src, tmp_path / "m.gguf", outtype="f32").path))
    torch.manual_seed(1)
    x = torch.randn(9, cfg.hidden_size, dtype=torch.float64)
    pos = torch.arange(9) * 7
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        def scores(wq, wk, pairs):
            q = rope((x @ wq.double().T).view(9, cfg.num_attention_heads, -1), pos, cfg.rope_theta, pairs)
            k = rope((x @ wk.double().T).view(9, cfg.num_key_value_heads, -1), pos, cfg.rope_theta, pairs)
            k = k.repeat_interleave(group, dim=1)
            return torch.einsum("qhd,khd->hqk", q, k)
        ours = scores(layer.self_attn.q_proj.weight.detach(), layer.self_attn.k_proj.weight.detach(), "halves")
        gq = torch.from_numpy(np.asarray(got[f"blk.{i}.attn_q.weight"].data).copy())
        gk = torch.from_numpy(np.asarray(got[f"blk.{i}.attn_k.weight"].data).copy())
        theirs = scores(gq, gk, "adjacent")
        torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-9)
        wrong = scores(layer.self_attn.q_proj.weight.detach(), layer.self_attn.k_proj.weight.detach(), "adjacent")
        assert not torch.allclose(wrong, ours, rtol=1e-3, atol=1e-3)


def test_metadata_and_tokenizer_tables(src, tmp_path):
    tok = Tokenizer.from_dir(src)
    model = load_model(src, device="cpu")
    cfg = model.config
    result = write_gguf(src, tmp_path / "m.gguf", outtype="f16")
    f = fields(reader(result.path))
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.vocab_size"]) == (
        cfg.max_position_embeddings, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    assert math.isclose(f["llama.rope.freq_base"], cfg.rope_theta)
    assert math.isclose(f["llama.attention.layer_norm_rms_epsilon"], cfg.rms_norm_eps, rel_tol=1e-6)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size == tok.vocab_size
    assert tokens == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    control = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == set(tok.special_tokens.values())
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in control)
    merges = tok.to_json()["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == jinja_template("aquila-chat")
    assert math.isclose(f["general.sampling.temp"], 0.7, rel_tol=1e-6) and f["general.sampling.top_k"] == 0


def test_padded_vocabulary_and_tied_embeddings(tmp_path, byte_tokenizer_dir):
    """Rows beyond the tokenizer are [PADn] tokens of type UNUSED (llama.cpp's converter pads so);
    a tied lm_head is not written (llama.cpp then uses token_embd)."""
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    n = tok.vocab_size
    model = AquilaForCausalLM(tiny_config(n + 8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          tie_word_embeddings=True))
    model.init_weights(0)
    save_hf(model, tmp_path / "src", tokenizer=tok)
    r = reader(write_gguf(tmp_path / "src", tmp_path / "m.gguf", outtype="f32").path)
    f = fields(r)
    assert f["llama.vocab_size"] == n + 8 and f["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, n + 8)]
    assert set(f["tokenizer.ggml.token_type"][n:]) == {gguf.TokenType.UNUSED}
    assert "output.weight" not in tensors(r) and tensors(r)["token_embd.weight"].shape.tolist() == [64, n + 8]


def test_aquila_vocabulary_tables(aquila_tokenizer_dir):
    """Aquila's 100000 BPE entries and 99743 merges, and its eight special tokens at 100000-100007,
    as control tokens like <|endoftext|> (0). (The tables are checked here without a file: writing
    and reading them back is checked above with a small vocabulary, and llama.cpp loads an
    Aquila-vocabulary GGUF in the slow test_llama_cpp.py.)"""
    tok = Tokenizer.from_dir(aquila_tokenizer_dir)
    tokens, types, merges = gguf_vocab(tok, tok.to_json(), 100008)
    assert len(tokens) == len(types) == 100008 and len(merges) == 99743
    assert tokens[100000:] == ["<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]",
                               "[sMASK]", "[CLS]", "</s>"]
    assert tokens[:100000] == [tok.id_to_token(i) for i in range(100000)] and tokens[8090] == "###"
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == {0, *range(100000, 100008)}
    assert merges[:2] == ["Ġ Ġ", "ä ¸"]  # merges.txt, in order
    with pytest.raises(ConfigError, match="vocab_size 100000 is smaller than the tokenizer's 100008"):
        gguf_vocab(tok, tok.to_json(), 100000)


@pytest.mark.parametrize("layout", ["flagai", "training checkpoint"])
def test_other_layouts_give_the_same_file(src, tmp_path, layout):
    model = load_model(src, device="cpu")
    tok = Tokenizer.from_dir(src)
    if layout == "flagai":
        save_flagai(model, tmp_path / "other", tokenizer=tok)
        other = tmp_path / "other"
    else:  # a step directory of a LoRA run: weights, optimizer and RNG state, adapter file
        from aquilachat.train.checkpoint import save_checkpoint
        other = save_checkpoint(tmp_path / "run", 7, dist_info=None, config=model.config, tokenizer=tok,
                                model_state=model.state_dict(), training_state={"step": 7}, rank_state={},
                                optimizer_state={}, adapter_state={"lora_A": torch.zeros(2, 2)})
    a = tensors(reader(write_gguf(src, tmp_path / "hf.gguf", outtype="f32").path))
    b = tensors(reader(write_gguf(other, tmp_path / "other.gguf", outtype="f32").path))
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_bf16_checkpoint_defaults_to_bf16_bits(tmp_path, byte_tokenizer_dir):
    model = make_tiny_model(tmp_path / "f32", byte_tokenizer_dir).to(torch.bfloat16)
    save_hf(model, tmp_path / "bf16", tokenizer=Tokenizer.from_dir(byte_tokenizer_dir))
    result = write_gguf(tmp_path / "bf16", tmp_path)
    assert result.outtype == "bf16" and result.path.name == "bf16-bf16.gguf"
    t = tensors(reader(result.path))["blk.0.ffn_up.weight"]
    want = model.model.layers[0].mlp.up_proj.weight.detach().view(torch.int16).numpy().view(np.uint16)
    assert t.tensor_type == Q.BF16 and np.array_equal(np.asarray(t.data).view(np.uint16).reshape(want.shape), want)


def test_f16_overflow_is_refused_and_leaves_no_file(tmp_path, byte_tokenizer_dir):
    model = make_tiny_model(tmp_path / "src", byte_tokenizer_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = 1e6
    save_hf(model, tmp_path / "src", tokenizer=Tokenizer.from_dir(byte_tokenizer_dir))
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight.*float16.*--outtype bf16"):
        write_gguf(tmp_path / "src", tmp_path / "out", outtype="f16")
    assert not list((tmp_path / "out").glob("*gguf"))


def test_pre_tokenizer_choice(aquila_tokenizer_dir):
    spec = Tokenizer.from_dir(aquila_tokenizer_dir).to_json()
    assert llama_cpp_pre_tokenizer(spec) == ("gpt-2", None)
    name, note = llama_cpp_pre_tokenizer(Tokenizer.from_dir(BUNDLED_MODELS["aquila-tiny"]).to_json())
    assert name == "gpt-2" and "more than 16 CJK characters" in note
    spec["pre_tokenizer"]["add_prefix_space"] = True
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        llama_cpp_pre_tokenizer(spec)
    spec["normalizer"] = {"type": "NFC"}
    with pytest.raises(ConfigError, match="normalizer"):
        llama_cpp_pre_tokenizer(spec)


def test_cli_writes_gguf_and_modelfile(tmp_path, capsys):
    assert cli_main(["convert", "aquila-tiny", str(tmp_path), "--to", "gguf", "--outtype", "q8_0",
                     "--template", "aquila-legacy"]) == 0
    out = capsys.readouterr()
    assert "aquila-tiny-q8_0.gguf" in out.out and "more than 16 CJK characters" in out.err
    modelfile = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./aquila-tiny-q8_0.gguf\n" in modelfile
    assert [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "</s>"', 'PARAMETER stop "[UNK]"']
    assert "PARAMETER num_ctx 512" in modelfile
    f = fields(reader(tmp_path / "aquila-tiny-q8_0.gguf"))
    assert f["tokenizer.chat_template"] == jinja_template("aquila-legacy")
    assert cli_main(["convert", "aquila-tiny", str(tmp_path / "x"), "--to", "hf", "--outtype", "q8_0"]) != 0
    assert "--outtype applies to --to gguf only" in capsys.readouterr().err


GO_PROGRAM = r"""package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		System   string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain (Debian golang-go)")
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_ollama_template_renders_like_ours_in_go(tmp_path, name):
    """The Modelfile TEMPLATE executed by Go's text/template (Ollama's engine) with the variables
    Ollama passes (``template/template.go`` ``Execute``: ``.System`` = the system messages,
    ``.Messages`` = all messages, system ones included) equals our rendering."""
    from aquilachat.chat_format import ollama_template
    (tmp_path / "main.go").write_text(GO_PROGRAM, encoding="utf-8")
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "用golang实现冒泡排序算法"}]
    for system in (None, "You are terse."):
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        payload = {"Template": ollama_template(name), "System": system or "",
                   "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        run = subprocess.run(["go", "run", "main.go"], input=json.dumps(payload), capture_output=True,
                             text=True, cwd=tmp_path, timeout=300, env={**os.environ, "GO111MODULE": "off"})
        assert run.returncode == 0, run.stderr
        assert run.stdout == render_text(messages, name)
