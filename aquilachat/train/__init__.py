"""Training: supervised fine-tuning and pretraining of Aquila models (``aquilachat sft`` / ``pretrain``).

Modules:

* :mod:`.config` — the YAML (FlagAI field names plus ours), validated with pydantic.
* :mod:`.data` — dataset formats, readers, rendering with
  :func:`aquilachat.chat_format.render_for_training`, packing, the dataset report.
* :mod:`.loop` — the training loop (AdamW, warm-up + cosine, token-normalised loss, DDP/FSDP2).
* :mod:`.distributed` — process-group setup, hostfile parsing and per-node torchrun commands.
* :mod:`.checkpoint` — atomic checkpoints (Hugging Face weights + training state) and resume.

Heavy imports (torch, peft) happen inside the modules, so ``import aquilachat.train`` is cheap.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name == "train":
        from .loop import train
        return train
    raise AttributeError(f"module 'aquilachat.train' has no attribute {name!r}")
