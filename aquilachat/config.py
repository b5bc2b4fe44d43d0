"""Model configuration: one dataclass, built from a Hugging Face or FlagAI ``config.json`` or a preset.

Field names are Hugging Face's ``LlamaConfig`` names, so a ``config.json`` written by
transformers reads back unchanged and ours loads in ``transformers.AutoConfig``.
FlagAI's names (``dim``, ``n_layers``, ``n_heads``, ``multiple_of``, ``norm_eps``, ``max_seq_len``)
are converted by :meth:`ModelConfig.from_flagai`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Architectures (``model_type`` / ``architectures[0]``) that are the LLaMA decoder we implement.
SUPPORTED_MODEL_TYPES = ("llama", "aquila")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "AquilaForCausalLM", "AquilaModel")


def swiglu_hidden_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden width as in Meta's LLaMA and FlagAI's Aquila (``FeedForward.__init__``).

    ``hidden = int(2 * 4 * dim / 3)``, optionally scaled by ``ffn_dim_multiplier``, rounded up to a
    multiple of ``multiple_of``. For dim 4096 and multiple_of 256 this is 11008 (Aquila-7B).
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """Shape and numerics of a LLaMA-architecture decoder (Aquila is one).

    Derived: ``head_dim = hidden_size // num_attention_heads`` unless given;
    ``num_key_value_heads`` defaults to ``num_attention_heads`` (multi-head attention).

    Raises:
        ConfigError: inconsistent sizes (hidden_size not divisible by the heads, heads not a
            multiple of the key/value heads, non-positive sizes).
    """

    vocab_size: int = 100008
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100006
    eos_token_id: int | list[int] | None = 100007
    pad_token_id: int | None = 0
    torch_dtype: str = "float16"
    initializer_range: float = 0.02
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")

    # ------------------------------------------------------------------ derived
    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (Hugging Face allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def num_parameters(self) -> int:
        """Number of parameters of the model this config describes."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return emb * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + h

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (``LlamaConfig`` / ``AquilaConfig`` fields).

        Unknown fields (``use_cache``, ``transformers_version``, ...) are ignored; rope scaling,
        attention or MLP biases are refused since the model does not implement them.

        Raises:
            ConfigError: an unknown architecture or an unsupported feature, naming ``source``.
        """
        model_type = data.get("model_type")
        archs = data.get("architectures") or []
        if model_type is None and not archs:
            raise ConfigError(f"{source}: no 'model_type' or 'architectures' key; cannot tell the architecture")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{source}: architectures {archs!r} are not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for flag in ("attention_bias", "mlp_bias"):
            if data.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported")
        if data.get("rope_scaling"):
            scaling = data["rope_scaling"]
            kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
            if kind not in (None, "default"):
                raise ConfigError(f"{source}: rope_scaling {scaling!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        # transformers >= 4.56 may nest rope_theta under rope_parameters
        if "rope_theta" not in kwargs and isinstance(data.get("rope_parameters"), dict):
            if "rope_theta" in data["rope_parameters"]:
                kwargs["rope_theta"] = data["rope_parameters"]["rope_theta"]
        if "torch_dtype" not in kwargs and isinstance(data.get("dtype"), str):
            kwargs["torch_dtype"] = data["dtype"]
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict that ``transformers.LlamaConfig`` reads."""
        d = dataclasses.asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"],
                 attention_bias=False, mlp_bias=False, use_cache=True, rope_scaling=None,
                 pretraining_tp=1, attention_dropout=0.0)
        return d

    # ------------------------------------------------------------------ FlagAI
    @classmethod
    def from_flagai_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Build from FlagAI's / Meta's ``config.json`` or ``params.json``.

        Fields: ``dim``, ``n_layers``, ``n_heads``, optional ``n_kv_heads``, ``multiple_of``
        (default 256), optional ``ffn_dim_multiplier``, ``norm_eps`` (or ``layer_norm_epsilon``),
        ``vocab_size`` (Aquila: 100008), ``max_seq_len``, optional ``rope_theta``. The SwiGLU width
        follows :func:`swiglu_hidden_size`.

        Raises:
            ConfigError: a required field is missing, naming ``source`` and the field.
        """
        for key in ("dim", "n_layers", "n_heads"):
            if key not in data:
                raise ConfigError(f"{source}: FlagAI config lacks required key {key!r}")
        vocab = data.get("vocab_size", 100008)
        if vocab is None or vocab <= 0:  # Meta's params.json writes -1 (taken from the tokenizer)
            vocab = 100008
        dim = int(data["dim"])
        return cls(
            vocab_size=int(vocab),
            hidden_size=dim,
            intermediate_size=int(data.get("intermediate_size") or swiglu_hidden_size(
                dim, int(data.get("multiple_of", 256)), data.get("ffn_dim_multiplier"))),
            num_hidden_layers=int(data["n_layers"]),
            num_attention_heads=int(data["n_heads"]),
            num_key_value_heads=data.get("n_kv_heads"),
            rms_norm_eps=float(data.get("norm_eps", data.get("layer_norm_epsilon", 1e-5))),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            max_position_embeddings=int(data.get("max_seq_len", 2048)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            torch_dtype=data.get("torch_dtype", "float16"),
        )

    def to_flagai_dict(self) -> dict[str, Any]:
        """FlagAI ``config.json`` dict. ``intermediate_size`` is written too, since not every width
        can be expressed with ``multiple_of``."""
        return {
            "dim": self.hidden_size, "n_layers": self.num_hidden_layers, "n_heads": self.num_attention_heads,
            "n_kv_heads": self.num_key_value_heads, "multiple_of": 256,
            "intermediate_size": self.intermediate_size, "norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size, "max_seq_len": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "torch_dtype": self.torch_dtype,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Detect the layout (FlagAI keys ``dim``/``n_layers`` vs. Hugging Face keys) and build."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if cls.is_flagai_dict(data):
            return cls.from_flagai_dict(data, source=source)
        return cls.from_hf_dict(data, source=source)

    @staticmethod
    def is_flagai_dict(data: Any) -> bool:
        """Whether a parsed ``config.json`` is FlagAI's (``dim``, ``n_layers``, ...) rather than
        Hugging Face's: the one rule that tells the two layouts apart."""
        return isinstance(data, dict) and "dim" in data and "n_layers" in data

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a ``config.json`` / ``params.json`` in either layout.

        Raises:
            ConfigError: the file is missing or not valid JSON, or the config is unsupported.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        """A named preset from :data:`PRESETS`.

        Raises:
            ConfigError: unknown name (the message lists the presets).
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    def save(self, path: str | os.PathLike) -> None:
        """Write Hugging Face ``config.json``."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")


_AQUILA_7B = dict(vocab_size=100008, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="float16",
                  bos_token_id=100006, eos_token_id=100007, pad_token_id=0)

#: Named presets kept as plain data. The 7B ones are the published Aquila architecture
#: (FlagAI ``examples/Aquila``); the tiny ones are for tests and benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "aquila-7b": dict(_AQUILA_7B),
    "aquilachat-7b": dict(_AQUILA_7B),
    "aquilacode-7b": dict(_AQUILA_7B),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                 torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-gqa": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # ~20M and ~100M parameter configs with the Aquila vocabulary, for benchmarks
    "bench-20m": dict(vocab_size=100008, hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=2048, torch_dtype="float32"),
    "bench-100m": dict(vocab_size=100008, hidden_size=448, intermediate_size=1280, num_hidden_layers=8,
                       num_attention_heads=8, max_position_embeddings=2048, torch_dtype="float32"),
}
