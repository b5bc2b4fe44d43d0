"""The training YAML: FlagAI's field names plus ours, validated with pydantic.

FlagAI's Aquila SFT YAML (``examples/Aquila/Aquila-sft/aquila-sft.yaml`` and ``flagai/env_args.py``)
uses ``batch_size``, ``gradient_accumulation_steps``, ``lr``, ``warm_up`` (a ratio of the total
steps), ``save_interval``, ``log_interval``, ``epochs``, ``weight_decay``, ``adam_beta1/2``,
``eps``, ``enable_sft_dataset_dir``, ``enable_sft_dataset_file``,
``enable_sft_conversations_dataset_v3``, ``lora``, ``lora_r``, ``lora_alpha``; those keep their
names and meanings here. FlagAI's own spellings ``clip_grad``, ``checkpoint_activations``,
``save_dir`` and ``pre_load_dir`` + ``model_name`` are accepted as aliases. FlagAI keys that have no
meaning in this trainer (BMTrain, DeepSpeed, wandb settings, ...) are accepted and reported as
ignored, so an original YAML runs unchanged; any other unknown key is an error that lists the valid
keys (a typo never silently falls back to a default).

Relative paths (model, tokenizer, data, output directory) are resolved against the YAML file's
directory, so the same file works from any working directory and on every node.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..chat_format import TEMPLATES
from ..errors import ConfigError

__all__ = ["TrainConfig", "load_config", "FLAGAI_IGNORED_KEYS", "DATA_FORMATS"]

#: Dataset formats (see :mod:`aquilachat.train.data`).
DATA_FORMATS = ("auto", "conversations", "sharegpt", "openai", "alpaca", "text")

#: FlagAI ``EnvArgs`` keys accepted for compatibility but without effect here.
FLAGAI_IGNORED_KEYS = frozenset({
    "env_type", "fp16", "pytorch_device", "already_fp16", "warmup_start_lr", "skip_iters",
    "eval_interval", "save_optim", "save_rng", "load_optim", "load_rng", "load_type", "load_dir",
    "tensorboard", "tensorboard_dir", "wandb", "wandb_dir", "wandb_key", "resume_dataset",
    "deepspeed_activation_checkpointing", "num_checkpoints", "master_ip", "master_port", "num_nodes",
    "num_gpus", "hostfile", "deepspeed_config", "model_parallel_size", "training_script",
    "not_call_launch", "local_rank", "yaml_config", "bmt_cpu_offload", "bmt_lr_decay_style",
    "bmt_loss_scale", "bmt_loss_scale_steps", "bmt_async_load", "bmt_pre_load",
    "enable_sft_dataset_val_file", "enable_sft_dataset", "enable_sft_dataset_text",
    "enable_sft_dataset_jsonl", "enable_sft_conversations_dataset",
    "enable_sft_conversations_dataset_v2", "enable_weighted_dataset_v2", "enable_flash_attn_models",
    "IGNORE_INDEX",
})

#: FlagAI spellings -> our field names.
ALIASES = {"clip_grad": "clip_grad_norm", "checkpoint_activations": "gradient_checkpointing",
           "save_dir": "output_dir"}


class TrainConfig(BaseModel):
    """Every setting of ``aquilachat sft`` / ``aquilachat pretrain`` (one YAML file).

    Build with :func:`load_config` (from a file) or :meth:`from_dict`; both raise
    :class:`~aquilachat.errors.ConfigError` with one line naming the file and field.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    # ---------------------------------------------------------------- model and tokenizer
    model: str | None = Field(None, description="checkpoint to start from: a directory (Hugging Face or "
                              "FlagAI layout), a bundled model name or a Hugging Face repo id")
    architecture: str | dict[str, Any] | None = Field(
        None, description="train from scratch instead: a ModelConfig preset name (e.g. 'tiny', "
        "'aquila-7b'), a path to a config.json, or a dict of ModelConfig fields (optionally with "
        "'preset' to start from); vocab_size defaults to the tokenizer's size")
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the model directory)")
    template: str = Field("aquila-chat", description="chat template of the conversations (sft); "
                          "must match the template used to serve the model")
    max_seq_len: int | None = Field(None, ge=2, description="tokens per sample; longer samples are "
                                    "truncated (default: the model's context, at most 2048)")
    packing: bool = Field(False, description="concatenate samples into max_seq_len rows instead of "
                          "padding each batch to its longest sample (pretrain always packs)")

    # ---------------------------------------------------------------- data
    data: list[str] = Field(default_factory=list, description="dataset files or directories "
                            "(*.jsonl, *.json, *.txt), in addition to the FlagAI keys below")
    enable_sft_dataset_dir: str | None = Field(None, description="FlagAI: dataset directory")
    enable_sft_dataset_file: str | list[str] | None = Field(
        None, description="FlagAI: dataset file(s) inside enable_sft_dataset_dir")
    enable_sft_conversations_dataset_v3: bool = Field(
        False, description="FlagAI: the data is conversations JSONL (same as data_format: conversations)")
    data_format: Literal["auto", "conversations", "sharegpt", "openai", "alpaca", "text"] = Field(
        "auto", description="auto-detect from each file's first row, or force one format")
    text_field: str = Field("text", description="pretraining JSONL: the key holding the text")
    skip_bad_rows: bool = Field(False, description="skip and count malformed rows instead of "
                                "stopping at the first one")
    shuffle_dataset: bool = Field(True, description="shuffle the order each epoch (a pure function "
                                  "of seed and epoch)")

    # ---------------------------------------------------------------- optimisation
    epochs: int = Field(1, ge=1, description="passes over the data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to run (overrides epochs)")
    batch_size: int = Field(1, ge=1, description="samples per micro-batch per process")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-5, gt=0, description="peak learning rate (AdamW)")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine decay")
    warm_up: float = Field(0.01, ge=0, lt=1, description="linear warm-up length as a ratio of the total steps")
    warm_up_iters: int = Field(0, ge=0, description="warm-up length in steps (overrides warm_up when > 0)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only, not norms)")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    clip_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = off); "
                                  "FlagAI: clip_grad")
    seed: int = Field(1234, description="seeds weights (from scratch), data order and dropout")

    # ---------------------------------------------------------------- precision, memory, devices
    bf16: bool | None = Field(None, description="bf16 autocast; default: on for CUDA devices that "
                              "support it, off on the CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward "
                                         "pass (FlagAI: checkpoint_activations)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: replicate the model; fsdp: "
                                             "shard it with FSDP2 (fully_shard) for models that do "
                                             "not fit one device")
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower; for "
                                "bit-exact reruns)")

    # ---------------------------------------------------------------- LoRA
    lora: bool = Field(False, description="train LoRA adapters (peft) instead of all weights; "
                       "merged into the weights on export")
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           description="module names that get adapters")

    # ---------------------------------------------------------------- output
    output_dir: str = Field("checkpoints_out", description="runs go to output_dir/experiment_name "
                            "(FlagAI: save_dir)")
    experiment_name: str = Field("aquila_experiment", min_length=1)
    save_interval: int = Field(1000, ge=1, description="checkpoint every this many optimizer steps "
                               "(and at the end)")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep only the newest N step "
                                         "checkpoints (default: all)")
    log_interval: int = Field(1, ge=1, description="write metrics.jsonl every this many steps")
    export_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the final exported model (checkpoints stay float32 for exact resume)")

    # ---------------------------------------------------------------- validators
    @model_validator(mode="before")
    @classmethod
    def _flagai_compat(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in ALIASES.items():
            if old in data:
                if new in data:
                    raise ValueError(f"both {old!r} (FlagAI) and {new!r} are set; keep one")
                data[new] = data.pop(old)
        pre, name = data.pop("pre_load_dir", None), data.pop("model_name", None)
        if data.get("model") is None and pre is not None and name is not None:
            data["model"] = os.path.join(str(pre), str(name))
        for key in FLAGAI_IGNORED_KEYS & set(data):
            data.pop(key)
        return data

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in TEMPLATES:
            raise ValueError(f"unknown template {value!r}; templates: {', '.join(TEMPLATES)}")
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _data_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _modules_list(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.model is None and self.architecture is None:
            raise ValueError("set 'model' (a checkpoint to fine-tune) or 'architecture' (to train from scratch)")
        if self.model is not None and self.architecture is not None:
            raise ValueError("set only one of 'model' and 'architecture'")
        if self.architecture is not None and self.tokenizer is None:
            raise ValueError("training from 'architecture' needs a 'tokenizer' directory")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        return self

    # ---------------------------------------------------------------- derived
    @property
    def effective_data_format(self) -> str:
        """``data_format``, with FlagAI's ``enable_sft_conversations_dataset_v3`` honoured."""
        if self.data_format == "auto" and self.enable_sft_conversations_dataset_v3:
            return "conversations"
        return self.data_format

    def data_paths(self) -> list[Path]:
        """Dataset files and directories: ``data`` plus FlagAI's ``enable_sft_dataset_dir`` /
        ``enable_sft_dataset_file`` (a file name, a list, or comma-separated names).

        Raises:
            ConfigError: no data given, or a path that does not exist (naming the key).
        """
        paths: list[tuple[str, Path]] = [("data", Path(p)) for p in self.data]
        files = self.enable_sft_dataset_file
        if isinstance(files, str):
            files = [f.strip() for f in files.split(",") if f.strip()]
        base = Path(self.enable_sft_dataset_dir) if self.enable_sft_dataset_dir else None
        if files:
            paths += [("enable_sft_dataset_file", base / f if base else Path(f)) for f in files]
        elif base is not None:
            paths.append(("enable_sft_dataset_dir", base))
        if not paths:
            raise ConfigError("no training data: set 'data' (or FlagAI's enable_sft_dataset_dir + "
                              "enable_sft_dataset_file)")
        for key, p in paths:
            if not p.exists():
                raise ConfigError(f"{key}: {p} does not exist")
        return [p for _, p in paths]

    @property
    def run_dir(self) -> Path:
        """``output_dir / experiment_name``: checkpoints, metrics, logs and the final model."""
        return Path(self.output_dir) / self.experiment_name

    # ---------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", base_dir: Path | None = None) -> "TrainConfig":
        """Validate a dict (the parsed YAML); relative paths are resolved against ``base_dir``.

        Raises:
            ConfigError: one line naming ``source``, the field and what is wrong; an unknown key
                lists the valid keys (and the closest match).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, source)) from None
        if base_dir is not None:
            cfg = cfg._resolve_paths(Path(base_dir))
        return cfg

    def _resolve_paths(self, base: Path) -> "TrainConfig":
        def rel(p: str | None, must_exist: bool = False) -> str | None:
            if p is None:
                return None
            path = Path(p).expanduser()
            if path.is_absolute():
                return str(path)
            candidate = base / path
            if must_exist or candidate.exists():
                return str(candidate)
            return p  # a bundled name or a repo id
        updates: dict[str, Any] = {
            "model": rel(self.model),
            "tokenizer": rel(self.tokenizer),
            "data": [str(base / p) if not Path(p).expanduser().is_absolute() else str(Path(p).expanduser())
                     for p in self.data],
            "output_dir": rel(self.output_dir, must_exist=True),
        }
        if self.enable_sft_dataset_dir is not None:
            updates["enable_sft_dataset_dir"] = rel(self.enable_sft_dataset_dir, must_exist=True)
        elif self.enable_sft_dataset_file is not None:
            files = self.enable_sft_dataset_file
            files = [files] if isinstance(files, str) else files
            updates["enable_sft_dataset_file"] = [rel(f, must_exist=True) for f in files]
        if isinstance(self.architecture, str) and (base / self.architecture).is_file():
            updates["architecture"] = str(base / self.architecture)
        return self.model_copy(update=updates)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The settings as plain data (written beside the run as ``config.yaml``)."""
        return self.model_dump(mode="json")


def _format_error(exc: ValidationError, source: str) -> str:
    valid = sorted(TrainConfig.model_fields)
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][0])
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msgs.append(f"unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("value_error", "assertion_error") and not err["loc"]:
                msgs.append(msg)
            else:
                msgs.append(f"{loc}: {msg} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(msgs)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """Read a training YAML; return the config and the FlagAI keys that were ignored.

    ``overrides`` are ``KEY=VALUE`` strings (values parsed as YAML), applied on top of the file
    (``aquilachat sft cfg.yaml --set max_steps=10``).

    Raises:
        ConfigError: unreadable file, invalid YAML (with its line), or invalid settings.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        data[key.strip()] = yaml.safe_load(value) if value.strip() else None
    ignored = sorted(FLAGAI_IGNORED_KEYS & set(data))
    return TrainConfig.from_dict(data, source=str(path), base_dir=path.resolve().parent), ignored
