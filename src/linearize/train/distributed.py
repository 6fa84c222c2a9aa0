"""Many processes, one trainer: the process group that ``torchrun`` / ``accelerate launch`` set up.

Launchers tell each process its place through the standard variables ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous); a process group
that the caller already initialised is used as is. gloo on CPU, nccl on GPU. Every process
holds a full replica (data parallel, DDP semantics): each takes its share of the global batch and
the gradients are summed once per optimizer step. ``parallel="fsdp"`` shards the decoder layers
instead (``torch.distributed.fsdp.fully_shard``) for models too big to replicate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, items: int) -> slice:
        """This rank's contiguous share of ``items`` (which the world size divides)."""
        if items % self.world_size:
            raise ValueError(
                f"{items} sequences per step cannot be split over {self.world_size} processes; "
                "make --batch-size a multiple of the number of processes"
            )
        n = items // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients over processes (one flat buffer, one collective)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over processes."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Make every process hold rank 0's values of ``tensors``."""
        if self.active:
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but no CUDA GPU is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """This process's :class:`DistContext`: the existing process group, the one a launcher
    described (``WORLD_SIZE`` > 1), or a single process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return DistContext(device=resolve_device(device))
        target = resolve_device(device, local_rank)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
        logger.info("process group: rank %d of %d", dist.get_rank(), dist.get_world_size())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    target = resolve_device(device, local_rank)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Replicas:
    """Data parallel with DDP semantics: every process holds the whole model, gradients are
    summed over processes once per optimizer step (after gradient accumulation)."""

    sharded = False

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def prepare(self, model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        return params

    def start(self, params: list[nn.Parameter]) -> None:
        """Every process starts from rank 0's values."""
        self.ctx.broadcast([p.data for p in params])

    def reduce_grads(self, params: list[nn.Parameter]) -> None:
        self.ctx.all_reduce_grads(params)

    def full_params(self, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in params.items()}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        saved: dict[str, Tensor],
        optimizer: torch.optim.Optimizer,
        optimizer_state: dict,
    ) -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.device, p.dtype))
        optimizer.load_state_dict(optimizer_state)

    def unwrap(self, model: nn.Module, lora: Any) -> tuple[nn.Module, Any]:
        """The plain model (and LoRA handle) to merge and save."""
        return model, lora


class Shards(Replicas):
    """FSDP (``fully_shard``): every decoder layer's parameters, gradients and optimizer state
    are sharded over the processes; full tensors are gathered for checkpoints and the final
    model. For the finetune stage (stage 1 calls attention modules outside their layers)."""

    sharded = True

    def prepare(self, model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        # fully_shard takes no 0-d parameters (the α of each layer): those stay replicated.
        ignored = {p for p in model.parameters() if p.dim() == 0}
        for layer in model.layers:
            fully_shard(layer, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        # Held-out perplexity runs `forward_hidden`: it must gather the shards like `forward`.
        register_fsdp_forward_method(model, "forward_hidden")
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Losses are divided by the global count already: gradients are summed
                # (a plain SUM: gloo has no pre-multiplied sum).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def start(self, params: list[nn.Parameter]) -> None:
        pass  # shards were cut from identical replicas

    def reduce_grads(self, params: list[nn.Parameter]) -> None:
        # FSDP reduce-scattered the sharded gradients during backward; sum the replicated ones.
        self.ctx.all_reduce_grads([p for p in params if not _is_dtensor(p)])

    def full_params(self, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        return {name: _full(p.detach()) for name, p in params.items()}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        # Per-parameter states shaped like their sharded parameter are gathered whole.
        state = optimizer.state_dict()
        state["state"] = {
            index: {key: _full(value) for key, value in entry.items()}
            for index, entry in state["state"].items()
        }
        return state

    def load(self, model, params, saved, optimizer, optimizer_state) -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(_like(saved[name].to(p.dtype), p))
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer_state = dict(optimizer_state)
        optimizer_state["state"] = {
            index: {
                key: _like(value, ordered[index]) if value.shape == ordered[index].shape else value
                for key, value in entry.items()
            }
            for index, entry in optimizer_state["state"].items()
        }
        optimizer.load_state_dict(optimizer_state)

    def unwrap(self, model: nn.Module, lora: Any) -> tuple[nn.Module, Any]:
        from linearize.models.decoder import Decoder
        from linearize.train.finetune import add_lora

        full = {n: _full(p.detach()) for n, p in model.named_parameters(remove_duplicate=False)}
        full.update(dict(model.named_buffers()))
        plain = Decoder(model.config).to(self.ctx.device)
        handle = None
        if lora is not None:
            adapter = lora.peft_config["default"]
            handle = add_lora(plain, adapter.r, adapter.lora_alpha)
        plain.load_state_dict({name: full[name] for name in plain.state_dict()})
        plain.tokenizer = model.tokenizer
        return plain, handle


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded DTensor (a collective); other tensors as they are."""
    return t.full_tensor() if _is_dtensor(t) else t


def _like(full: Tensor, target: Tensor) -> Tensor:
    """``full`` sharded as ``target`` is (when ``target`` is a DTensor)."""
    if not _is_dtensor(target):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(target.device), target.device_mesh, target.placements)


STRATEGIES: dict[str, type[Replicas]] = {"ddp": Replicas, "fsdp": Shards}
