"""How a training run spreads over processes: one strategy object, chosen once.

The training loop never asks "single, DDP or FSDP?": :func:`choose_strategy` answers once from the
config and torchrun's environment, and the loop calls the strategy's methods (the shape of
Lightning Fabric's strategies, which litgpt trains with):

==========================  ==============  ======================  ==============================
method                      single          DDP                     FSDP2 (``fully_shard``)
==========================  ==============  ======================  ==============================
``loads_weights``           yes             every rank              rank 0 only; the other ranks
                                                                    build the model on ``meta``
``wrap(model)``             to the device   ``DistributedData-      each decoder layer and the
                                            Parallel``              model sharded; rank 0's weights
                                                                    broadcast into the shards
``no_sync(wrapped)``        nothing         ``no_sync()``           ``set_requires_gradient_sync``
``all_reduce(t)``           nothing         sum over ranks          sum over ranks
``full_state_dict``         a CPU copy      rank 0's copy           gathered on rank 0 (collective)
``optimizer_state``         ``state_dict``  rank 0's                gathered, keyed by parameter
                                                                    name (collective)
``load_optimizer_state``    every rank      every rank reads        rank 0 reads, each rank gets
                            reads the file  the file                its shards
==========================  ==============  ======================  ==============================

Gradients are averaged over ranks by DDP and FSDP alike, which the loss normalisation of
:mod:`aquilachat.train.loop` undoes (it multiplies by the world size).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..model import DecoderLayer
from .config import TrainConfig
from .distributed import DistInfo

__all__ = ["Strategy", "DDPStrategy", "FSDPStrategy", "choose_strategy"]


class Strategy:
    """One process on one device; the base whose methods the distributed strategies override.

    Attributes:
        name: recorded in each checkpoint (``"single"``, ``"ddp"``, ``"fsdp"``).
        info: this process's rank, world size and device.
    """

    name = "single"

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    @property
    def loads_weights(self) -> bool:
        """Whether this rank reads the weights from disk (else it builds the model on ``meta``
        and :meth:`wrap` fills it)."""
        return True

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: ``model`` on this rank's device (parallel strategies wrap or
        shard it). Call it once, after LoRA is applied and before the optimizer is built."""
        return model.to(self.info.device)

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        """The model inside ``wrapped`` (the module :meth:`wrap` was given; FSDP2 keeps it)."""
        return wrapped

    def no_sync(self, wrapped: nn.Module, enabled: bool = True) -> ContextManager:
        """While ``enabled``, backward passes accumulate gradients without reducing them across
        ranks (every micro-batch of a step but the last)."""
        return nullcontext()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place; returns it."""
        return t

    def barrier(self) -> None:
        """Wait for every rank."""

    def full_state_dict(self, wrapped: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on the CPU on rank 0, ``None`` on the other ranks
        (collective: every rank calls it)."""
        if not self.info.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.unwrap(wrapped).state_dict().items()}

    def optimizer_state(self, wrapped: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The whole optimizer state on rank 0, ``None`` on the other ranks (collective)."""
        return opt.state_dict() if self.info.is_main else None

    def load_optimizer_state(self, wrapped: nn.Module, opt: torch.optim.Optimizer,
                             read: Callable[[], dict[str, Any]], *, written_by: str) -> None:
        """Restore ``opt`` from the state :meth:`optimizer_state` saved; ``read()`` returns it
        (called only on the ranks that need the file).

        Raises:
            ConfigError: the checkpoint was written by a strategy whose optimizer state this one
                cannot read (FSDP keys it by parameter name, the others by index).
        """
        if written_by == "fsdp":
            raise ConfigError("this checkpoint was written with strategy 'fsdp'; resume it with fsdp")
        opt.load_state_dict(read())


class _Distributed(Strategy):
    """What every multi-process strategy shares: collectives over the default process group."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        dist.barrier()


class DDPStrategy(_Distributed):
    """Every rank holds the whole model; ``DistributedDataParallel`` averages the gradients."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        model.to(self.info.device)
        return DistributedDataParallel(model, device_ids=[self.info.device] if self.info.device.type == "cuda" else None)

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return wrapped.module

    def no_sync(self, wrapped: nn.Module, enabled: bool = True) -> ContextManager:
        return wrapped.no_sync() if enabled else nullcontext()


class FSDPStrategy(_Distributed):
    """FSDP2: parameters, gradients and optimizer state sharded over the ranks (each decoder
    layer one ``fully_shard`` unit, then the whole model)."""

    name = "fsdp"

    def __init__(self, info: DistInfo) -> None:
        super().__init__(info)
        try:  # FSDP2's public API (torch >= 2.6); only needed once this strategy is chosen
            from torch.distributed.checkpoint import state_dict as dcp_state_dict
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:
            raise ConfigError(f"strategy: fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard): {exc}") from None
        self._fully_shard, self._init_device_mesh, self._dcp = fully_shard, init_device_mesh, dcp_state_dict

    @property
    def loads_weights(self) -> bool:
        return self.info.is_main

    def wrap(self, model: nn.Module) -> nn.Module:
        # rank 0 holds the weights; the other ranks' models are on meta and receive their shards
        full_state = model.state_dict() if self.info.is_main else {}
        mesh = self._init_device_mesh(self.info.device.type, (self.info.world_size,))
        for layer in (m for m in model.modules() if isinstance(m, DecoderLayer)):
            self._fully_shard(layer, mesh=mesh)
        self._fully_shard(model, mesh=mesh)
        if not self.info.is_main:
            model.to_empty(device=self.info.device)
        self._dcp.set_model_state_dict(model, full_state, options=self._dcp.StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        return model

    @contextmanager
    def no_sync(self, wrapped: nn.Module, enabled: bool = True) -> Iterator[None]:
        wrapped.set_requires_gradient_sync(not enabled)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    def full_state_dict(self, wrapped: nn.Module) -> dict[str, torch.Tensor] | None:
        sd = self._dcp.get_model_state_dict(wrapped, options=self._full_options())
        return sd if self.info.is_main else None

    def optimizer_state(self, wrapped: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        state = self._dcp.get_optimizer_state_dict(wrapped, opt, options=self._full_options())
        return state if self.info.is_main else None

    def load_optimizer_state(self, wrapped: nn.Module, opt: torch.optim.Optimizer,
                             read: Callable[[], dict[str, Any]], *, written_by: str) -> None:
        if written_by != "fsdp":
            raise ConfigError(f"cannot resume an FSDP run from a checkpoint written with strategy {written_by!r}")
        # rank 0 reads the full state and sends each rank its shards
        full = read() if self.info.is_main else {}
        self._dcp.set_optimizer_state_dict(wrapped, opt, optim_state_dict=full, options=self._dcp.StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))

    def _full_options(self):
        return self._dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)


def choose_strategy(config: TrainConfig, info: DistInfo) -> Strategy:
    """The strategy of this run: :class:`Strategy` (single) in one process, else the config's
    ``strategy`` (``ddp`` or ``fsdp``).

    Raises:
        ConfigError: ``fsdp`` with a torch that lacks FSDP2.
    """
    if not info.distributed:
        return Strategy(info)
    return {"ddp": DDPStrategy, "fsdp": FSDPStrategy}[config.strategy](info)
