"""The training loop shared by ``aquilachat sft`` and ``aquilachat pretrain``.

A run goes through four stages (:func:`train`), each a function of what the previous ones built:

1. :func:`set_up_run` — the process group and the :class:`~aquilachat.train.strategy.Strategy`
   (single, DDP or FSDP2, chosen once), the tokenizer, the model's config, the dataset and its
   :class:`DataPlan`, the schedule, and the checkpoint to resume: a :class:`Run`;
2. :func:`build_model` — the model (from the checkpoint, the base model or from scratch), LoRA,
   the strategy's wrapping, AdamW and the resumed optimizer and RNG states: a :class:`Trainee`;
3. :func:`fit` — the optimizer steps, ``metrics.jsonl`` and the atomic checkpoints;
4. :func:`export` — ``final/``: plain Hugging Face weights (LoRA merged).

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

import dataclasses
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
import yaml
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, load_model, resolve_model_path
from ..config import PRESETS, ModelConfig
from ..errors import CheckpointError, ConfigError
from ..memory import plan_training
from ..model import AquilaForCausalLM
from ..tokenizer import Tokenizer
from .checkpoint import export_final, find_latest, load_optimizer_state, load_training_state, save_checkpoint
from .config import TrainConfig
from .data import IGNORE_INDEX, DataReport, TokenDataset, build_pretrain_dataset, build_sft_dataset, collate
from .distributed import DistInfo, setup_distributed
from .lora import adapter_state, apply_lora, load_adapter, merge_lora_state_dict
from .metrics import MetricsLog, plot_loss
from .strategy import Strategy, choose_strategy

__all__ = ["train", "lr_at", "DataPlan", "TrainResult", "Run", "Trainee", "set_up_run", "build_model", "fit",
           "export", "build_dataset", "STEP_SLEEP_ENV"]

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


# ---------------------------------------------------------------------------- what a run holds
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


@dataclass
class Run:
    """A run once set up (stage 1): what stays fixed from its first step to its last.

    Attributes:
        config, mode: the YAML and ``"sft"`` / ``"pretrain"``.
        strategy: single / DDP / FSDP2, with this process's :class:`DistInfo` (``.info``).
        run_dir: ``output_dir/experiment_name``.
        tokenizer, model_config: the tokenizer and the architecture of the model to train.
        dataset, plan: the training rows, and which of them each rank takes at each step.
        max_seq_len: the longest training row (tokens).
        total_steps, warmup_steps: the schedule (:func:`lr_at`).
        pad_id: the padding token of the batches.
        use_bf16: bf16 autocast (the weights stay fp32).
        say: rank 0's log (a no-op on the other ranks).
        base: the base model's checkpoint (``model``), opened once; None when training from
            scratch (``architecture``).
        resume_from: the checkpoint to continue, with its ``training_state`` (``resume_state``)
            and this rank's RNG states (``resume_rng``); all ``None`` for a fresh run.
    """

    config: TrainConfig
    mode: str
    strategy: Strategy
    run_dir: Path
    tokenizer: Tokenizer
    model_config: ModelConfig
    dataset: TokenDataset
    plan: DataPlan
    max_seq_len: int
    total_steps: int
    warmup_steps: int
    pad_id: int
    use_bf16: bool
    say: Callable[[str], None]
    resume_from: Path | None = None
    resume_state: dict[str, Any] | None = None
    resume_rng: dict[str, Any] | None = None
    base: Checkpoint | None = None

    @property
    def info(self) -> DistInfo:
        return self.strategy.info


@dataclass
class Trainee:
    """The model in training (stage 2), and how far it got: with the :class:`Run`, everything a
    checkpoint saves.

    Attributes:
        core: the plain :class:`AquilaForCausalLM` (its config goes into the checkpoints).
        wrapped: what the strategy trains (``core`` inside peft's LoRA model and DDP / FSDP2).
        optimizer: AdamW over the trainable parameters.
        lora_scaling: ``lora_alpha / lora_r``, ``None`` without LoRA.
        trainable: number of trainable parameters.
        step: optimizer steps done (the next step's index).
    """

    core: AquilaForCausalLM
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lora_scaling: float | None
    trainable: int
    step: int = 0


# ---------------------------------------------------------------------------- building blocks
def _resolve_tokenizer(config: TrainConfig, base: Checkpoint | None) -> Tokenizer:
    if config.tokenizer is not None:
        return Tokenizer.from_dir(config.tokenizer)
    if base is not None:
        return base.load_tokenizer()
    return Tokenizer.from_dir(resolve_model_path(config.model))  # from scratch: only its tokenizer


def _preset(name: str, key: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"{key}: unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def _model_config(config: TrainConfig, tokenizer: Tokenizer, base: Checkpoint | None) -> ModelConfig:
    """The model to train: the base model's ``config.json``, or ``architecture`` from scratch."""
    if config.architecture is None:
        return base.config
    return _architecture(config, tokenizer)


def _architecture(config: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """ModelConfig for training from scratch (see ``TrainConfig.architecture``)."""
    arch = config.architecture
    fields: dict[str, Any]
    if isinstance(arch, str):
        path = Path(arch)
        if path.is_file():
            return ModelConfig.from_file(path)
        fields = _preset(arch, "architecture")
        explicit_vocab = False
    else:
        arch = dict(arch)
        preset = arch.pop("preset", None)
        fields = {} if preset is None else _preset(preset, "architecture.preset")
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


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.bf16 is not None:
        if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("bf16: true, but this GPU does not support bfloat16")
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


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
    run = set_up_run(config, mode=mode, resume=resume, log=log)
    trainee = build_model(run)
    start_step = trainee.step
    losses = fit(run, trainee, progress=progress)
    final_dir = export(run, trainee)
    return TrainResult(run.run_dir, final_dir, start_step, run.total_steps, losses, run.dataset.report)


def set_up_run(config: TrainConfig, *, mode: str, resume: bool,
               log: Callable[[str], None] | None = None) -> Run:
    """Stage 1: the process group and strategy, seeds, tokenizer, model config, dataset, data plan
    and schedule; the run directory's ``data_report.json`` and ``config.yaml`` (rank 0); and, with
    ``resume``, the checkpoint to continue, checked against this run.

    Raises:
        ConfigError, DataError, CheckpointError: as :func:`train`.
    """
    if mode not in ("sft", "pretrain"):
        raise ConfigError(f"mode must be 'sft' or 'pretrain', got {mode!r}")
    info = setup_distributed(config.device)
    strategy = choose_strategy(config, info)

    def say(msg: str) -> None:
        if info.is_main:
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

    # the base model, resolved once (a Hub id is fetched here, once)
    base = Checkpoint.open(config.model) if config.architecture is None else None
    if base is not None and base.quantization is not None:
        raise ConfigError(f"model: {base.config_file} is a {base.quantization.method} checkpoint (quantization_config); "
                          "train from the float checkpoint")
    tokenizer = _resolve_tokenizer(config, base)
    model_config = _model_config(config, tokenizer, base)
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
    plan = DataPlan(dataset.lengths, batch_size=config.batch_size,
                    grad_accum=config.gradient_accumulation_steps, world_size=info.world_size,
                    seed=config.seed, shuffle=config.shuffle_dataset)
    if plan.steps_per_epoch == 0:
        raise ConfigError(f"the dataset has {len(dataset)} training rows, fewer than one global batch of "
                          f"{plan.global_batch} (batch_size {config.batch_size} x gradient_accumulation_steps "
                          f"{config.gradient_accumulation_steps} x {info.world_size} processes)")
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model_config.pad_token_id or 0)
    run = Run(config, mode, strategy, run_dir, tokenizer, model_config, dataset, plan, max_seq_len, total_steps,
              warmup_steps=config.warm_up_iters or int(round(config.warm_up * total_steps)), pad_id=pad_id,
              use_bf16=_use_bf16(config, info.device), say=say, base=base)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        say(dataset.report.format())
        (run_dir / "data_report.json").write_text(json.dumps(dataset.report.to_dict(), indent=2, ensure_ascii=False)
                                                   + "\n", encoding="utf-8")
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False,
                                                            allow_unicode=True), encoding="utf-8")
    if resume and latest is not None:
        run.resume_from = latest
        run.resume_state, run.resume_rng = load_training_state(latest, info.rank)
        _check_resumable(run.resume_state, latest, plan=plan, n_units=len(dataset), config=config, mode=mode)
    return run


def build_model(run: Run) -> Trainee:
    """Stage 2: the model to train, wrapped by the run's strategy, and its optimizer; resumed
    from ``run.resume_from`` when set.

    What it allocates follows from ``run`` alone (``config``: LoRA, batch size; ``model_config``;
    ``max_seq_len``; ``strategy``: ranks and sharding), and nothing large exists before it runs.
    The weights come from the checkpoint being resumed (without LoRA: the checkpoint holds the
    trained weights), or from ``architecture`` (from scratch, ``init_weights(seed)``), or from
    the base ``model``. Under FSDP2 only rank 0 reads them; the other ranks build the model on
    the meta device (no memory) and receive their shards when the strategy wraps it.

    First the memory plan (:func:`aquilachat.memory.plan_training`): weights, gradients,
    optimizer state and activations at the configured batch and length, per rank, against the
    memory available; a run that cannot fit stops here with one error naming what would fit
    (LoRA, a smaller batch, gradient checkpointing, more ranks with FSDP2).

    Raises:
        MemoryPlanError: the run does not fit in memory.
        CheckpointError: unreadable weights, adapter or optimizer state.
        ConfigError: LoRA without peft or with unknown targets; a checkpoint of an incompatible
            strategy (FSDP's optimizer state is keyed by name, the others' by index).
    """
    config, strategy = run.config, run.strategy
    info = strategy.info
    plan = plan_training(run.model_config, batch_size=config.batch_size, seq_len=run.max_seq_len,
                         lora_r=config.lora_r if config.lora else None, lora_targets=config.lora_target_modules,
                         strategy=strategy.name, world_size=info.world_size, ranks_per_node=info.local_world_size,
                         gradient_checkpointing=config.gradient_checkpointing, bf16=run.use_bf16,
                         device=info.device, what=str(config.model or config.architecture))
    run.say(f"memory plan: {plan.summary()}")
    if not strategy.loads_weights:
        with torch.device("meta"):
            core = AquilaForCausalLM(run.model_config)
    elif run.resume_from is not None and not config.lora:
        core = load_model(run.resume_from, dtype=torch.float32, device="cpu")  # (the plan above counted it)
    elif config.architecture is not None:
        core = AquilaForCausalLM(run.model_config)
        core.init_weights(config.seed)
    else:
        core = run.base.load_model(dtype=torch.float32, device="cpu", check_memory=False)
    core.gradient_checkpointing = config.gradient_checkpointing
    core.train()
    model: torch.nn.Module = core
    scaling = None
    if config.lora:
        model, scaling = apply_lora(core, config)
        if run.resume_from is not None and strategy.loads_weights:
            load_adapter(model, run.resume_from / "adapter.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped = strategy.wrap(model)
    decay, no_decay = [], []
    for p in wrapped.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.eps)
    trainee = Trainee(core, wrapped, opt, scaling, trainable)
    if run.resume_from is not None:
        ckpt = run.resume_from
        strategy.load_optimizer_state(wrapped, opt, lambda: load_optimizer_state(ckpt),
                                      written_by=run.resume_state.get("strategy"))
        trainee.step = int(run.resume_state["step"])
        _set_rng_state(run.resume_rng, strategy.info.device)
        run.say(f"resumed from {ckpt} at step {trainee.step}")
    return trainee


def fit(run: Run, trainee: Trainee, *, progress: bool = True) -> list[float]:
    """Stage 3: optimizer steps ``trainee.step .. run.total_steps - 1``; rank 0 logs every
    ``log_interval`` steps to ``metrics.jsonl``; a checkpoint every ``save_interval`` steps and
    after the last. Returns the losses of the steps taken (mean token loss of each global batch).

    Raises:
        FloatingPointError: a non-finite loss.
    """
    config, plan, info, device = run.config, run.plan, run.info, run.info.device
    rank0 = info.is_main
    run.say(f"{run.mode}: {run.total_steps} steps ({plan.steps_per_epoch} per epoch), global batch "
            f"{plan.global_batch} = {config.batch_size} x {config.gradient_accumulation_steps} accumulation x "
            f"{info.world_size} processes, warm-up {run.warmup_steps} steps, {trainee.trainable:,} trainable "
            "parameters" + (" (LoRA)" if config.lora else "")
            + f", {run.strategy.name if info.distributed else 'single process'} on {device}"
            + (", bf16 autocast" if run.use_bf16 else ""))
    metrics = (MetricsLog(run.run_dir / "metrics.jsonl", keep_until=trainee.step if run.resume_from else None)
               if rank0 else None)
    bar = tqdm(total=run.total_steps, initial=trainee.step, desc=run.mode, dynamic_ncols=True,
               disable=not (progress and rank0), file=sys.stderr)
    sleep_s = float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)
    losses: list[float] = []
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if run.use_bf16 else nullcontext()
    params = [p for p in trainee.wrapped.parameters() if p.requires_grad]
    try:
        for step in range(trainee.step, run.total_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps=run.total_steps, warmup_steps=run.warmup_steps, lr=config.lr,
                       min_lr=config.min_lr)
            for group in trainee.optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [[run.dataset[i] for i in rows] for rows in plan.micro_batches(step, info.rank)]
            loss, grad_norm, n_targets, n_tokens = _train_step(run, trainee, micro_batches, params=params,
                                                               autocast=autocast, step=step)
            trainee.step = done = step + 1
            dt = time.perf_counter() - t0
            losses.append(loss)
            if rank0:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if done % config.log_interval == 0 or done == run.total_steps:
                    row = {"step": done, "epoch": plan.epoch_of(step), "loss": loss, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": n_tokens / dt, "tokens": n_tokens,
                           "supervised_tokens": n_targets, "step_time_s": dt}
                    if device.type == "cuda":
                        row["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    metrics.write(row)
            if done % config.save_interval == 0 or done == run.total_steps:
                _save(run, trainee)
            if sleep_s:
                time.sleep(sleep_s)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return losses


def export(run: Run, trainee: Trainee) -> Path:
    """Stage 4: write ``run_dir/final`` (rank 0; collective under FSDP): plain Hugging Face
    weights in ``export_dtype``, LoRA merged, servable as is; and ``loss.png``. Returns the path."""
    final_dir = run.run_dir / "final"
    sd, _ = _weights(run, trainee)
    if sd is not None:
        export_final(run.run_dir, sd, trainee.core.config, run.tokenizer, dtype=run.config.export_dtype,
                     template=run.config.template)
    run.strategy.barrier()
    if run.info.is_main:
        png = plot_loss(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
        template = run.config.template
        run.say(f"done: {run.total_steps} steps; model in {final_dir}" + (f"; loss curve {png}" if png else "")
                + (f"\ntry: aquilachat chat --model {final_dir}" + (f" --template {template}"
                                                                    if template != "aquila-chat" else "")
                   if run.mode == "sft" else f"\ntry: aquilachat generate --model {final_dir} --prompt '...'"))
    return final_dir


# ---------------------------------------------------------------------------- helpers of the stages
def _train_step(run: Run, trainee: Trainee, micro_batches: list[list], *, params: list[torch.Tensor],
                autocast, step: int) -> tuple[float, float, int, int]:
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
    strategy, device, opt = run.strategy, run.info.device, trainee.optimizer
    batches = [collate(units, run.pad_id) for units in micro_batches]
    counts = torch.tensor([sum(int((y != IGNORE_INDEX).sum()) for _, y in batches),
                           sum(len(u) for units in micro_batches for u in units)],
                          dtype=torch.int64, device=device)
    strategy.all_reduce(counts)
    n_targets, n_tokens = int(counts[0]), int(counts[1])
    scale = run.info.world_size / n_targets  # undoes DDP/FSDP's gradient averaging over ranks
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for m, (x, y) in enumerate(batches):
        with strategy.no_sync(trainee.wrapped, enabled=m < len(batches) - 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sel = y != IGNORE_INDEX
            with autocast:
                logits = trainee.wrapped(x, logits_mask=sel)  # (N_micro, V) fp32: supervised positions only
            token_loss = F.cross_entropy(logits.float(), y[sel], reduction="sum")
            (token_loss * scale).backward()
        loss_sum += token_loss.detach().double()
    strategy.all_reduce(loss_sum)
    loss = float(loss_sum) / n_targets
    if not math.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        raise FloatingPointError(f"step {step + 1}: the loss is {loss}; lower lr or check the data")
    grad_norm = _clip(params, run.config.clip_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm, n_targets, n_tokens


def _weights(run: Run, trainee: Trainee) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """``(plain weights, LoRA adapter)`` on rank 0 (``(None, None)`` elsewhere; collective under
    FSDP): the full state dict, with the adapter merged into the weights when there is one."""
    sd = run.strategy.full_state_dict(trainee.wrapped)
    if sd is None or trainee.lora_scaling is None:
        return sd, None
    return merge_lora_state_dict(sd, trainee.lora_scaling), adapter_state(sd)


def _save(run: Run, trainee: Trainee) -> Path:
    """Checkpoint ``trainee.step`` (collective): weights, adapter, optimizer, training state,
    each rank's RNG states (see :mod:`aquilachat.train.checkpoint`)."""
    sd, adapter = _weights(run, trainee)
    optim_state = run.strategy.optimizer_state(trainee.wrapped, trainee.optimizer)
    config, plan, step = run.config, run.plan, trainee.step
    training_state = None
    if run.info.is_main:
        training_state = {
            "version": STATE_VERSION, "mode": run.mode, "step": step, "epoch": plan.epoch_of(step),
            "rows_consumed": step * plan.global_batch, "num_units": len(run.dataset),
            "global_batch": plan.global_batch, "world_size": run.info.world_size,
            "batch_size": config.batch_size, "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "seed": config.seed, "shuffle": config.shuffle_dataset, "lora": config.lora,
            "strategy": run.strategy.name,
            "schedule": {"total_steps": run.total_steps, "warmup_steps": run.warmup_steps, "lr": config.lr,
                         "min_lr": config.min_lr, "kind": "linear warm-up + cosine"},
            "config": config.to_yaml_dict(),
        }
    return save_checkpoint(run.run_dir, step, dist_info=run.info, config=trainee.core.config, tokenizer=run.tokenizer,
                           model_state=sd, training_state=training_state, rank_state=_rng_state(run.info.device),
                           optimizer_state=optim_state, adapter_state=adapter, keep=config.keep_checkpoints,
                           template=config.template)


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


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient L2 norm before clipping (clips to ``max_norm`` when it is > 0)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)
