"""The training YAML: FlagAI names, aliases, unknown keys, validation messages, paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aquilachat.errors import ConfigError
from aquilachat.train.config import FLAGAI_IGNORED_KEYS, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]

# FlagAI's examples/Aquila SFT YAML, as users have it
FLAGAI_YAML = """\
batch_size: 10
gradient_accumulation_steps: 1
lr: 2.0e-5
warm_up: 0.01
save_interval: 1000
log_interval: 10
epochs: 2
weight_decay: 0.1
adam_beta1: 0.9
adam_beta2: 0.95
eps: 1.0e-8
clip_grad: 1.0
checkpoint_activations: true
bmt_cpu_offload: False
bmt_pre_load: True
bmt_loss_scale: 65536
save_optim: True
save_rng: True
enable_sft_conversations_dataset_v3: True
enable_sft_dataset_dir: './datasets/'
enable_sft_dataset_file: 'sft_samples.jsonl'
lora: True
lora_r: 8
lora_alpha: 16
"""


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_flagai_yaml_loads_with_its_names(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "sft_samples.jsonl").write_text("{}\n")
    path = _write(tmp_path, FLAGAI_YAML + "model: aquila-tiny\n")
    cfg, ignored = load_config(path)
    assert cfg.batch_size == 10 and cfg.lr == 2e-5 and cfg.warm_up == 0.01 and cfg.epochs == 2
    assert cfg.adam_beta2 == 0.95 and cfg.weight_decay == 0.1 and cfg.log_interval == 10
    assert cfg.clip_grad_norm == 1.0 and cfg.gradient_checkpointing is True  # FlagAI aliases
    assert cfg.lora and cfg.lora_r == 8 and cfg.lora_alpha == 16
    assert cfg.effective_data_format == "conversations"
    assert ignored == ["bmt_cpu_offload", "bmt_loss_scale", "bmt_pre_load", "save_optim", "save_rng"]
    # the FlagAI dataset keys resolve against the YAML's directory, not the working directory
    assert cfg.data_paths() == [tmp_path / "datasets" / "sft_samples.jsonl"]


def test_unknown_key_lists_valid_keys(tmp_path):
    path = _write(tmp_path, "model: aquila-tiny\ndata: x.jsonl\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "unknown key 'learning_rate'" in msg
    assert "valid keys:" in msg
    for key in ("batch_size", "lr", "warm_up", "enable_sft_dataset_file", "lora_r", "strategy"):
        assert re.search(rf"\b{key}\b", msg)
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size'"):
        TrainConfig.from_dict({"model": "m", "batchsize": 2})


@pytest.mark.parametrize("field, value, fragment", [
    ("batch_size", 0, "batch_size: Input should be greater than or equal to 1"),
    ("warm_up", 1.5, "warm_up: Input should be less than 1"),
    ("strategy", "zero3", "strategy: Input should be 'ddp' or 'fsdp'"),
    ("template", "llama-2", "unknown template 'llama-2'"),
    ("lr", "fast", "lr: Input should be a valid number"),
    ("data_format", "csv", "data_format: Input should be"),
])
def test_bad_values_name_the_field(field, value, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model": "m", field: value}, source="cfg.yaml")
    assert str(err.value).startswith("cfg.yaml: ")
    assert fragment in str(err.value)


def test_model_or_architecture():
    with pytest.raises(ConfigError, match="set 'model'"):
        TrainConfig.from_dict({})
    with pytest.raises(ConfigError, match="only one of"):
        TrainConfig.from_dict({"model": "m", "architecture": "tiny", "tokenizer": "t"})
    with pytest.raises(ConfigError, match="needs a 'tokenizer'"):
        TrainConfig.from_dict({"architecture": "tiny"})
    cfg = TrainConfig.from_dict({"architecture": {"preset": "tiny", "num_hidden_layers": 1}, "tokenizer": "t"})
    assert cfg.architecture == {"preset": "tiny", "num_hidden_layers": 1}


def test_alias_and_field_together_is_an_error():
    with pytest.raises(ConfigError, match="both 'clip_grad'"):
        TrainConfig.from_dict({"model": "m", "clip_grad": 1.0, "clip_grad_norm": 2.0})


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "model: m\nbatch_size: [1,\nlr: 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_and_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    path = _write(tmp_path, "model: aquila-tiny\ndata: d.jsonl\nmax_steps: 5\n")
    cfg, _ = load_config(path, ["max_steps=9", "lora=true", "lora_target_modules=q_proj,v_proj"])
    assert cfg.max_steps == 9 and cfg.lora and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.model == "aquila-tiny"  # not a path: stays a bundled name
    assert cfg.data == [str(tmp_path / "d.jsonl")]
    assert cfg.run_dir == tmp_path / "checkpoints_out" / "aquila_experiment"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["max_steps"])
    with pytest.raises(ConfigError, match="data: .* does not exist"):
        TrainConfig.from_dict({"model": "m", "data": ["/nonexistent/x.jsonl"]}).data_paths()
    with pytest.raises(ConfigError, match="no training data"):
        TrainConfig.from_dict({"model": "m"}).data_paths()


def test_docs_describe_every_key():
    doc = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [k for k in TrainConfig.model_fields if f"`{k}`" not in doc]
    assert not missing, f"docs/training.md lacks {missing}"
    assert "`clip_grad`" in doc and "`checkpoint_activations`" in doc
    assert all(k in doc for k in ("bmt_cpu_offload",)), "ignored FlagAI keys are listed"
    assert FLAGAI_IGNORED_KEYS
