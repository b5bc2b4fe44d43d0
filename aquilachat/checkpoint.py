"""Reading and writing checkpoints: Hugging Face layout, FlagAI layout, Hugging Face Hub repo ids.

Hugging Face layout: ``config.json`` + ``model.safetensors`` | sharded ``*.safetensors`` with
``model.safetensors.index.json`` | ``pytorch_model*.bin`` (read with ``torch.load(weights_only=True,
mmap=True)``), plus tokenizer files.

A :class:`Checkpoint` resolves a model name once (bundled name, local directory, Hub repo id),
reads ``config.json`` once and knows its layout; everything that loads a model goes through it.
Loading never holds two copies of the weights (measured on the AquilaChat-7B shape in
``bench/load.py``):

* every key and shape is checked against the model (built on the ``meta`` device) before any
  tensor is read, so a bad checkpoint fails before anything large is allocated;
* a tensor already stored in the run dtype is used as it lies in the memory-mapped file (a private
  file mapping: its pages are the page cache's, no copy; a later in-place change copies only the
  pages it writes). The loader reads those pages in once (``MADV_POPULATE_READ``) so that the first
  request does not wait for the disk;
* a tensor in another dtype (float16 -> bfloat16) is converted on its own, and its source pages
  are dropped from the process at once (``MADV_DONTNEED`` on the private file mapping, which only
  discards the process's view of clean file pages), so the peak is the converted weights plus one
  tensor instead of plus one whole shard.

FlagAI layout (``checkpoints_in/aquilachat-7b/``): FlagAI ``config.json`` (``dim``, ``n_layers``,
...), ``pytorch_model.bin`` with FlagAI key names (possibly under a ``module`` key), ``vocab.json``,
``merges.txt``, ``special_tokens_map.json``. FlagAI's rotary embedding rotates interleaved pairs
(``view_as_complex``), Hugging Face's rotates halves (``rotate_half``), so the rows of ``wq`` and
``wk`` are permuted on conversion (the permutation of transformers'
``convert_llama_weights_to_hf.py``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .memory import DTYPES, MemoryPlan, plan_memory
from .model import AquilaForCausalLM
from .quantization import QuantizationConfig, QuantizedLoader, is_quantized, quantize_plan, quantize_weight

log = logging.getLogger("aquilachat.checkpoint")

__all__ = ["Checkpoint", "load_model", "load_tokenizer", "load_state_dict", "write_hf", "save_hf", "save_flagai", "convert", "resolve_model_path",
           "detect_layout", "hf_to_flagai_state_dict", "flagai_to_hf_state_dict", "BUNDLED_MODELS",
           "resolve_dtype", "quantize_checkpoint"]

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
            return "flagai" if ModelConfig.is_flagai_dict(data) else "hf"
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


def _flagai_key_to_hf(key: str, *, source: str | Path = "pytorch_model.bin") -> str:
    """The Hugging Face name of a FlagAI key (``layers.3.attention.wq.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``).

    Raises:
        CheckpointError: a key that is not a FlagAI Aquila parameter, naming it and ``source``.
    """
    if key in _FLAGAI_TOP:
        return _FLAGAI_TOP[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if not m or m.group(2) not in _FLAGAI_LAYER:
        raise CheckpointError(f"{source}: unexpected key {key!r} for a FlagAI Aquila checkpoint")
    return f"model.layers.{m.group(1)}.{_FLAGAI_LAYER[m.group(2)]}.weight"


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
        name = _flagai_key_to_hf(key, source=source)
        if name.endswith("self_attn.q_proj.weight"):
            t = _permute_interleaved_to_half(t, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            t = _permute_interleaved_to_half(t, config.num_key_value_heads)
        out[name] = t
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
    """A dtype name (or ``"auto"``) -> ``torch.dtype``. ``"auto"`` here is the checkpoint's
    stored dtype; the CPU's choice for float16 checkpoints is the memory plan's
    (:func:`aquilachat.memory.choose_dtype`, used by :meth:`Checkpoint.load_model`).

    Raises:
        ConfigError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(str(config.torch_dtype), torch.float32)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_MADV_DONTNEED, _MADV_WILLNEED, _MADV_POPULATE_READ = 4, 3, 22  # <sys/mman.h> on Linux


class _FilePages:
    """The process's private mappings of one weights file (from ``/proc/self/maps``), to tell
    whether a tensor lies in file-backed memory before advising the kernel about its pages
    (``MADV_DONTNEED`` on anonymous memory would zero it)."""

    _libc = None

    def __init__(self, file: Path) -> None:
        self.file = file
        self._ranges: list[tuple[int, int]] | None = None

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Address ranges of the file's private mappings (read once, after the file is mapped)."""
        if self._ranges is None:
            self._ranges = []
            if sys.platform == "linux":
                name = str(self.file.resolve())
                try:
                    for line in Path("/proc/self/maps").read_text().splitlines():
                        parts = line.split(maxsplit=5)
                        if len(parts) == 6 and parts[5] == name and parts[1][3] == "p":
                            lo, hi = (int(x, 16) for x in parts[0].split("-"))
                            self._ranges.append((lo, hi))
                except OSError:
                    pass
        return self._ranges

    def advise(self, t: torch.Tensor, advice: int) -> bool:
        """``madvise`` the pages under ``t`` (rounded out to whole pages, clipped to the file's
        mapping); False when ``t`` is not in this file's private mapping or the call failed."""
        if t.device.type != "cpu" or not t.numel():
            return False
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        for lo, hi in self.ranges:
            if lo <= start and end <= hi:
                page = mmap.PAGESIZE
                a, b = max(lo, start // page * page), min(hi, -(-end // page) * page)
                return self._madvise(a, b - a, advice)
        return False

    def read_ahead(self) -> None:
        """Ask the kernel to start reading the whole file into the page cache (asynchronously:
        large sequential reads instead of one page fault at a time; page cache, not this
        process's memory)."""
        if sys.platform == "linux":
            for lo, hi in self.ranges:
                self._madvise(lo, hi - lo, _MADV_WILLNEED)

    @staticmethod
    def _madvise(addr: int, length: int, advice: int) -> bool:
        if _FilePages._libc is None:
            _FilePages._libc = ctypes.CDLL(None, use_errno=True)
            _FilePages._libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return _FilePages._libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) == 0

    def populate(self, t: torch.Tensor) -> None:
        """Read ``t``'s pages in now (synchronously where the kernel has MADV_POPULATE_READ)."""
        if not self.advise(t, _MADV_POPULATE_READ) and self.ranges:
            self.advise(t, _MADV_WILLNEED)


def _tensor_index(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype, Path]]:
    """Key -> (shape, dtype, file) of every tensor, read from the files' headers (safetensors) or
    memory-mapped state dicts (``.bin``): no tensor data is read."""
    index = {}
    for file in files:
        for key, t in _iter_tensors(file):
            index[key] = (tuple(t.shape), t.dtype, file)
    return index


class Checkpoint:
    """A model directory, resolved once: where it is, its layout and its config.

    Build with :meth:`open`. Attributes: ``name`` (as given), ``path`` (local directory),
    ``layout`` (``"hf"`` or ``"flagai"``), ``config`` (:class:`ModelConfig`), ``config_file``,
    ``quantization`` (the :class:`~aquilachat.quantization.QuantizationConfig` of a checkpoint
    written by ``aquilachat quantize``, else None).
    """

    def __init__(self, name: str, path: Path, layout: str, config: ModelConfig, config_file: Path,
                 quantization: QuantizationConfig | None = None) -> None:
        self.name, self.path, self.layout, self.config, self.config_file = name, path, layout, config, config_file
        self.quantization = quantization

    @classmethod
    def open(cls, model: "str | os.PathLike | Checkpoint") -> "Checkpoint":
        """Resolve ``model`` (see :func:`resolve_model_path`; a Hub id is fetched once, here) and
        read its ``config.json`` (or FlagAI ``params.json``).

        Raises:
            CheckpointError: no such model, or no config file; ConfigError: malformed config.
        """
        if isinstance(model, Checkpoint):
            return model
        path = resolve_model_path(model)
        config_file = _config_file(path)
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json (or params.json) in the model directory") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        config = ModelConfig.from_dict(data, source=str(config_file))
        quantization = None
        if isinstance(data, dict) and data.get("quantization_config") is not None:
            quantization = QuantizationConfig.from_dict(data["quantization_config"], source=str(config_file))
        return cls(str(model), path, "flagai" if ModelConfig.is_flagai_dict(data) else "hf", config, config_file,
                   quantization)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, layout={self.layout!r})"

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype ``config.json`` says the weights are stored in (``torch_dtype``)."""
        return resolve_dtype("auto", self.config, torch.device("cpu"))

    def weight_files(self) -> list[Path]:
        """The weights files, in index order (raises CheckpointError when there are none)."""
        return _weight_files(self.path)

    def plan_memory(self, *, device: str | torch.device = "auto", quantization: str | None = None,
                    group_size: int | None = None, **kwargs) -> MemoryPlan:
        """:func:`aquilachat.memory.plan_memory` for this checkpoint's config on ``device``, with
        the quantization it will load with (:meth:`quantization_for`)."""
        q = self.quantization_for(quantization, group_size)
        return plan_memory(self.config, device=resolve_device(device), what=str(self.path),
                           quantization=q.method if q else None, group_size=q.group_size if q else None, **kwargs)

    def quantization_for(self, quantization: str | None = None,
                         group_size: int | None = None) -> QuantizationConfig | None:
        """The weight-only quantization a load with ``quantization`` (``int8`` | ``int4`` | None)
        gives: a quantized checkpoint's own (asking for it again is allowed, another is not), or
        the float checkpoint converted at load time (:meth:`QuantizationConfig.for_model`).

        Raises:
            ConfigError: an unknown method or group size, or one that differs from the checkpoint's
                ``quantization_config`` (naming the field).
        """
        own = self.quantization
        if own is None:
            return QuantizationConfig.for_model(self.config, quantization, group_size) if quantization else None
        if quantization is not None and quantization != own.method:
            raise ConfigError(f"{self.config_file}: quantization_config.bits says this checkpoint is {own.method}; "
                              f"it cannot load as {quantization} (omit --quantization, or quantize the float "
                              "checkpoint again)")
        if group_size is not None and group_size != own.group_size:
            raise ConfigError(f"{self.config_file}: quantization_config.group_size is {own.group_size}; "
                              f"it cannot load with group size {group_size}")
        return own

    def load_tokenizer(self):
        """The tokenizer stored beside the weights (:class:`aquilachat.tokenizer.Tokenizer`)."""
        from .tokenizer import Tokenizer
        return Tokenizer.from_dir(self.path)

    def load_model(self, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                   check_memory: bool = True, populate: bool = True, quantization: str | None = None,
                   group_size: int | None = None) -> AquilaForCausalLM:
        """Load the weights into an :class:`AquilaForCausalLM` in eval mode (module docstring).

        Args:
            dtype: ``"auto"`` (the memory plan's choice: :func:`aquilachat.memory.choose_dtype`)
                or a dtype / its name.
            check_memory: first check that the weights fit in the available memory (raises
                :class:`~aquilachat.memory.MemoryPlanError` before anything is read); callers that
                planned already (``LLM``) pass False.
            populate: read memory-mapped weights in during the load rather than at first use.
            quantization: ``"int8"`` / ``"int4"``: the linear layers become weight-only quantized
                modules (:mod:`aquilachat.quantization`), each float weight converted as it is read
                and dropped at once, so no float copy of the model ever exists; a checkpoint written
                by ``aquilachat quantize`` loads quantized without it. ``group_size``: int4's.

        Raises:
            CheckpointError: missing or truncated files, missing/unexpected keys, wrong shapes or
                dtypes; the message names the file and the key.
            ConfigError: unknown dtype, quantization or group size, a quantization that differs from
                the checkpoint's, a quantized model on a non-CPU device or in a dtype other than bfloat16
                or float32. MemoryPlanError: the weights
                do not fit.
        """
        device = resolve_device(device)
        qconfig = self.quantization_for(quantization, group_size)
        method = qconfig.method if qconfig else None
        if check_memory or dtype == "auto":
            plan = self.plan_memory(device=device, dtype=dtype, engine=False, quantization=method,
                                    group_size=qconfig.group_size if qconfig else None)
            dtype = plan.torch_dtype
            if plan.dtype_reason and plan.dtype_reason != "asked for":
                log.info("%s: loading as %s (%s)", self.path, plan.dtype, plan.dtype_reason)
        dtype = resolve_dtype(dtype, self.config, device)
        if qconfig is not None and device.type != "cpu":
            raise ConfigError(f"{self.path}: {method} weights run on the CPU only; use --device cpu")
        if qconfig is not None and dtype not in (torch.bfloat16, torch.float32):
            raise ConfigError(f"{self.path}: {method} weights run with bfloat16 or float32 activations (the kernels' "
                              f"dtypes), got --dtype {str(dtype).removeprefix('torch.')}; use --dtype bfloat16, "
                              "float32 or auto")
        config = self.config
        with torch.device("meta"):
            m = AquilaForCausalLM(config)
        expected = {k: tuple(v.shape) for k, v in m.state_dict(keep_vars=True).items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        quant = None
        if qconfig is not None:
            quant = QuantizedLoader(m, qconfig, dtype=dtype, stored=self.quantization is not None)
            for name in quant.plan:
                del expected[f"{name}.weight"]
            expected.update({k: shape for k, (shape, _) in quant.expected().items()})
        # every key and shape first, from the headers: a bad checkpoint fails before any big read
        files, names, stored = self._check_keys(expected)
        if quant is not None:  # and the quantized codes' dtypes
            by_name = {v: k for k, v in names.items()}
            for name, (_, want) in quant.expected().items():
                _, have, file = stored[by_name[name]]
                if want is not None and have != want:
                    raise CheckpointError(f"{file}: tensor {by_name[name]!r} is {str(have).removeprefix('torch.')}, "
                                          f"expected {str(want).removeprefix('torch.')} for {qconfig.method} weights "
                                          "(config.json quantization_config)")
        state: dict[str, torch.Tensor] = {}
        for name, src, t, pages in self._stream(files, names):
            if quant is not None and quant.owns(name):
                # a float weight is quantized now; stored codes wait for their module's other tensors
                for source, kept in quant.add(name, src if quant.stored else t):
                    if not kept:
                        pages.advise(source, _MADV_DONTNEED)
                    elif populate:  # int8 codes used as they lie in the file
                        pages.populate(source)
                if not quant.stored:
                    pages.advise(src, _MADV_DONTNEED)
                del t, src
                continue
            out = t.to(device=device, dtype=dtype)
            if out is src:  # used as it lies in the file: read it in now
                if populate:
                    pages.populate(src)
            else:  # converted, permuted or moved: the source pages are done with
                pages.advise(src, _MADV_DONTNEED)
            del t, src
            state[name] = out
        m.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            m.lm_head.weight = m.model.embed_tokens.weight
        return m.eval()

    def _check_keys(self, expected: dict[str, tuple[int, ...]]
                    ) -> tuple[list[Path], dict[str, str], dict[str, tuple[tuple[int, ...], torch.dtype, Path]]]:
        """Check the checkpoint's keys and shapes against ``expected`` (Hugging Face name ->
        shape) from the files' headers, before any tensor is read. Returns the weights files, the
        stored key -> Hugging Face name of every tensor to load, and the header index.

        Raises:
            CheckpointError: a missing or unexpected key, or a wrong shape, naming file and key.
        """
        config = self.config
        files = self.weight_files()
        stored = _tensor_index(files)
        names = {}
        for key in stored:
            if _IGNORED_KEYS.search(key) or (config.tie_word_embeddings and key == "lm_head.weight"):
                continue
            names[key] = _flagai_key_to_hf(key, source=stored[key][2]) if self.layout == "flagai" else key
        by_name = {v: k for k, v in names.items()}
        all_files = ", ".join(sorted({str(f) for f in files}))
        missing = sorted(set(expected) - set(by_name))
        if missing:
            raise CheckpointError(f"{all_files}: missing key {missing[0]!r}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = sorted(set(by_name) - set(expected))
        if unexpected:
            hint = ""
            if self.quantization is None and unexpected[0].endswith((".scales", ".zeros")):
                hint = " (quantized tensors, but config.json has no quantization_config)"
            raise CheckpointError(f"{stored[by_name[unexpected[0]]][2]}: unexpected key {by_name[unexpected[0]]!r}"
                                  + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") + hint)
        for name, want in expected.items():
            shape, _, file = stored[by_name[name]]
            if shape != want:
                raise CheckpointError(f"{file}: tensor {by_name[name]!r} has shape {shape}, "
                                      f"expected {want} from config.json")
        return files, names, stored

    def _stream(self, files: list[Path], names: dict[str, str]
                ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, "_FilePages"]]:
        """``(name, stored tensor, tensor in Hugging Face layout, its file's pages)`` for every
        tensor of ``names`` (stored key -> name), one at a time, files read ahead as they open
        (FlagAI q/k rows permuted: a copy)."""
        config = self.config
        for file in files:
            pages = _FilePages(file)
            for i, (key, src) in enumerate(_iter_tensors(file)):
                if i == 0:
                    pages.read_ahead()  # the file is mapped now
                if key not in names:
                    continue
                name = names[key]
                t = src
                if self.layout == "flagai" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                    t = _permute_interleaved_to_half(t, heads)  # a copy
                yield name, src, t, pages


def load_model(model: str | os.PathLike | Checkpoint, *, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto") -> AquilaForCausalLM:
    """Load a checkpoint (any supported layout): :meth:`Checkpoint.load_model` of
    :meth:`Checkpoint.open(model) <Checkpoint.open>`; errors as there."""
    return Checkpoint.open(model).load_model(dtype=dtype, device=device)


def load_tokenizer(model: str | os.PathLike | Checkpoint):
    """The tokenizer stored beside a checkpoint (see :class:`aquilachat.tokenizer.Tokenizer`)."""
    return Checkpoint.open(model).load_tokenizer()


# ---------------------------------------------------------------------------- saving
def _copy_tokenizer(tokenizer, src: Path | None, dst: Path) -> None:
    if tokenizer is not None:
        tokenizer.save(dst)
    elif src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)


def write_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str | os.PathLike, *,
             dtype: str | torch.dtype | None = None, tokenizer=None, tokenizer_dir: str | os.PathLike | None = None,
             template: str | None = None) -> None:
    """The one Hugging Face writer (``save_hf``, ``convert --to hf``, training's checkpoints and
    exports): ``config.json`` (``LlamaForCausalLM``), ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files with the chat ``template``'s Jinja
    (:func:`aquilachat.export.write_serving_files`), loadable by ``transformers``, vLLM and
    :func:`load_model`. Tensors are cast to ``dtype`` (default: as they are) and stored
    contiguous; a tied ``lm_head`` is not stored.

    Raises:
        ConfigError: an unknown dtype name.
    """
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is None:
        dtype = next(iter(state_dict.values())).dtype
    dtype = resolve_dtype(dtype, config, torch.device("cpu"))
    sd = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    ModelConfig(**{**config.__dict__, "torch_dtype": str(dtype).removeprefix("torch.")}).save(path / "config.json")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(tokenizer, Path(tokenizer_dir) if tokenizer_dir else None, path)
    from .export import write_serving_files
    write_serving_files(path, config, template=template, tokenizer=tokenizer)


def _refuse_quantized(model: AquilaForCausalLM) -> None:
    if is_quantized(model):
        raise ConfigError("cannot save a quantized model as a float checkpoint: save the float model, then run "
                          "aquilachat quantize (quantize_checkpoint)")


def save_hf(model: AquilaForCausalLM, path: str | os.PathLike, *, tokenizer=None,
            tokenizer_dir: str | os.PathLike | None = None, template: str | None = None) -> None:
    """:func:`write_hf` of a model, in its own dtype.

    Raises:
        ConfigError: a weight-only quantized model (its int4 codes are in this CPU's kernel
            layout): write quantized checkpoints with :func:`quantize_checkpoint`.
    """
    _refuse_quantized(model)
    write_hf(model.state_dict(), model.config, path, dtype=model.dtype, tokenizer=tokenizer,
             tokenizer_dir=tokenizer_dir, template=template)


def save_flagai(model: AquilaForCausalLM, path: str | os.PathLike, *, tokenizer=None,
                tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Write FlagAI layout: FlagAI ``config.json``, ``pytorch_model.bin`` with FlagAI key names and
    interleaved q/k rows, and ``vocab.json`` / ``merges.txt`` / ``special_tokens_map.json``.

    Raises:
        ConfigError: a weight-only quantized model (as :func:`save_hf`).
    """
    _refuse_quantized(model)
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
    ckpt = Checkpoint.open(src)
    model = ckpt.load_model(dtype=ckpt.stored_dtype, device="cpu", populate=False)  # the stored dtype, exactly
    tokenizer = None
    if any((ckpt.path / n).exists() for n in ("tokenizer.json", "vocab.json")):
        tokenizer = ckpt.load_tokenizer()
    if to == "hf":
        save_hf(model, dst, tokenizer=tokenizer, template=template)
    else:
        save_flagai(model, dst, tokenizer=tokenizer)
    return Path(dst)


def quantize_checkpoint(src: str | os.PathLike | Checkpoint, dst: str | os.PathLike, *, method: str,
                        group_size: int | None = None, dtype: str | torch.dtype = "bfloat16",
                        template: str | None = None) -> QuantizationConfig:
    """Write a weight-only quantized copy of a float checkpoint (``aquilachat quantize``): Hugging
    Face layout, ``model.safetensors`` with the tensors of :mod:`aquilachat.quantization` for the
    linears it converts and the other weights in ``dtype``, ``config.json`` with its
    ``quantization_config``, the tokenizer and serving files. Weights are read, converted and
    dropped one at a time (the output, at its quantized size, is what stays in memory).

    Args:
        method: ``int8`` or ``int4``; group_size: int4's (default
            :data:`~aquilachat.quantization.DEFAULT_GROUP_SIZE`).
        dtype: the float dtype of the other weights and of the scales, i.e. the dtype the model
            runs in (bfloat16, the default of quantized models on the CPU, or float32); loading
            the result in another dtype rounds its scales.
        template: the chat template the serving files declare (default: the source's).

    Returns the :class:`~aquilachat.quantization.QuantizationConfig` written.

    Raises:
        ConfigError: unknown method, group size or dtype; a source that is already quantized;
            a weight the kernels cannot take. CheckpointError: as :meth:`Checkpoint.load_model`.
    """
    from safetensors.torch import save_file
    ckpt = Checkpoint.open(src)
    if ckpt.quantization is not None:
        raise ConfigError(f"{ckpt.config_file}: this checkpoint is already quantized "
                          f"({ckpt.quantization.description}); quantize the float checkpoint")
    dtype = resolve_dtype(dtype, ckpt.config, torch.device("cpu"))
    if dtype not in (torch.bfloat16, torch.float32):
        raise ConfigError(f"--dtype must be bfloat16 or float32 for a quantized checkpoint (the kernels' activation "
                          f"dtypes), got {str(dtype).removeprefix('torch.')}")
    config = ckpt.config
    qconfig = QuantizationConfig.for_model(config, method, group_size)
    qplan = quantize_plan(config, qconfig)
    with torch.device("meta"):
        meta = AquilaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    files, names, _ = ckpt._check_keys(expected)
    out: dict[str, torch.Tensor] = {}
    for name, source, t, pages in ckpt._stream(files, names):
        module_name = name.removesuffix(".weight")
        if module_name in qplan:
            meth, group = qplan[module_name]
            for suffix, tensor in quantize_weight(t, meth, group_size=group, dtype=dtype, name=module_name).items():
                out[f"{module_name}.{suffix}"] = tensor
        else:
            out[name] = t.to(dtype).contiguous()
        pages.advise(source, _MADV_DONTNEED)
        del t, source
    path = Path(dst)
    path.mkdir(parents=True, exist_ok=True)
    data = ModelConfig(**{**config.__dict__, "torch_dtype": str(dtype).removeprefix("torch.")}).to_hf_dict()
    data["quantization_config"] = qconfig.to_dict()
    (path / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = None
    if any((ckpt.path / n).exists() for n in ("tokenizer.json", "vocab.json")):
        tokenizer = ckpt.load_tokenizer()
    _copy_tokenizer(tokenizer, None, path)
    from .export import write_serving_files
    write_serving_files(path, config, template=template, tokenizer=tokenizer)
    return qconfig
