"""Checkpoint layouts: Hugging Face (single, sharded, .bin), FlagAI, Hub cache; conversions; bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from aquilachat.checkpoint import convert, load_model, save_flagai, save_hf
from aquilachat.cli import main as cli_main
from aquilachat.errors import CheckpointError, ConfigError
from tests.helpers import make_tiny_model, tiny_config
from aquilachat.model import AquilaForCausalLM

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6, 7]])


@pytest.fixture()
def hf_dir(tmp_path, byte_tokenizer_dir):
    out = tmp_path / "hf"
    model = make_tiny_model(out, byte_tokenizer_dir)
    return out, model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def test_hf_safetensors_roundtrip(hf_dir):
    path, model = hf_dir
    loaded = load_model(path, device="cpu")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers(tmp_path, byte_tokenizer_dir, tied):
    path = tmp_path / "m"
    model = make_tiny_model(path, byte_tokenizer_dir, tie_word_embeddings=tied)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        want = ref(IDS).logits.float()
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)
    from transformers import AutoTokenizer
    from aquilachat.tokenizer import Tokenizer
    tok, hf_tok = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    text = "hello 你好 world"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)


def test_sharded_safetensors(hf_dir, tmp_path):
    path, model = hf_dir
    sd = load_file(path / "model.safetensors")
    keys = sorted(sd)
    out = tmp_path / "sharded"
    shutil.copytree(path, out)
    (out / "model.safetensors").unlink()
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, out / name)
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.testing.assert_close(logits(load_model(out, device="cpu")), logits(model), atol=0, rtol=0)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(out, device="cpu")


def test_pytorch_bin_with_old_rotary_buffers(hf_dir, tmp_path):
    path, model = hf_dir
    out = tmp_path / "bin"
    shutil.copytree(path, out)
    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # written by old transformers
    (out / "model.safetensors").unlink()
    torch.save(sd, out / "pytorch_model.bin")
    torch.testing.assert_close(logits(load_model(out, device="cpu")), logits(model), atol=0, rtol=0)


def test_flagai_layout_loads_and_converts_bit_exact(hf_dir, tmp_path):
    path, model = hf_dir
    flag = tmp_path / "checkpoints_in" / "aquilachat-7b"
    convert(path, flag, to="flagai")
    cfg = json.loads((flag / "config.json").read_text())
    assert {"dim", "n_layers", "n_heads", "norm_eps", "vocab_size"} <= set(cfg)
    sd = torch.load(flag / "pytorch_model.bin", weights_only=True)
    assert "layers.0.attention.wq.weight" in sd and "tok_embeddings.weight" in sd and "output.weight" in sd
    # q rows really are permuted (interleaved layout), v rows are not
    hf_sd = load_file(path / "model.safetensors")
    assert not torch.equal(sd["layers.0.attention.wq.weight"], hf_sd["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(sd["layers.0.attention.wv.weight"], hf_sd["model.layers.0.self_attn.v_proj.weight"])
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        assert (flag / name).exists()
    torch.testing.assert_close(logits(load_model(flag, device="cpu")), logits(model), atol=1e-5, rtol=1e-5)
    # wrapped in "module" as FlagAI/DeepSpeed save it
    torch.save({"module": sd}, flag / "pytorch_model.bin")
    torch.testing.assert_close(logits(load_model(flag, device="cpu")), logits(model), atol=1e-5, rtol=1e-5)
    back = tmp_path / "back"
    assert cli_main(["convert", str(flag), str(back), "--to", "hf"]) == 0
    again = load_file(back / "model.safetensors")
    assert set(again) == set(hf_sd)
    for k in hf_sd:
        assert torch.equal(again[k], hf_sd[k]), k


def test_flagai_interleaved_rotary_equivalence():
    """A FlagAI-style attention (complex rotation of interleaved pairs) on the FlagAI weights equals
    the Hugging Face attention on the permuted weights: the permutation is the right one."""
    from aquilachat.checkpoint import _permute_interleaved_to_half
    from aquilachat.model import apply_rotary, rotary_cos_sin
    torch.manual_seed(0)
    n_heads, head_dim, dim = 2, 8, 16
    wq = torch.randn(n_heads * head_dim, dim)
    x = torch.randn(1, 5, dim)
    pos = torch.arange(5)
    # FlagAI / Meta: freqs_cis polar, q viewed as complex pairs (q0,q1),(q2,q3)...
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cis = torch.polar(torch.ones(5, head_dim // 2), torch.outer(pos.float(), freqs))
    q = (x @ wq.T).view(1, 5, n_heads, head_dim)
    qc = torch.view_as_complex(q.reshape(1, 5, n_heads, head_dim // 2, 2))
    flag = torch.view_as_real(qc * cis[None, :, None]).flatten(3)  # (1, 5, H, D)
    # HF layout on permuted weights
    wq_hf = _permute_interleaved_to_half(wq, n_heads)
    qh = (x @ wq_hf.T).view(1, 5, n_heads, head_dim).transpose(1, 2)
    cos, sin = rotary_cos_sin(pos[None], head_dim, 10000.0, torch.float32)
    hf = apply_rotary(qh, cos, sin)  # (1, H, 5, D)
    # same dot products between positions (attention scores are what matter)
    s_flag = torch.einsum("bthd,bshd->bhts", flag, flag)
    s_hf = torch.einsum("bhtd,bhsd->bhts", hf, hf)
    torch.testing.assert_close(s_flag, s_hf, atol=1e-4, rtol=1e-4)


def test_hub_repo_id_from_offline_cache(hf_dir, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    path, model = hf_dir
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--BAAI--TinyAquila"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(path, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib
    import huggingface_hub.constants
    importlib.reload(huggingface_hub.constants)
    try:
        loaded = load_model("BAAI/TinyAquila", device="cpu")
        torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
        with pytest.raises(CheckpointError, match="BAAI/NotThere"):
            load_model("BAAI/NotThere", device="cpu")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_dtype_kept_on_bf16_conversion(hf_dir, tmp_path):
    path, _ = hf_dir
    model = load_model(path, dtype="bfloat16", device="cpu")
    save_hf(model, tmp_path / "bf16")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    convert(tmp_path / "bf16", tmp_path / "flag16", to="flagai")
    convert(tmp_path / "flag16", tmp_path / "bf16b", to="hf")
    a, b = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(tmp_path / "bf16b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) and b[k].dtype == torch.bfloat16 for k in a)


# ---------------------------------------------------------------------------- bad input
def test_missing_directory():
    with pytest.raises(CheckpointError, match="no-such-model"):
        load_model("./no-such-model", device="cpu")


def test_missing_weights(hf_dir):
    path, _ = hf_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(path, device="cpu")


def test_truncated_safetensors(hf_dir):
    path, _ = hf_dir
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path, device="cpu")


def test_wrong_shape(hf_dir):
    path, _ = hf_dir
    sd = load_file(path / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight.*\(3, 3\)"):
        load_model(path, device="cpu")


def test_missing_key(hf_dir):
    path, _ = hf_dir
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors.*missing key 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        load_model(path, device="cpu")


def test_unexpected_key(hf_dir):
    path, _ = hf_dir
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors.*unexpected key 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(path, device="cpu")


def test_unknown_architecture(hf_dir):
    path, _ = hf_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json.*model_type 'mistral'"):
        load_model(path, device="cpu")


def test_config_not_json(hf_dir):
    path, _ = hf_dir
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json.*invalid JSON at line 1"):
        load_model(path, device="cpu")


def test_cli_convert_error_is_one_line(hf_dir, tmp_path, capsys):
    path, _ = hf_dir
    (path / "model.safetensors").write_bytes(b"garbage")
    assert cli_main(["convert", str(path), str(tmp_path / "x"), "--to", "flagai"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors" in err and "Traceback" not in err


def test_flagai_unexpected_key(hf_dir, tmp_path):
    path, model = hf_dir
    flag = tmp_path / "flag"
    save_flagai(model, flag, tokenizer_dir=path)
    sd = torch.load(flag / "pytorch_model.bin", weights_only=True)
    sd["layers.0.attention.wz.weight"] = torch.zeros(1)
    torch.save(sd, flag / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*layers\.0\.attention\.wz\.weight"):
        load_model(flag, device="cpu")
