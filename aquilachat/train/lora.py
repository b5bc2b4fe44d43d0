"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through peft.

The adapter is peft's (``get_peft_model`` with a ``LoraConfig``); peft is the ``train`` extra and
is imported only when ``lora: true``. Checkpoints and the exported model hold plain merged weights
(:func:`merge_lora_state_dict`, the one merge, used for checkpoints and the export under every
strategy: it needs only the full state dict, which FSDP gathers without a whole module); the
adapter alone is kept beside them in ``adapter.safetensors`` so that a run can resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError, ConfigError
from .config import TrainConfig

__all__ = ["apply_lora", "load_adapter", "adapter_state", "merge_lora_state_dict"]


def apply_lora(core: torch.nn.Module, config: TrainConfig) -> tuple[torch.nn.Module, float]:
    """Wrap ``core`` in a peft LoRA model (``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules``); only the adapter is trainable.

    Returns:
        ``(peft model, scaling)`` with ``scaling = lora_alpha / lora_r`` (peft's).

    Raises:
        ConfigError: peft is not installed, or a target is not a ``Linear`` of the model (naming
            the ones there are).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora: true needs peft (pip install 'aquilachat[train]')") from None
    names = {n.rsplit(".", 1)[-1] for n, m in core.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in config.lora_target_modules if t not in names]
    if missing:
        raise ConfigError(f"lora_target_modules: {missing[0]!r} is not a Linear module of the model; "
                          f"choose from {', '.join(sorted(names))}")
    lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none")
    return get_peft_model(core, lcfg), config.lora_alpha / config.lora_r


def load_adapter(model: torch.nn.Module, path: Path) -> None:
    """Copy the adapter weights of ``path`` (``adapter.safetensors``) into the peft ``model``.

    Raises:
        CheckpointError: the file is missing, lacks a trainable tensor of the model (``lora_r`` or
            the targets changed) or holds one the model does not have.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a LoRA checkpoint stores its adapter there)")
    adapter = load_file(str(path))
    own = dict(model.named_parameters())
    missing = [k for k in own if own[k].requires_grad and k not in adapter]
    if missing:
        raise CheckpointError(f"{path}: no tensor {missing[0]!r} (lora_r or lora_target_modules changed?)")
    with torch.no_grad():
        for k, v in adapter.items():
            if k not in own:
                raise CheckpointError(f"{path}: unexpected tensor {k!r}")
            own[k].copy_(v)


def adapter_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors (``lora_A`` / ``lora_B``) of a peft model's state dict."""
    return {k: v for k, v in sd.items() if ".lora_" in k}


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain model weights from a peft LoRA state dict: ``W + (B @ A) * scaling`` for every
    adapted ``Linear`` (what peft's ``merge_and_unload`` computes, ``scaling = lora_alpha / r``),
    with peft's ``base_model.model.`` prefix and ``.base_layer`` removed.

    Shapes: ``A [r, in]``, ``B [out, r]``, ``W [out, in]``; the sum is taken in fp32 and cast back
    to ``W``'s dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a = sd[f"{stem}.lora_A.default.weight"].float()
            b = sd[f"{stem}.lora_B.default.weight"].float()
            value = (value.float() + (b @ a) * scaling).to(value.dtype)
        out[name] = value
    return out
