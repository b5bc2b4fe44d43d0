"""The training loop shared by ``aquilachat sft`` and ``aquilachat pretrain``.

One optimizer step consumes a *global batch* of ``batch_size x gradient_accumulation_steps x
world_size`` rows. Which rows, on which rank and in which micro-batch, is a pure function of
``(seed, epoch)`` and the step (:class:`DataPlan`), so a resumed run sees exactly the rows the
uninterrupted run would, and no row is ever modified.

Loss normalisation: every rank counts the supervised tokens of its micro-batches before any
backward pass and the counts are all-reduced, giving ``N``, the number of supervised tokens in
the whole global batch. Each micro-batch then back-propagates ``sum(token losses) * W / N``
(``W`` = world size, undoing the gradient averaging of DDP / FSDP), so the update is the gradient
of the mean token loss over the global batch whatever the split into micro-batches and ranks:
batch 4 x accumulation 1 and batch 1 x accumulation 4 give the same step.

Optimiser: AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, global gradient
norm clipping, learning rate from :func:`lr_at` (linear warm-up, then cosine decay).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .checkpoint import export_final, find_latest, load_optimizer_state, load_training_state, save_checkpoint
from .config import TrainConfig
from .data import IGNORE_INDEX, DataReport, TokenDataset, collate
from .distributed import DistInfo, setup_distributed

__all__ = ["train", "lr_at", "DataPlan", "TrainResult", "build_dataset", "merge_lora_state_dict",
           "STEP_SLEEP_ENV"]

#: Test hook: seconds to sleep after each optimizer step (lets a test kill a run mid-way).
STEP_SLEEP_ENV = "AQUILACHAT_TRAIN_STEP_SLEEP"
STATE_VERSION = 1


# ---------------------------------------------------------------------------- schedule
def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): a pure function, nothing to drift.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (linear, never 0).
    Then cosine decay (Loshchilov & Hutter 2017, "SGDR", without restarts), as in nanoGPT:
    ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))`` with
    ``p = (step - warmup_steps) / max(1, total_steps - warmup_steps)``, from ``lr`` at the end of
    warm-up towards ``min_lr`` at ``total_steps`` (clamped there for steps beyond).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- data order
class DataPlan:
    """Which rows each rank trains on at each optimizer step.

    Epoch ``e`` visits the rows in the order ``PCG64([seed, e]).permutation(n)`` (or ``0..n-1``
    without shuffling). Step ``s`` of the run is step ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch`` and takes the next ``G = batch_size * accumulation * world_size`` rows
    of that order (an incomplete last global batch is dropped). Inside a global batch the rows are
    sorted by length (longest first) and dealt out in chunks of ``batch_size``: chunk ``k`` goes to
    micro-step ``k // world_size`` of rank ``k % world_size``, so micro-batches hold rows of
    similar length (little padding) and ranks get similar work. The loss is normalised over the
    whole global batch, so this arrangement does not change the update.
    """

    def __init__(self, lengths: np.ndarray, *, batch_size: int, grad_accum: int, world_size: int,
                 seed: int, shuffle: bool = True) -> None:
        self.lengths = np.asarray(lengths)
        self.n = len(self.lengths)
        self.batch_size, self.grad_accum, self.world_size = batch_size, grad_accum, world_size
        self.global_batch = batch_size * grad_accum * world_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = self.n // self.global_batch
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch``: ``[n]`` indices."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                self._orders[epoch] = rng.permutation(self.n)
            else:
                self._orders[epoch] = np.arange(self.n)
        return self._orders[epoch]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_rows(self, step: int) -> np.ndarray:
        """The ``G`` row indices of optimizer step ``step`` (0-based), in plan order."""
        epoch, s = divmod(step, self.steps_per_epoch)
        rows = self.order(epoch)[s * self.global_batch:(s + 1) * self.global_batch]
        # longest first; ties by index so the arrangement is deterministic
        return rows[np.lexsort((rows, -self.lengths[rows]))]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of each micro-batch of ``rank`` at ``step``: ``grad_accum`` lists of
        ``batch_size`` indices."""
        rows = self.global_rows(step)
        B, W = self.batch_size, self.world_size
        return [rows[(m * W + rank) * B:(m * W + rank + 1) * B].tolist() for m in range(self.grad_accum)]


# ---------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What a run produced: its directory, the final model, the per-step losses of this run
    (indexed from ``start_step + 1``), and the dataset report."""

    run_dir: Path
    final_dir: Path | None
    start_step: int
    steps: int
    losses: list[float] = field(default_factory=list)
    report: DataReport | None = None


# ---------------------------------------------------------------------------- building blocks
def _resolve_tokenizer(config: TrainConfig):
    from ..checkpoint import resolve_model_path
    from ..tokenizer import Tokenizer
    if config.tokenizer is not None:
        return Tokenizer.from_dir(config.tokenizer)
    return Tokenizer.from_dir(resolve_model_path(config.model))


def _architecture(config: TrainConfig, tokenizer) -> ModelConfig:
    """ModelConfig for training from scratch (see ``TrainConfig.architecture``)."""
    arch = config.architecture
    fields: dict[str, Any]
    if isinstance(arch, str):
        path = Path(arch)
        if path.is_file():
            return ModelConfig.from_file(path)
        from ..config import PRESETS
        if arch not in PRESETS:
            raise ConfigError(f"architecture: unknown preset {arch!r}; presets: {', '.join(sorted(PRESETS))}")
        fields = dict(PRESETS[arch])
        explicit_vocab = False
    else:
        arch = dict(arch)
        preset = arch.pop("preset", None)
        fields = {}
        if preset is not None:
            from ..config import PRESETS
            if preset not in PRESETS:
                raise ConfigError(f"architecture.preset: unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
            fields.update(PRESETS[preset])
        import dataclasses
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(arch) - names)
        if unknown:
            raise ConfigError(f"architecture: unknown field {unknown[0]!r}; fields: preset, {', '.join(sorted(names))}")
        explicit_vocab = "vocab_size" in arch
        fields.update(arch)
    if not explicit_vocab:
        fields["vocab_size"] = tokenizer.vocab_size
    for key, tid in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                     ("pad_token_id", tokenizer.pad_token_id)):
        fields[key] = tid
    fields["torch_dtype"] = "float32"
    try:
        return ModelConfig(**fields)
    except TypeError as exc:
        raise ConfigError(f"architecture: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"architecture: {exc}") from None


def build_dataset(config: TrainConfig, tokenizer, *, mode: str, max_seq_len: int, eos_id: int | None) -> TokenDataset:
    """The dataset of a run (tokenized, truncated, packed as the config says).

    Raises:
        DataError, ConfigError: unusable data (naming the file and line).
    """
    from .data import build_pretrain_dataset, build_sft_dataset
    paths = config.data_paths()
    if mode == "pretrain":
        if eos_id is None:
            raise ConfigError("pretraining needs an end-of-text token to separate documents; the "
                              "tokenizer defines no eos_token")
        if config.effective_data_format not in ("auto", "text"):
            raise ConfigError(f"data_format {config.data_format!r}: pretrain reads text (plain .txt or "
                              "JSONL with a text field); use 'aquilachat sft' for conversations")
        return build_pretrain_dataset(paths, tokenizer, max_seq_len=max_seq_len, eos_id=eos_id,
                                      text_field=config.text_field, skip_bad_rows=config.skip_bad_rows)
    return build_sft_dataset(paths, tokenizer, template=config.template, max_seq_len=max_seq_len,
                             data_format=config.effective_data_format, skip_bad_rows=config.skip_bad_rows,
                             packing=config.packing)


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain model weights from a peft LoRA state dict: ``W + (B @ A) * scaling`` for every
    adapted ``Linear`` (what peft's ``merge_and_unload`` computes, ``scaling = lora_alpha / r``),
    with peft's ``base_model.model.`` prefix and ``.base_layer`` removed."""
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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.bf16 is not None:
        if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("bf16: true, but this GPU does not support bfloat16")
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


class _Metrics:
    """Rank 0's ``metrics.jsonl`` writer (one JSON object per logged step, flushed at once)."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        rows = []
        if keep_until is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if row.get("step", 0) <= keep_until:
                    rows.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """Draw ``loss`` (and the learning rate) against ``step`` from ``metrics.jsonl`` into a PNG.
    Returns ``None`` when matplotlib is missing or nothing was logged."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.set_title(metrics_path.parent.name)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- the run
def train(config: TrainConfig, *, mode: str = "sft", resume: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) a training job as described by ``config``; call it on every rank.

    Args:
        mode: ``"sft"`` (conversations, loss on assistant tokens) or ``"pretrain"`` (text, loss
            on every token).
        resume: continue from the newest complete checkpoint of ``config.run_dir`` (the model,
            optimizer, schedule, RNG states and data position); starts afresh when there is none.
        progress: show a tqdm bar on rank 0.
        log: where rank 0's messages go (default: stderr).

    Returns:
        :class:`TrainResult` (on every rank; ``final_dir`` is the exported model).

    Raises:
        ConfigError: inconsistent settings, an existing run without ``resume``, or a resume with a
            different dataset or global batch.
        DataError: bad data (file and line).
        CheckpointError: an unreadable checkpoint.
    """
    if mode not in ("sft", "pretrain"):
        raise ConfigError(f"mode must be 'sft' or 'pretrain', got {mode!r}")
    info = setup_distributed(config.device)
    rank0 = info.is_main

    def say(msg: str) -> None:
        if rank0:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    if config.deterministic:
        if info.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_all(config.seed)
    run_dir = config.run_dir
    latest = find_latest(run_dir)
    if latest is not None and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints (newest: {latest.name}); pass --resume "
                          "to continue that run, or set another experiment_name / output_dir")
    if resume and latest is None:
        say(f"--resume: no checkpoint in {run_dir}; starting from the beginning")

    # ---- tokenizer, model config, data
    tokenizer = _resolve_tokenizer(config)
    if config.architecture is not None:
        model_config = _architecture(config, tokenizer)
    else:
        from ..checkpoint import _config_file, resolve_model_path
        model_config = ModelConfig.from_file(_config_file(resolve_model_path(config.model)))
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size}")
    max_seq_len = config.max_seq_len or min(model_config.max_position_embeddings, 2048)
    if max_seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"max_seq_len {max_seq_len} exceeds the model's context of "
                          f"{model_config.max_position_embeddings} tokens")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        eos_id = tokenizer.token_to_id("<|endoftext|>")
    dataset = build_dataset(config, tokenizer, mode=mode, max_seq_len=max_seq_len, eos_id=eos_id)
    report = dataset.report
    plan = DataPlan(dataset.lengths, batch_size=config.batch_size,
                    grad_accum=config.gradient_accumulation_steps, world_size=info.world_size,
                    seed=config.seed, shuffle=config.shuffle_dataset)
    if plan.steps_per_epoch == 0:
        raise ConfigError(f"the dataset has {len(dataset)} training rows, fewer than one global batch of "
                          f"{plan.global_batch} (batch_size {config.batch_size} x gradient_accumulation_steps "
                          f"{config.gradient_accumulation_steps} x {info.world_size} processes)")
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch
    warmup_steps = config.warm_up_iters or int(round(config.warm_up * total_steps))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model_config.pad_token_id or 0)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        say(report.format())
        (run_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        import yaml
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False,
                                                            allow_unicode=True), encoding="utf-8")

    # ---- training state to resume from
    state = rng_state = None
    if resume and latest is not None:
        state, rng_state = load_training_state(latest, info.rank)
        _check_resumable(state, latest, plan=plan, n_units=len(dataset), config=config, mode=mode)

    # ---- model
    device = info.device
    fsdp = info.distributed and config.strategy == "fsdp"
    # Under FSDP only rank 0 reads the weights; the other ranks build the model on the meta
    # device (no memory) and receive their shards from rank 0 after sharding.
    on_meta = fsdp and not rank0
    from ..model import AquilaForCausalLM
    if on_meta:
        with torch.device("meta"):
            core = AquilaForCausalLM(model_config)
    elif state is not None and not config.lora:  # the checkpoint holds the trained weights
        from ..checkpoint import load_model
        core = load_model(latest, dtype=torch.float32, device="cpu")
    elif config.architecture is not None:
        core = AquilaForCausalLM(model_config)
        core.init_weights(config.seed)
    else:
        from ..checkpoint import load_model
        core = load_model(config.model, dtype=torch.float32, device="cpu")
    core.gradient_checkpointing = config.gradient_checkpointing
    core.train()
    model: torch.nn.Module = core
    scaling = None
    if config.lora:
        model, scaling = _apply_lora(core, config)
        if state is not None and not on_meta:
            _load_adapter(model, latest / "adapter.safetensors")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if fsdp:
        full_state = model.state_dict() if rank0 else {}
        wrapped = _wrap(model, core, config, info)
        if on_meta:
            wrapped.to_empty(device=device)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(wrapped, full_state, options=StateDictOptions(full_state_dict=True,
                                                                           broadcast_from_rank0=True))
        del full_state
    else:
        model.to(device)
        wrapped = _wrap(model, core, config, info)

    # ---- optimizer
    decay, no_decay = [], []
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.eps)
    start_step = 0
    if state is not None:
        _load_optimizer(opt, wrapped, latest, state, config, info)
        start_step = int(state["step"])
        _set_rng_state(rng_state, device)
        say(f"resumed from {latest} at step {start_step}")
    use_bf16 = _use_bf16(config, device)
    say(f"{mode}: {total_steps} steps ({plan.steps_per_epoch} per epoch), global batch {plan.global_batch} = "
        f"{config.batch_size} x {config.gradient_accumulation_steps} accumulation x {info.world_size} "
        f"processes, warm-up {warmup_steps} steps, {n_trainable:,} trainable parameters"
        + (" (LoRA)" if config.lora else "") + f", {config.strategy if info.distributed else 'single process'}"
        + f" on {device}" + (", bf16 autocast" if use_bf16 else ""))

    metrics = _Metrics(run_dir / "metrics.jsonl", keep_until=start_step if state is not None else None) if rank0 else None
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc=mode, dynamic_ncols=True,
               disable=not (progress and rank0), file=sys.stderr)
    sleep_s = float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)
    losses: list[float] = []
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
    params = [p for p in wrapped.parameters() if p.requires_grad]
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, lr=config.lr, min_lr=config.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, grad_norm, n_targets, n_tokens = _train_step(
                wrapped, opt, [[dataset[i] for i in rows] for rows in plan.micro_batches(step, info.rank)],
                params=params, pad_id=pad_id, autocast=autocast, config=config, info=info, step=step)
            done = step + 1
            dt = time.perf_counter() - t0
            losses.append(loss)
            if rank0:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if done % config.log_interval == 0 or done == total_steps:
                    row = {"step": done, "epoch": plan.epoch_of(step), "loss": loss, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": n_tokens / dt, "tokens": n_tokens,
                           "supervised_tokens": n_targets, "step_time_s": dt}
                    if device.type == "cuda":
                        row["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    metrics.write(row)
            if done % config.save_interval == 0 or done == total_steps:
                _save(run_dir, done, wrapped=wrapped, core=core, opt=opt, config=config, info=info,
                      tokenizer=tokenizer, plan=plan, n_units=len(dataset), total_steps=total_steps,
                      warmup_steps=warmup_steps, scaling=scaling, mode=mode)
            if sleep_s:
                time.sleep(sleep_s)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    # ---- export
    final_dir = _export(run_dir, wrapped=wrapped, core=core, config=config, info=info,
                        tokenizer=tokenizer, scaling=scaling)
    if rank0:
        png = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        say(f"done: {total_steps} steps; model in {final_dir}" + (f"; loss curve {png}" if png else "")
            + (f"\ntry: aquilachat chat --model {final_dir}" + (f" --template {config.template}"
                                                                  if config.template != "aquila-chat" else "")
               if mode == "sft" else f"\ntry: aquilachat generate --model {final_dir} --prompt '...'"))
    return TrainResult(run_dir, final_dir, start_step, total_steps, losses, report)


# ---------------------------------------------------------------------------- helpers of train()
def _train_step(wrapped: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches: list[list],
                *, params: list[torch.Tensor], pad_id: int, autocast, config: TrainConfig, info: DistInfo,
                step: int) -> tuple[float, float, int, int]:
    """One optimizer step over this rank's micro-batches (lists of :class:`Unit`).

    The supervised tokens of the global batch are counted and all-reduced first (``N``); each
    micro-batch back-propagates ``sum(token cross-entropy) * world_size / N``. Gradients are
    reduced across ranks on the last micro-batch only.

    Returns:
        ``(loss, grad_norm, N, tokens)``: the mean token loss over the global batch, the global
        gradient norm before clipping, the global supervised-token and non-padding token counts.

    Raises:
        FloatingPointError: a non-finite loss (the weights are left unchanged).
    """
    device = info.device
    batches = [collate(units, pad_id) for units in micro_batches]
    counts = torch.tensor([sum(int((y != IGNORE_INDEX).sum()) for _, y in batches),
                           sum(len(u) for units in micro_batches for u in units)],
                          dtype=torch.int64, device=device)
    _all_reduce(counts, info)
    n_targets, n_tokens = int(counts[0]), int(counts[1])
    scale = info.world_size / n_targets  # undoes DDP/FSDP's gradient averaging over ranks
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for m, (x, y) in enumerate(batches):
        with _sync_context(wrapped, config, info, last=m == len(batches) - 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sel = y != IGNORE_INDEX
            with autocast:
                logits = wrapped(x, logits_mask=sel)  # (N_micro, V) fp32: supervised positions only
            token_loss = F.cross_entropy(logits.float(), y[sel], reduction="sum")
            (token_loss * scale).backward()
        loss_sum += token_loss.detach().double()
    _all_reduce(loss_sum, info)
    loss = float(loss_sum) / n_targets
    if not math.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        raise FloatingPointError(f"step {step + 1}: the loss is {loss}; lower lr or check the data")
    grad_norm = _clip(params, config.clip_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm, n_targets, n_tokens


def _check_resumable(state: dict[str, Any], ckpt: Path, *, plan: DataPlan, n_units: int,
                     config: TrainConfig, mode: str) -> None:
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{ckpt}: training state version {state.get('version')!r} is not supported")
    problems = []
    if state["num_units"] != n_units:
        problems.append(f"the dataset now has {n_units} training rows, the run had {state['num_units']}")
    if state["global_batch"] != plan.global_batch:
        problems.append(f"the global batch is now {plan.global_batch}, the run had {state['global_batch']} "
                        "(batch_size x gradient_accumulation_steps x processes)")
    if state["seed"] != config.seed or state["shuffle"] != config.shuffle_dataset:
        problems.append("seed or shuffle_dataset changed")
    if state["lora"] != config.lora:
        problems.append("lora changed")
    if state["mode"] != mode:
        problems.append(f"the run was '{state['mode']}', not '{mode}'")
    if problems:
        raise ConfigError(f"cannot resume {ckpt} exactly: " + "; ".join(problems))


def _apply_lora(core: torch.nn.Module, config: TrainConfig):
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


def _load_adapter(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file
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


def _wrap(model: torch.nn.Module, core: torch.nn.Module, config: TrainConfig, info: DistInfo) -> torch.nn.Module:
    if not info.distributed:
        return model
    if config.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[info.device] if info.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in core.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _unwrap(wrapped: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (FSDP2 and peft keep the module itself)."""
    from torch.nn.parallel import DistributedDataParallel
    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


def _sync_context(wrapped: torch.nn.Module, config: TrainConfig, info: DistInfo, last: bool):
    """Reduce gradients only on the last micro-batch of a step (DDP ``no_sync``; FSDP2
    ``set_requires_gradient_sync``)."""
    if not info.distributed:
        return nullcontext()
    if config.strategy == "ddp":
        return nullcontext() if last else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(last)
    return nullcontext()


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient L2 norm before clipping (clips to ``max_norm`` when it is > 0)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _full_state_dict(wrapped: torch.nn.Module, model: torch.nn.Module, info: DistInfo, config: TrainConfig):
    """The full state dict on rank 0 (collective under FSDP), ``None`` on other ranks."""
    if info.distributed and config.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if info.is_main else None
    if not info.is_main:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _save(run_dir: Path, step: int, *, wrapped, core, opt, config: TrainConfig, info: DistInfo, tokenizer,
          plan: DataPlan, n_units: int, total_steps: int, warmup_steps: int, scaling, mode: str) -> Path:
    model = _unwrap(wrapped)
    sd = _full_state_dict(wrapped, model, info, config)
    adapter = None
    if sd is not None and config.lora:
        adapter = {k: v for k, v in sd.items() if ".lora_" in k}
        sd = merge_lora_state_dict(sd, scaling)
    if info.distributed and config.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim_state = get_optimizer_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
        optim_state = optim_state if info.is_main else None
    else:
        optim_state = opt.state_dict() if info.is_main else None
    training_state = None
    if info.is_main:
        training_state = {
            "version": STATE_VERSION, "mode": mode, "step": step, "epoch": plan.epoch_of(step),
            "rows_consumed": step * plan.global_batch, "num_units": n_units,
            "global_batch": plan.global_batch, "world_size": info.world_size,
            "batch_size": config.batch_size, "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "seed": config.seed, "shuffle": config.shuffle_dataset, "lora": config.lora,
            "strategy": config.strategy if info.distributed else "single",
            "schedule": {"total_steps": total_steps, "warmup_steps": warmup_steps, "lr": config.lr,
                         "min_lr": config.min_lr, "kind": "linear warm-up + cosine"},
            "config": config.to_yaml_dict(),
        }
    return save_checkpoint(run_dir, step, dist_info=info, config=core.config, tokenizer=tokenizer,
                           model_state=sd, training_state=training_state,
                           rank_state=_rng_state(info.device), optimizer_state=optim_state, adapter_state=adapter,
                           keep=config.keep_checkpoints, template=config.template)


def _load_optimizer(opt, wrapped, ckpt: Path, state: dict[str, Any], config: TrainConfig, info: DistInfo) -> None:
    if info.distributed and config.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        if state.get("strategy") != "fsdp":
            raise ConfigError("cannot resume an FSDP run from a checkpoint written with strategy "
                              f"{state.get('strategy')!r}")
        # rank 0 reads the full state and sends each rank its shards
        full = load_optimizer_state(ckpt) if info.is_main else {}
        set_optimizer_state_dict(wrapped, opt, optim_state_dict=full,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return
    if state.get("strategy") == "fsdp":
        raise ConfigError("this checkpoint was written with strategy 'fsdp'; resume it with fsdp")
    opt.load_state_dict(load_optimizer_state(ckpt))


def _export(run_dir: Path, *, wrapped, core, config: TrainConfig, info: DistInfo, tokenizer,
            scaling) -> Path:
    """Write ``run_dir/final``: plain Hugging Face weights; LoRA merged with ``merge_and_unload``."""
    final = run_dir / "final"
    if config.lora and not (info.distributed and config.strategy == "fsdp"):
        if info.is_main:
            base = _unwrap(wrapped).merge_and_unload()
            sd = {k: v.detach().cpu() for k, v in base.state_dict().items()}
            export_final(run_dir, sd, core.config, tokenizer, dtype=config.export_dtype,
                         template=config.template)
    else:
        unwrapped = _unwrap(wrapped)
        sd = _full_state_dict(wrapped, unwrapped, info, config)
        if sd is not None:
            if config.lora:
                sd = merge_lora_state_dict(sd, scaling)
            export_final(run_dir, sd, core.config, tokenizer, dtype=config.export_dtype,
                         template=config.template)
    if info.distributed:
        import torch.distributed as dist
        dist.barrier()
    return final
