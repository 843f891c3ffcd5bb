"""Batches on the device, ready for the model. DataLoader workers hand over uint8 images (a quarter of float32's
bytes through shared memory and the copy to the GPU); the device converts and normalises them, augments them under
speed.gpu_augment, and lays them out channels_last. On CUDA the next batch is copied and prepared on a side stream
while the current one trains, as timm's prefetcher does.

Without device augmentation the normalisation is exactly albumentations' Normalize on the CPU (a lookup table that
transform made from every uint8 value), so moving it changes no bit of a result. The device augmentation draws its
parameters from (seed, epoch, batch), like the workers' augmentation (src/data/sampler.py), so a resumed epoch
repeats it, whatever the workers.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.schema import AugmentConfig, ExperimentConfig
from .training_set import PAINTING

DEVICE_STREAM = 2  # the seed stream of the device augmentation (EpochSampler's streams are 0 and 1)


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The device augmentation's seed for batch `batch` of epoch `epoch`."""
    return int(np.random.SeedSequence([seed, epoch, DEVICE_STREAM, batch]).generate_state(1)[0])


class InputStage:
    """What the device does to a uint8 batch (N x 3 x H x W) before the model reads it."""

    def __init__(self, mean, std, augment: Optional[nn.Module] = None, seed: int = 0, channels_last: bool = False):
        ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(256, 1, 1), 3, axis=2)
        table = A.Normalize(mean=mean, std=std, strict=True)(image=ramp)["image"][:, 0, :]  # value x channel
        self.table = torch.from_numpy(np.ascontiguousarray(table.T)).reshape(-1)  # channel-major, 3 x 256
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32).view(1, 3, 1, 1)  # each channel's table
        self.augment, self.seed, self.channels_last = augment, seed, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 to what albumentations' Normalize gives, through its own table (an embedding lookup: int32 indices
        on every device)."""
        self.table, self.offsets = self.table.to(images.device), self.offsets.to(images.device)
        return F.embedding(images.to(torch.int32) + self.offsets, self.table.view(-1, 1)).squeeze(-1)

    def augmented(self, images: torch.Tensor, batch: int) -> torch.Tensor:
        """uint8 to [0, 1], the device augmentation with this batch's seed, then (x - mean) / std."""
        # kornia (0.9.0) draws every parameter on its modules' rng device, the CPU unless a module is moved (this one
        # never is), so only the CPU generator is seeded: torch.manual_seed would also reseed every CUDA generator,
        # which fork_rng(devices=[]) does not restore, and dropout / drop_path draw from that one.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(batch_seed(self.seed, self.epoch, batch))
            images = self.augment(images.float().div_(255))
        self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.sub_(self.mean).div_(self.std)

    def __call__(self, images: torch.Tensor, batch: int, augmented_rows: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """The batch normalised; under a device augmentation augmented first, only `augmented_rows` (a boolean mask,
        best on the CPU: the host then never waits for the device) when given: a pseudo-labelled test crop keeps the
        crop's light augmentation."""
        if self.augment is None:
            images = self.normalise(images)
        elif augmented_rows is None:
            images = self.augmented(images, batch)
        else:
            images = self.augmented_where(images, batch, augmented_rows.cpu())
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def augmented_where(self, images: torch.Tensor, batch: int, augmented_rows: torch.Tensor) -> torch.Tensor:
        """The rows of the CPU mask `augmented_rows` augmented, the others normalised, each row as the whole batch
        would give it. The rows are counted on the CPU and their indices copied to the device without waiting."""
        rows, others = (torch.nonzero(mask).squeeze(1) for mask in (augmented_rows, ~augmented_rows))
        if not len(rows):
            return self.normalise(images)
        prepared = torch.empty(images.shape, dtype=self.table.dtype, device=images.device)
        for chosen, prepare in ((rows, lambda part: self.augmented(part, batch)), (others, self.normalise)):
            if len(chosen):
                chosen = chosen.to(images.device, non_blocking=True)
                prepared.index_copy_(0, chosen, prepare(images.index_select(0, chosen)))
        return prepared


class DeviceBatches:
    """(images, targets) of a loader on `device`, images through `stage`; targets are class indices or a dict of
    per-row targets (src/data/training_set.py), whose PAINTING mark tells the stage which rows to augment. `waited`
    is the time the last pass spent blocked on the loader, the input pipeline's share of the work."""

    def __init__(self, loader, device: torch.device, stage: InputStage):
        self.loader, self.device, self.stage = loader, device, stage
        self.waited = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, batch, index: int) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        images, targets = batch
        images = images.to(self.device, non_blocking=True)
        if isinstance(targets, dict):
            painting = targets.get(PAINTING)  # stays on the CPU: the stage counts its rows there
            targets = {key: value.to(self.device, non_blocking=True) for key, value in targets.items()
                       if key != PAINTING}
            return self.stage(images, index, painting), targets
        return self.stage(images, index), targets.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.waited = 0.0
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches, pending, index = iter(self.loader), None, 0
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.waited += time.perf_counter() - started
            if batch is None:
                break
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                ready = self._prepare(batch, index)
            if pending is not None:
                yield pending
            if side is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(side)
                images, targets = ready
                for tensor in [images, *(targets.values() if isinstance(targets, dict) else [targets])]:
                    tensor.record_stream(current)
            pending, index = ready, index + 1
        if pending is not None:
            yield pending


def has_device_share(augment: AugmentConfig) -> bool:
    """Whether `augment` has pixel augmentations speed.gpu_augment runs on the device (augment.strong's after its
    flips, augment.extra_colour's: src/data/device_augment.py)."""
    return augment.strong or augment.extra_colour


def training_inputs(cfg: ExperimentConfig, mean, std, seed: int, channels_last: bool) -> InputStage:
    """The training batches' stage: normalisation, and the pixel augmentations under speed.gpu_augment (kornia,
    imported only then)."""
    augment = None
    if cfg.speed.gpu_augment and has_device_share(cfg.augment):
        from .device_augment import device_augmentations

        augment = device_augmentations(cfg.augment)
    return InputStage(mean, std, augment, seed, channels_last)
