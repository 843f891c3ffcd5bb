"""DDP helpers for one fold trained by several processes under torchrun: NCCL on GPUs, gloo on the CPU.

Outside torchrun (WORLD_SIZE unset or 1) every helper is a no-op, so the training loop has one code path.
Evaluation shards rows round-robin over the ranks without padding (DistributedSampler would repeat rows to
even the shards out) and gathers them back into the original order, so every id is predicted exactly once.
BatchNorm layers become SyncBatchNorm, so each rank normalises over the whole step's batch, not its share.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the processes on this machine (node)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> DistContext:
    """Join the process group torchrun set up (idempotent); a single process gets the default context."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    rank, world, local, local_world = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "LOCAL_WORLD_SIZE"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    return DistContext(rank, world, local, local_world)


def device_for(ctx: DistContext) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_gather(ctx: DistContext, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (any picklable object)."""
    if not ctx.enabled:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shard(ctx: DistContext, dataset):
    """This rank's rows of an evaluation dataset: rows rank, rank + world, ... (no padding)."""
    return dataset if not ctx.enabled else Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))


def gather_shards(ctx: DistContext, rows: np.ndarray, n_total: int) -> np.ndarray:
    """Reassemble the per-rank results of `shard` into the dataset's order."""
    if not ctx.enabled:
        return rows
    parts = all_gather(ctx, rows)
    full = np.empty((n_total, *rows.shape[1:]), dtype=rows.dtype)
    for rank, part in enumerate(parts):
        full[rank::ctx.world_size] = part
    return full


def sync_buffers(ctx: DistContext, model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart in the last training step),
    so the ranks evaluate exactly the model that rank 0 saves."""
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients of that sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for the CPU (gloo). torch's SyncBatchNorm computes its statistics with CUDA kernels only, and
    DDP refuses it on CPU modules, so on the CPU each BatchNorm layer becomes this one instead.

    In training under an initialised process group, the per-channel sum, sum of squares and count of every rank's
    batch are added up with a differentiable all-reduce, so the output, the gradients and the running statistics
    are those of one BatchNorm over the whole step's batch. Otherwise it is a plain BatchNorm. Like timm's
    SyncBatchNormAct, it applies the `drop` and `act` it took over from timm's BatchNormAct2d."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group if hasattr(self, "process_group") else None
        if self.training and dist.is_initialized() and dist.get_world_size(group) > 1:
            out = self._synced(input, group)
        else:
            out = super().forward(input)
        for name in ("drop", "act"):
            if hasattr(self, name):
                out = getattr(self, name)(out)
        return out

    def _synced(self, input: torch.Tensor, group) -> torch.Tensor:
        channels, dims = input.shape[1], [0, *range(2, input.dim())]
        shape = (1, channels) + (1,) * (input.dim() - 2)
        x = input.float()
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / channels)])
        total = _AllReduceSum.apply(local, group)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1), momentum)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def _gloo_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm layer replaced by GlooSyncBatchNorm sharing its parameters and buffers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        for name in ("drop", "act"):
            if hasattr(module, name):
                setattr(synced, name, getattr(module, name))
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _gloo_sync_batchnorm(child))
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer (timm's BatchNormAct2d included) synchronised over the ranks: torch's SyncBatchNorm
    through timm's converter on GPUs, GlooSyncBatchNorm on the CPU."""
    if device.type == "cpu":
        return _gloo_sync_batchnorm(model)
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(model)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
