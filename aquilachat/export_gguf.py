"""GGUF export for llama.cpp and Ollama (``aquilachat convert SRC DST --to gguf``).

The file is written with the ``gguf`` package that llama.cpp publishes (``gguf-py``); its layout
and key names are llama.cpp's (``docs/gguf.md`` of ggml, ``gguf.constants``). What goes in, and why:

* Architecture ``llama`` with its hyperparameters (context length, sizes, heads, RMSNorm eps, RoPE
  theta and dimension) and llama.cpp's tensor names (``gguf.TensorNameMap``: ``token_embd``,
  ``blk.N.attn_q``, ...). A tied ``lm_head`` is left out: llama.cpp then uses ``token_embd``.
* q/k row order: llama.cpp's ``LLM_ARCH_LLAMA`` uses ``LLAMA_ROPE_TYPE_NORM`` (``src/llama-model.cpp``
  ``llama_model_rope_type``), which rotates *adjacent* pairs ``(2i, 2i+1)`` as Meta's and FlagAI's
  code does, while our Hugging Face weights are in ``rotate_half`` order (pairs ``(i, i + d/2)``).
  So the rows of ``q_proj`` / ``k_proj`` are permuted back to the interleaved order, the permutation
  of llama.cpp's own ``convert_hf_to_gguf.py`` (``LlamaModel.permute``).
* Tensor types: 1-D tensors (the norms) are always F32, as llama.cpp writes them; matrices are
  ``f32`` / ``f16`` / ``bf16`` / ``q8_0``. ``q8_0`` is ggml's block format (32 values, one fp16
  scale; ``gguf.quants``); a matrix whose rows are not a multiple of 32 falls back to F16, as in
  llama.cpp's converter. A value outside float16's range refuses ``f16`` instead of becoming inf.
* Tokenizer: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE) with the vocabulary strings, merges
  and token types (control tokens = the added special tokens and the BOS/EOS/UNK/PAD tokens), the
  BOS/EOS/UNK/PAD ids, ``add_bos_token = false`` (our prompts carry no BOS), rows beyond the
  tokenizer up to the model's vocabulary size as ``[PADn]`` tokens of type UNUSED, and the
  pre-tokenizer name (:func:`llama_cpp_pre_tokenizer`), checked against llama.cpp's own split in
  ``tests/test_llama_cpp.py``.
* The chat template as Jinja (``tokenizer.chat_template``, :func:`~aquilachat.chat_format.jinja_template`)
  and the sampling defaults of ``aquilachat chat`` (``general.sampling.*``).

Next to the ``.gguf`` an Ollama ``Modelfile`` is written (:func:`ollama_modelfile`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .chat_format import CHAT_SAMPLING_DEFAULTS, get_template, jinja_template, ollama_template
from .errors import CheckpointError, ConfigError

__all__ = ["OUTTYPES", "GGUFExport", "write_gguf", "llama_cpp_pre_tokenizer", "gguf_vocab", "ollama_modelfile"]

#: ``--outtype`` choices.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFExport:
    """What :func:`write_gguf` wrote: the ``.gguf`` file, the Ollama ``Modelfile``, the choices
    made, and notes for the user (e.g. where the llama.cpp tokenizer differs)."""

    path: Path
    modelfile: Path
    outtype: str
    template: str
    pre_tokenizer: str
    notes: list[str] = field(default_factory=list)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("writing GGUF needs the 'gguf' package: pip install 'aquilachat[gguf]'") from None
    return gguf


# ---------------------------------------------------------------------------- tokenizer
def _is_gpt2_byte_level(pre: dict | None) -> bool:
    return (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", False)
            and pre.get("use_regex", True))


def llama_cpp_pre_tokenizer(spec: dict) -> tuple[str, str | None]:
    """The llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``) for a ``tokenizer.json`` dict, and a
    note when llama.cpp can only approximate it.

    Aquila's tokenizer (``ByteLevel(add_prefix_space=False)``: GPT-2's regex, no prefix space) is
    llama.cpp's ``"gpt-2"`` (``LLAMA_VOCAB_PRE_TYPE_GPT2`` in ``src/llama-vocab.cpp``: the same
    regex, implemented by ``unicode_regex_split_custom_gpt2``); its ``"default"`` splits punctuation
    and digits differently. Tokenizers trained by ``aquilachat tokenizer train`` (aquila-tiny's) first
    cut runs of CJK characters into pieces of at most K characters; llama.cpp has no such
    pre-tokenizer, so they get ``"gpt-2"`` too, with a note saying where the ids differ.

    Raises:
        ConfigError: a tokenizer llama.cpp's ``gpt2`` BPE cannot reproduce (normalizer, prefix
            space, byte fallback, another model type), naming what was found.
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        raise ConfigError(f"GGUF export supports byte-level BPE tokenizers only; this tokenizer's model is "
                          f"{ {k: v for k, v in model.items() if k not in ('vocab', 'merges')} }")
    if spec.get("normalizer") is not None:
        raise ConfigError(f"GGUF export: llama.cpp's gpt2 tokenizer has no normalizer, this tokenizer has "
                          f"{spec['normalizer'].get('type')!r}")
    pre = spec.get("pre_tokenizer")
    if _is_gpt2_byte_level(pre):
        return "gpt-2", None
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        items = pre.get("pretokenizers") or []
        if len(items) == 1 and _is_gpt2_byte_level(items[0]):
            return "gpt-2", None
        if len(items) == 2 and _is_gpt2_byte_level(items[1]) and items[0].get("type") == "Split" \
                and items[0].get("behavior") == "Isolated" and not items[0].get("invert"):
            from .tokenizer_train import cjk_split_pattern
            pattern = (items[0].get("pattern") or {}).get("Regex", "")
            m = re.search(r"\{1,(\d+)\}$", pattern)
            if m and pattern == cjk_split_pattern(int(m.group(1))):
                k = int(m.group(1))
                return "gpt-2", (
                    f"this tokenizer cuts runs of CJK characters into pieces of at most {k} characters before "
                    f"BPE (aquilachat tokenizer train); llama.cpp has no such pre-tokenizer, so the GGUF uses "
                    f"'gpt-2', whose ids differ where a run of more than {k} CJK characters, or a CJK "
                    "character directly next to another letter, merges across the cut")
    raise ConfigError(f"GGUF export: no llama.cpp pre-tokenizer reproduces this tokenizer's pre-tokenizer {pre!r}")


def gguf_vocab(tokenizer, spec: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)`` for the GGUF tokenizer tables.

    ``tokens[i]`` is the vocabulary string of id ``i`` (byte-level, ``Ġ`` = space) or an added
    token's text; ids from the tokenizer's size up to ``vocab_size`` (the model's embedding rows)
    are ``[PAD<i>]`` of type UNUSED, as llama.cpp's converter pads. Merges are ``"left right"``.

    Raises:
        ConfigError: the model has fewer embedding rows than the tokenizer has tokens.
    """
    gguf = _gguf()
    n_tok = tokenizer.vocab_size
    if vocab_size < n_tok:
        raise ConfigError(f"the model's vocab_size {vocab_size} is smaller than the tokenizer's {n_tok} tokens")
    tokens: list[str | None] = [None] * n_tok
    types = [int(gguf.TokenType.NORMAL)] * n_tok
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    control = set(tokenizer.special_tokens.values())
    control |= {tokenizer.token_to_id(t) for t in tokenizer.special_tokens_map.values()} - {None}
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    for i in control:
        types[i] = int(gguf.TokenType.CONTROL)
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ConfigError(f"tokenizer ids are not contiguous: id {missing[0]} has no token")
    tokens += [f"[PAD{i}]" for i in range(n_tok, vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab_size - n_tok)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    return tokens, types, merges  # type: ignore[return-value]


# ---------------------------------------------------------------------------- tensors
def _qtype(gguf, shape: tuple[int, ...], outtype: str):
    """The GGML type of one tensor (see the module docstring)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _encode(gguf, name: str, w: torch.Tensor, qtype) -> np.ndarray:
    """``w`` as the array the writer stores: float32/float16 values, or the raw bytes (uint8) of
    BF16 and Q8_0 rows."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return w.to(torch.float32).numpy()
    if qtype == Q.F16:
        h = w.to(torch.float16)
        if not torch.isfinite(h).all() and torch.isfinite(w).all():
            raise CheckpointError(f"tensor {name!r} has values outside float16's range (max |w| = "
                                  f"{w.abs().max().item():.4g}); use --outtype bf16 or f32")
        return h.numpy()
    if qtype == Q.BF16:  # bf16 bits as bytes (round to nearest even, as torch and ggml do)
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(w.to(torch.float32).numpy(), qtype)


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(stored shape, stored numpy dtype, bytes)`` of a tensor, known before it is converted so that
    the header can be written first and the tensors streamed after it."""
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# ---------------------------------------------------------------------------- writing
def _default_outtype(config) -> str:
    return "bf16" if str(config.torch_dtype) in ("bfloat16", "bf16") else "f16"


def _gguf_path(src_name: str, dst: Path, outtype: str) -> Path:
    if dst.suffix == ".gguf":
        return dst
    return dst / f"{src_name}-{outtype}.gguf"


def ollama_modelfile(gguf_file: str, template: str | None, *, context_length: int) -> str:
    """An Ollama ``Modelfile`` for ``gguf_file`` (a path relative to the Modelfile): ``FROM``, the
    chat template in Go template syntax (:func:`~aquilachat.chat_format.ollama_template`), a
    ``PARAMETER stop`` for each stop string of the template, and the sampling defaults of
    ``aquilachat chat`` (``top_k 0`` and ``min_p 0`` switch off Ollama's own filters, which our
    sampler does not have). Format: Ollama ``docs/modelfile.md``."""
    tpl = get_template(template)
    lines = [f"# Ollama Modelfile written by aquilachat (chat template {tpl.name}).",
             "# ollama create MODEL_NAME -f Modelfile && ollama run MODEL_NAME",
             f"FROM ./{gguf_file}",
             f'TEMPLATE """{ollama_template(tpl)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in tpl.stop]
    lines += [f"PARAMETER temperature {CHAT_SAMPLING_DEFAULTS['temperature']}",
              f"PARAMETER top_p {CHAT_SAMPLING_DEFAULTS['top_p']}",
              f"PARAMETER top_k {CHAT_SAMPLING_DEFAULTS['top_k']}",
              "PARAMETER min_p 0",
              f"PARAMETER num_ctx {context_length}"]
    return "\n".join(lines) + "\n"


def _add_model_metadata(gguf, w, config, *, name: str, outtype: str) -> None:
    """``general.*`` and the ``llama.*`` hyperparameters (llama.cpp ``src/llama-arch.cpp`` keys)."""
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    # llama.cpp (common/common.cpp) applies these unless the user sets them; min_p 0 switches off
    # a filter our sampler does not have
    w.add_sampling_temp(CHAT_SAMPLING_DEFAULTS["temperature"])
    w.add_sampling_top_p(CHAT_SAMPLING_DEFAULTS["top_p"])
    w.add_sampling_top_k(CHAT_SAMPLING_DEFAULTS["top_k"])
    w.add_sampling_min_p(0.0)


def _add_tokenizer_metadata(w, tokenizer, vocab, *, pre: str, template: str) -> None:
    """``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""
    tokens, types, merges = vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, token_id in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                          (w.add_unk_token_id, tokenizer.unk_token_id), (w.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(False)  # our prompts carry no BOS (chat_format.render adds none)
    w.add_add_eos_token(False)
    w.add_chat_template(jinja_template(template))


def _write_tensors(gguf, w, model, *, outtype: str, source: Path) -> None:
    """Write the header, then each tensor converted on its own (see the module docstring), and close."""
    from .checkpoint import _permute_half_to_interleaved
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    params = dict(model.state_dict())
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    plan = []
    for key, t in params.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:
            raise CheckpointError(f"{source}: tensor {key!r} has no llama.cpp name")
        qtype = _qtype(gguf, tuple(t.shape), outtype)
        w.add_tensor_info(name, *_nbytes(gguf, tuple(t.shape), qtype), raw_dtype=qtype)
        plan.append((key, name, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for key, name, qtype in plan:
        t = params.pop(key).detach()
        if key.endswith("self_attn.q_proj.weight"):
            t = _permute_half_to_interleaved(t, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            t = _permute_half_to_interleaved(t, config.num_key_value_heads)
        w.write_tensor_data(_encode(gguf, name, t, qtype))
    w.close()


def write_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, outtype: str | None = None,
               template: str | None = None) -> GGUFExport:
    """Convert a checkpoint (any layout :func:`~aquilachat.checkpoint.load_model` reads) to one GGUF
    file plus an Ollama ``Modelfile`` beside it.

    Args:
        src: checkpoint directory, bundled name or repo id.
        dst: a ``.gguf`` file path, or a directory (the file is then ``<src name>-<outtype>.gguf``).
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0``; default ``bf16`` for a bfloat16 checkpoint,
            else ``f16`` (llama.cpp's converter's choice).
        template: chat template; default the checkpoint's own (see
            :func:`aquilachat.export.export_template`).

    The checkpoint is loaded once in its stored dtype (about one copy of the weights in memory);
    tensors are converted and written one at a time after the header, into a temporary file that is
    renamed at the end, so a failed export leaves no partial ``.gguf``.

    Raises:
        CheckpointError, ConfigError, TokenizerError: unreadable checkpoint, a tokenizer llama.cpp
            cannot reproduce, an unknown ``outtype``, f16 overflow; the message names the file,
            tensor or setting.
    """
    from .checkpoint import Checkpoint
    from .export import export_template
    gguf = _gguf()
    ckpt = Checkpoint.open(src)
    if ckpt.quantization is not None:
        raise ConfigError(f"{ckpt.config_file}: a {ckpt.quantization.method} checkpoint (quantization_config); "
                          "convert the float checkpoint (--outtype q8_0 quantizes for llama.cpp)")
    src_path, config = ckpt.path, ckpt.config
    name = Path(str(src).rstrip("/")).name  # the directory, bundled name or repo name
    outtype = outtype or _default_outtype(config)
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    # everything that can refuse the tokenizer runs before the weights are loaded
    tokenizer = ckpt.load_tokenizer()
    spec = tokenizer.to_json()
    pre, note = llama_cpp_pre_tokenizer(spec)
    template = export_template(tokenizer, template)
    vocab = gguf_vocab(tokenizer, spec, config.vocab_size)
    # the stored dtype, so that f16 / bf16 source bits reach the file unchanged
    model = ckpt.load_model(dtype=ckpt.stored_dtype, device="cpu", populate=False)

    out = _gguf_path(name, Path(dst), outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    w = gguf.GGUFWriter(tmp, "llama")
    _add_model_metadata(gguf, w, config, name=name, outtype=outtype)
    _add_tokenizer_metadata(w, tokenizer, vocab, pre=pre, template=template)
    try:
        _write_tensors(gguf, w, model, outtype=outtype, source=src_path)
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    modelfile = out.parent / "Modelfile"
    modelfile.write_text(ollama_modelfile(out.name, template, context_length=config.max_position_embeddings),
                         encoding="utf-8")
    return GGUFExport(path=out, modelfile=modelfile, outtype=outtype, template=template, pre_tokenizer=pre,
                      notes=[note] if note else [])
