"""The process group of one fold trained by several processes under torchrun: NCCL on GPUs, gloo on the CPU.

Outside torchrun (WORLD_SIZE unset or 1) every helper is a no-op, so the training loop has one code path.
Evaluation shards rows round-robin over the ranks without padding (DistributedSampler would repeat rows to
even the shards out) and gathers them back into the original order, so every id is predicted exactly once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
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


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
