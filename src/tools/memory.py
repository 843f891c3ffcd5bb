"""What a training step needs in GPU memory, estimated without a GPU: the tensors autograd keeps for the backward
pass, counted on the CPU at the real input size under the run's autocast dtype, plus the model's state (weights,
gradients, AdamW's two moments, the EMA). From those, the largest batch that fits a GPU of a given size.

An estimate, not a measurement: a GPU run adds its kernels' workspace, the allocator's fragmentation and the CUDA
context (about a GiB), which the headroom below leaves room for; `bench` on the GPU (peak GPU GiB) measures it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..training.loop import Training

GIB = 2 ** 30
HEADROOM = 0.85  # the share of a GPU's memory the estimate may fill: the rest for workspace, fragmentation, context
GPU_SIZES_GIB = (16, 24, 40, 80)


@dataclass(frozen=True)
class MemoryEstimate:
    state_bytes: int  # weights, gradients, optimiser moments and EMA: independent of the batch
    per_image_bytes: float  # tensors kept for the backward pass, per image

    def training_bytes(self, batch: int) -> float:
        return self.state_bytes + batch * self.per_image_bytes

    def largest_batch(self, gpu_gib: float, multiple: int = 1) -> int:
        """The largest batch (a multiple of `multiple`) whose estimate fits HEADROOM of a GPU of `gpu_gib`."""
        room = gpu_gib * GIB * HEADROOM - self.state_bytes
        return max(0, int(room // self.per_image_bytes) // multiple * multiple)


def saved_bytes(step: Callable[[], None], exclude: set[int]) -> int:
    """Bytes of the distinct tensors autograd saves while `step` runs, those whose storage is in `exclude` (the
    parameters, counted as state) left out. Tensors a checkpointed block drops are not seen."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(size for pointer, size in storages.items() if pointer not in exclude)


def estimate(run: Training, batch: int = 2, dtype: torch.dtype = torch.bfloat16) -> MemoryEstimate:
    """The estimate for the trainer's model and settings (gradient checkpointing, EMA, optimiser) when it computes
    under `dtype` autocast, as a GPU of compute capability 8.0 and up does (`train.amp_dtype: auto`)."""
    model, cfg = run.model, run.cfg
    size = cfg.input.img_size
    images = torch.randn(batch, 3, size, size, device=run.device)
    labels = torch.zeros(batch, dtype=torch.long, device=run.device)
    model.train()

    def step() -> None:
        with torch.autocast(device_type=run.device.type, dtype=dtype):
            loss = run.criterion(model(images), labels)
        loss.backward()

    activations = saved_bytes(step, {p.untyped_storage().data_ptr() for p in model.parameters()})
    model.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 if cfg.optimizer.name in ("adam", "adamw") else 1
    copies = 2 + moments + (1 if cfg.train.ema_decay else 0)  # weights, gradients, moments, EMA
    return MemoryEstimate(copies * weights, activations / batch)


def table(estimated: MemoryEstimate, batch: int, multiple: int = 1) -> list[str]:
    """Markdown rows: the estimate at `batch`, and the largest batch for each GPU size."""
    rows = ["| GPU memory | largest batch that fits (estimate) |", "|---:|---:|"]
    rows += [f"| {size} GB | {estimated.largest_batch(size, multiple)} |" for size in GPU_SIZES_GIB]
    return [f"estimated training memory: {estimated.state_bytes / GIB:.2f} GiB of weights, gradients, optimiser "
            f"moments and EMA, plus {estimated.per_image_bytes / GIB:.3f} GiB an image kept for the backward pass "
            f"(bfloat16 autocast): {estimated.training_bytes(batch) / GIB:.1f} GiB at batch {batch}", "", *rows]
