"""Reading and writing checkpoints: Hugging Face layout, FlagAI layout, Hugging Face Hub repo ids.

Hugging Face layout: ``config.json`` + ``model.safetensors`` | sharded ``*.safetensors`` with
``model.safetensors.index.json`` | ``pytorch_model*.bin`` (read with ``torch.load(weights_only=True,
mmap=True)``), plus tokenizer files. Tensors are read one at a time from memory-mapped files and
assigned into a model built on the ``meta`` device, so loading needs about one copy of the weights.

FlagAI layout (``checkpoints_in/aquilachat-7b/``): FlagAI ``config.json`` (``dim``, ``n_layers``,
...), ``pytorch_model.bin`` with FlagAI key names (possibly under a ``module`` key), ``vocab.json``,
``merges.txt``, ``special_tokens_map.json``. FlagAI's rotary embedding rotates interleaved pairs
(``view_as_complex``), Hugging Face's rotates halves (``rotate_half``), so the rows of ``wq`` and
``wk`` are permuted on conversion (the permutation of transformers'
``convert_llama_weights_to_hf.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import AquilaForCausalLM

__all__ = ["load_model", "load_state_dict", "save_hf", "save_flagai", "convert", "resolve_model_path",
           "detect_layout", "hf_to_flagai_state_dict", "flagai_to_hf_state_dict", "BUNDLED_MODELS",
           "resolve_dtype"]

BUNDLED_DIR = Path(__file__).parent / "assets"
#: Models shipped inside the package, by name.
BUNDLED_MODELS = {"aquila-tiny": BUNDLED_DIR / "aquila-tiny"}

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "tokenizer_config.json", "added_tokens.json")
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)freqs_cis$")


# ---------------------------------------------------------------------------- locating
def resolve_model_path(model: str | os.PathLike) -> Path:
    """Turn a model name into a local directory.

    ``model`` is a bundled name (``aquila-tiny``), a local directory, or a Hugging Face repo id
    (``BAAI/AquilaChat-7B``) fetched with ``huggingface_hub.snapshot_download`` (from the local
    cache when offline or ``HF_HUB_OFFLINE=1``).

    Raises:
        CheckpointError: nothing found under that name, naming it.
    """
    name = str(model)
    if name in BUNDLED_MODELS:
        path = BUNDLED_MODELS[name]
        if not (path / "config.json").exists():
            raise CheckpointError(f"bundled model {name!r} is not installed at {path}")
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: a model must be a directory (config.json and weights), not a file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{name}: not a local directory, and huggingface_hub is not installed "
                                  "to fetch it (pip install huggingface_hub)") from None
        patterns = ["*.json", "*.safetensors", "*.bin", "merges.txt", "*.model", "*.txt"]
        try:
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as exc:  # offline, not found, gated: one readable line
            raise CheckpointError(f"{name}: not a local directory, and fetching it from the Hugging Face "
                                  f"Hub failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    raise CheckpointError(f"{name}: no such model directory, bundled model ({', '.join(BUNDLED_MODELS)}) or repo id")


def detect_layout(path: Path) -> str:
    """``"hf"`` or ``"flagai"``, from the keys of ``config.json`` (or ``params.json``)."""
    for name in ("config.json", "params.json"):
        cfg = path / name
        if cfg.exists():
            try:
                data = json.loads(cfg.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{cfg}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
            return "flagai" if isinstance(data, dict) and "dim" in data and "n_layers" in data else "hf"
    raise CheckpointError(f"{path}: no config.json (or params.json) in the model directory")


def _config_file(path: Path) -> Path:
    return path / "config.json" if (path / "config.json").exists() else path / "params.json"


# ---------------------------------------------------------------------------- reading tensors
def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
            return files
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin", "consolidated*.pth"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{path}: no weights found (model.safetensors, *.safetensors, pytorch_model*.bin)")


def _iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` from one weights file without reading the whole file into memory."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # SafetensorError (truncated / corrupt header)
            raise CheckpointError(f"{file}: cannot read safetensors file: {exc}") from None
        return
    try:
        data = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        try:  # old (non-zip) serialization cannot be memory-mapped
            data = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"{file}: cannot read PyTorch weights file: {exc}") from None
    if isinstance(data, dict) and "module" in data and isinstance(data["module"], dict):
        data = data["module"]  # FlagAI / DeepSpeed wrap the state dict
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a state dict, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {key!r} is not a tensor")
        yield key, value


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory as stored (no renaming); also which file each came from."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in _weight_files(path):
        for key, t in _iter_tensors(file):
            tensors[key] = t
            origin[key] = file
    return tensors, origin


# ---------------------------------------------------------------------------- FlagAI <-> HF
def _permute_interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of FlagAI/Meta ``wq``/``wk`` (interleaved rotary pairs) -> Hugging Face (rotate_half)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _permute_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_permute_interleaved_to_half`."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


_FLAGAI_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_FLAGAI_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}


def flagai_to_hf_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig, *,
                            source: str = "pytorch_model.bin") -> dict[str, torch.Tensor]:
    """Rename FlagAI keys to Hugging Face keys and permute q/k rows.

    Raises:
        CheckpointError: a key that is not a FlagAI Aquila parameter, naming it and ``source``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if _IGNORED_KEYS.search(key):
            continue
        if key in _FLAGAI_TOP:
            out[_FLAGAI_TOP[key]] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
        if not m or m.group(2) not in _FLAGAI_LAYER:
            raise CheckpointError(f"{source}: unexpected key {key!r} for a FlagAI Aquila checkpoint")
        name = _FLAGAI_LAYER[m.group(2)]
        if name == "self_attn.q_proj":
            t = _permute_interleaved_to_half(t, config.num_attention_heads)
        elif name == "self_attn.k_proj":
            t = _permute_interleaved_to_half(t, config.num_key_value_heads)
        out[f"model.layers.{m.group(1)}.{name}.weight"] = t
    return out


def hf_to_flagai_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flagai_to_hf_state_dict` (tied ``lm_head`` written out as ``output``)."""
    top = {v: k for k, v in _FLAGAI_TOP.items()}
    layer = {v: k for k, v in _FLAGAI_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in top:
            out[top[key]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
        if not m or m.group(2) not in layer:
            raise CheckpointError(f"unexpected key {key!r} for an Aquila model")
        name = m.group(2)
        if name == "self_attn.q_proj":
            t = _permute_half_to_interleaved(t, config.num_attention_heads)
        elif name == "self_attn.k_proj":
            t = _permute_half_to_interleaved(t, config.num_key_value_heads)
        out[f"layers.{m.group(1)}.{layer[name]}.weight"] = t
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ---------------------------------------------------------------------------- loading
def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """``"auto"``: the checkpoint's dtype on an accelerator; float32 on the CPU, where float16
    matrix products are slow (bfloat16 checkpoints stay bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        stored = names.get(str(config.torch_dtype), torch.float32)
        if device.type == "cpu" and stored == torch.float16:
            return torch.float32
        return stored
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return names[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(model: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto") -> AquilaForCausalLM:
    """Load a checkpoint (any supported layout) into an :class:`AquilaForCausalLM` in eval mode.

    Raises:
        CheckpointError: missing or truncated files, missing/unexpected keys, wrong shapes; the
            message names the file and the key.
        ConfigError: the config is malformed or of an unknown architecture.
    """
    path = resolve_model_path(model)
    layout = detect_layout(path)
    config = ModelConfig.from_file(_config_file(path))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, config, device)
    raw, origin = load_state_dict(path)
    if layout == "flagai":
        sources = {str(f) for f in origin.values()}
        sd = flagai_to_hf_state_dict(raw, config, source=", ".join(sorted(sources)))
        origin = {k: Path(next(iter(sources))) for k in sd}
    else:
        sd = {k: v for k, v in raw.items() if not _IGNORED_KEYS.search(k)}
    with torch.device("meta"):
        m = AquilaForCausalLM(config)
    expected = {k: p for k, p in m.state_dict(keep_vars=True).items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    files = ", ".join(sorted({str(f) for f in origin.values()}))
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{files}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise CheckpointError(f"{origin.get(unexpected[0], files)}: unexpected key {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, param in expected.items():
        if tuple(sd[key].shape) != tuple(param.shape):
            raise CheckpointError(f"{origin.get(key, files)}: tensor {key!r} has shape {tuple(sd[key].shape)}, "
                                  f"expected {tuple(param.shape)} from config.json")
    raw.clear()
    # convert one tensor at a time and drop the source at once: peak memory ~ one copy + one tensor
    state = {k: sd.pop(k).to(device=device, dtype=dtype) for k in expected}
    sd.clear()
    m.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    return m.eval()


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer stored beside a checkpoint (see :class:`aquilachat.tokenizer.Tokenizer`)."""
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve_model_path(model))


# ---------------------------------------------------------------------------- saving
def _copy_tokenizer(tokenizer, src: Path | None, dst: Path) -> None:
    if tokenizer is not None:
        tokenizer.save(dst)
    elif src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)


def save_hf(model: AquilaForCausalLM, path: str | os.PathLike, *, tokenizer=None,
            tokenizer_dir: str | os.PathLike | None = None, template: str | None = None) -> None:
    """Write a Hugging Face checkpoint: ``config.json``, ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files with the chat ``template``'s Jinja
    (:func:`aquilachat.export.write_serving_files`), loadable by
    ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer``, vLLM and :func:`load_model`."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    cfg = ModelConfig(**{**config.__dict__, "torch_dtype": str(model.dtype).removeprefix("torch.")})
    cfg.save(path / "config.json")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(tokenizer, Path(tokenizer_dir) if tokenizer_dir else None, path)
    from .export import write_serving_files
    write_serving_files(path, config, template=template, tokenizer=tokenizer)


def save_flagai(model: AquilaForCausalLM, path: str | os.PathLike, *, tokenizer=None,
                tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Write FlagAI layout: FlagAI ``config.json``, ``pytorch_model.bin`` with FlagAI key names and
    interleaved q/k rows, and ``vocab.json`` / ``merges.txt`` / ``special_tokens_map.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = hf_to_flagai_state_dict({k: v.detach() for k, v in model.state_dict().items()}, model.config)
    sd = {k: v.contiguous().clone() for k, v in sd.items()}  # no shared storage in the file
    cfg = model.config.to_flagai_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    torch.save(sd, path / "pytorch_model.bin")
    _copy_tokenizer(tokenizer, Path(tokenizer_dir) if tokenizer_dir else None, path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, outtype: str | None = None,
            template: str | None = None) -> Path:
    """Convert a checkpoint between layouts, keeping its dtype exactly (``aquilachat convert``);
    ``to="gguf"`` writes a GGUF file with ``outtype`` (:func:`aquilachat.export_gguf.write_gguf`).
    ``template``: the chat template the export declares (default: the source's, else aquila-chat).

    Raises:
        ConfigError: ``to`` is not ``"hf"``, ``"flagai"`` or ``"gguf"``.
    """
    if to == "gguf":
        from .export_gguf import write_gguf
        return write_gguf(src, dst, outtype=outtype, template=template).path
    if to not in ("hf", "flagai"):
        raise ConfigError(f"--to must be 'hf', 'flagai' or 'gguf', got {to!r}")
    if outtype is not None:
        raise ConfigError("--outtype applies to --to gguf only (hf and flagai keep the stored dtype)")
    src_path = resolve_model_path(src)
    config = ModelConfig.from_file(_config_file(src_path))
    dtype = resolve_dtype("auto", config, torch.device("cuda"))  # keep the stored dtype
    model = load_model(src_path, dtype=dtype, device="cpu")
    tokenizer = None
    if any((src_path / n).exists() for n in ("tokenizer.json", "vocab.json")):
        from .tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(src_path)
    if to == "hf":
        save_hf(model, dst, tokenizer=tokenizer, template=template)
    else:
        save_flagai(model, dst, tokenizer=tokenizer)
    return Path(dst)
