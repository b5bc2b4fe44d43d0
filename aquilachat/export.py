"""What an exported checkpoint needs to be served as it is by other runtimes.

Every Hugging Face export (``aquilachat convert --to hf``, :func:`~aquilachat.checkpoint.save_hf`,
training checkpoints and ``final/``) gets, besides its weights and ``config.json``
(``LlamaForCausalLM``, ``model_type: llama``, :meth:`~aquilachat.config.ModelConfig.to_hf_dict`):

* ``tokenizer_config.json`` with a Jinja ``chat_template`` (:func:`~aquilachat.chat_format.jinja_template`),
  which transformers' ``apply_chat_template``, vLLM's ``/v1/chat/completions`` and llama.cpp use;
* ``generation_config.json`` (transformers ``GenerationConfig`` fields): the BOS / pad ids, the
  stop ids as ``eos_token_id`` (a list: the end-of-answer token and every stop string of the template
  that is a single token), and the sampling defaults of ``aquilachat chat``
  (:data:`~aquilachat.chat_format.CHAT_SAMPLING_DEFAULTS`), which vLLM applies by default.

Stop *strings* that are not one token (``###`` in a vocabulary without that token) cannot be
expressed as ids; ``docs/running-elsewhere.md`` shows how to pass them to each runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

from .chat_format import CHAT_SAMPLING_DEFAULTS, GUARDED_TOKENS, get_template, jinja_template, template_name_of
from .config import ModelConfig

__all__ = ["stop_token_ids", "generation_config", "write_serving_files", "export_template"]


def stop_token_ids(config: ModelConfig, tokenizer, template) -> list[int]:
    """Ids that end an answer: the config's EOS ids, the tokenizer's EOS id, and each stop string
    of ``template`` that is exactly one token (``###`` -> 8090 and ``</s>`` -> 100007 for Aquila's
    vocabulary). Control-token texts (``</s>``, ``<|endoftext|>``) are looked up as tokens."""
    ids = list(config.eos_token_ids)
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        for text in get_template(template).stop:
            control = tokenizer.token_to_id(text) if text in GUARDED_TOKENS else None
            encoded = [control] if control is not None else tokenizer.encode(text)
            if len(encoded) == 1:
                ids.append(encoded[0])
    return list(dict.fromkeys(ids))


def generation_config(config: ModelConfig, tokenizer, template) -> dict:
    """The ``generation_config.json`` dict (see the module docstring)."""
    stops = stop_token_ids(config, tokenizer, template)
    out = {"bos_token_id": config.bos_token_id,
           "eos_token_id": stops if len(stops) != 1 else stops[0],
           "pad_token_id": config.pad_token_id,
           "do_sample": True, **CHAT_SAMPLING_DEFAULTS}
    if not stops:
        del out["eos_token_id"]
    return out


def export_template(tokenizer, template: str | None) -> str:
    """The template an export declares: ``template`` when given, else the one the tokenizer
    already carries (a template of ours, found by :func:`~aquilachat.chat_format.template_name_of`),
    else the default (``aquila-chat``), the template :class:`~aquilachat.LLM` serves such a model
    with; a Jinja template that is not ours is replaced by it."""
    if template is not None:
        return get_template(template).name
    carried = template_name_of(getattr(tokenizer, "chat_template", None))
    return carried or get_template(None).name


def write_serving_files(path: str | Path, config: ModelConfig, *, template: str | None = None,
                        tokenizer=None) -> str:
    """Write ``generation_config.json`` and the Jinja ``chat_template`` of ``tokenizer_config.json``
    into an exported checkpoint directory whose tokenizer files are already written.

    ``template``: see :func:`export_template`. ``tokenizer``: the tokenizer those files were written
    from (read from ``path`` when not given). A directory without tokenizer files gets only
    ``generation_config.json`` (without template stop ids). Returns the template name.

    Raises:
        ValidationError: unknown template name.
        TokenizerError: the tokenizer files in ``path`` cannot be read (naming the file).
    """
    from .tokenizer import Tokenizer
    path = Path(path)
    tok_config = path / "tokenizer_config.json"
    if tokenizer is None and ((path / "tokenizer.json").exists() or (path / "vocab.json").exists()):
        tokenizer = Tokenizer.from_dir(path)
    name = export_template(tokenizer, template)
    gen = generation_config(config, tokenizer, name)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        data = json.loads(tok_config.read_text(encoding="utf-8")) if tok_config.exists() else {}
        data["chat_template"] = jinja_template(name)
        tok_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return name
