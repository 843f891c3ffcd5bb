"""The training loop, written once: what a fold trains with (built from the config) and one epoch of optimiser steps.
Every technique is an option of the config: the head, sampler, optimiser (SAM too), schedule, EMA, mixed precision,
gradient clipping, gradient accumulation, SyncBatchNorm and DDP; what a batch's loss is (the loss, CutMix, soft
targets, pseudo-labels, distillation) is the objective's (src/training/objective.py)."""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch import nn

from ..core.distributed import SINGLE_PROCESS, DistContext
from ..core.errors import UserError
from ..core.progress import StepProgress
from ..core.runtime import autocast, autocast_dtype, synchronize, worker_count
from ..core.schema import ExperimentConfig
from ..data.device_input import DeviceBatches, InputStage, training_inputs
from ..data.image_cache import ImageCache
from ..data.loader import make_loader, training_dataset
from ..data.sampler import build_sampler
from ..data.training_set import TrainingSet
from ..data.transforms import build_crop_train_transform
from ..model.networks import build_model, normalisation
from ..model.prepare import is_compiled, prepare_model, uses_channels_last
from .ema import build_ema
from .objective import Objective, build_objective
from .optim import SAM, build_optimizer, parameter_groups
from .schedules import base_lr, build_scheduler
from .sync_batchnorm import convert_sync_batchnorm
from .techniques import loss_terms

# The training loop looks at its losses on the host (finite? running mean for the progress bar) once every this
# many steps, not every step: reading a loss waits for the GPU to finish all queued work.
CHECK_EVERY = 50


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_seconds: float  # of which the loop waited for the DataLoader
    parts: dict[str, float] = field(default_factory=dict)  # the objective's logged parts of the loss, epoch means

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def capture_rng() -> dict:
    """The process's global random streams (dropout, CutMix), as plain values loadable with weights_only=True.
    The data order and the augmentations need none: they follow from the seed and the epoch (EpochSampler)."""
    legacy = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {**legacy, "state": {"key": legacy["state"]["key"].tolist(), "pos": legacy["state"]["pos"]}}}


def restore_rng(state: dict, log: Callable[[str], None] = print) -> None:
    """The streams of capture_rng. CUDA's are restored for the GPUs this process sees: a run saved on a machine
    that saw more (a plain run on a 4-GPU box, resumed by --gpus children that see one each) restores the first
    ones, including the one it trains on, and says which were left out."""
    torch.set_rng_state(state["torch"])
    saved = state["cuda"]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(cuda_state, index)
    if len(saved) > visible:
        log(f"last.pt holds the CUDA random streams of {len(saved)} GPUs and this process sees {visible}: restored "
            f"{visible}, not those of GPUs {visible} to {len(saved) - 1}, which this process does not train on")
    random.setstate(state["python"])
    legacy = state["numpy"]
    np.random.set_state({**legacy, "state": {"key": np.asarray(legacy["state"]["key"], dtype=np.uint32),
                                             "pos": legacy["state"]["pos"]}})


def train_loader_for(dataset, labels: np.ndarray, cfg: ExperimentConfig, device: torch.device,
                     workers: int, ctx: DistContext, seed: int, shared_seed: int):
    """The training loader: one batch an optimiser step. Under DDP each rank takes batch_size / world_size images a
    step, so a step still sees train.batch_size images and the schedule is the same; DistributedSampler shuffles
    (set_epoch, with a seed all ranks share) unless a class-balancing sampler draws each rank's share (with the
    rank's own seed)."""
    if cfg.train.batch_size % ctx.world_size:
        raise UserError(f"train.batch_size {cfg.train.batch_size} does not split over {ctx.world_size} processes; "
                        f"choose a multiple of {ctx.world_size}")
    batch_size = cfg.train.batch_size // ctx.world_size
    steps = cfg.train.accumulate_steps
    if batch_size % steps:
        per = f" on each of the {ctx.world_size} processes" if ctx.enabled else ""
        raise UserError(f"train.accumulate_steps {steps} splits a batch of {batch_size}{per} into micro-batches of "
                        f"unequal size; choose train.batch_size as a multiple of {steps * ctx.world_size}")
    if cfg.train.cutmix_prob and batch_size % 2:
        raise UserError(f"train.cutmix_prob needs an even batch on each of the {ctx.world_size} processes, "
                        f"got {batch_size}; choose train.batch_size as a multiple of {2 * ctx.world_size}")
    sampler = build_sampler(labels, cfg.train.sampler, seed, shards=ctx.world_size)
    if sampler is None and ctx.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=shared_seed)
    return make_loader(dataset, batch_size, workers, device, train=True, seed=seed, sampler=sampler,
                       pin_memory=cfg.speed.pin_memory, persistent_workers=cfg.speed.persistent_workers)


@dataclass
class Training:
    """Everything a fold trains with, built from the resolved config; `bench` times the same objects."""
    cfg: ExperimentConfig
    device: torch.device
    model: nn.Module  # the parameters that get saved
    train_model: nn.Module  # model, DDP-wrapped and/or compiled
    eval_model: nn.Module
    mean: tuple
    std: tuple
    workers: int
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    objective: Objective
    ema: ModelEmaV3 | None = None
    ema_eval_model: nn.Module | None = None
    inputs: InputStage | None = None  # what the device does to a batch before the model reads it
    compile_seconds: float | None = None  # the first step of a compiled model, compilation included

    @property
    def predicting_model(self) -> nn.Module:
        """The model that validates and predicts: the EMA of the weights when train.ema_decay or ema_epochs is set."""
        return self.ema_eval_model if self.ema is not None else self.eval_model

    def predicting_state(self) -> dict:
        return (self.ema.module if self.ema is not None else self.model).state_dict()

    def restore_scaler(self, state: dict, log: Callable[[str], None], name: str) -> None:
        """A saved scaler state, when this run scales (float16) and one was saved; a run saved in another precision
        (bfloat16, float32: no state) starts with a fresh scaler."""
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)
        elif self.scaler.is_enabled():
            log(f"{name}: the checkpoint was saved without float16 gradient scaling; the scaler starts afresh")


def sync_for(model: nn.Module, cfg: ExperimentConfig, ctx: DistContext) -> nn.Module:
    """Under DDP (train.sync_batchnorm on), BatchNorm normalises over the whole step's batch, not the rank's share
    of batch_size / world_size images."""
    if ctx.enabled and cfg.train.sync_batchnorm:
        return convert_sync_batchnorm(model, next(model.parameters()).device)
    return model


def build_training(cfg: ExperimentConfig, rows: pd.DataFrame | TrainingSet, n_classes: int, device: torch.device,
                   ctx: DistContext = SINGLE_PROCESS, image_cache: ImageCache | None = None, seed: int = 0,
                   shared_seed: int = 0) -> Training:
    """Model (SyncBatchNorm under DDP), training loader over `rows` (paintings: path, label; or a TrainingSet with
    the crops and targets techniques added), optimiser, schedule, gradient scaler (float16 only) and the objective
    (loss, CutMix, the techniques' terms), as the config says."""
    model = sync_for(build_model(cfg.model, n_classes, cfg.input.img_size).to(device), cfg, ctx)
    if cfg.speed.grad_checkpointing:
        enable_grad_checkpointing(model.backbone, cfg.model.backbone)
    mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
    workers = worker_count(cfg.train.num_workers, device, processes=ctx.local_world_size)
    training_set = rows if isinstance(rows, TrainingSet) else TrainingSet(rows, n_classes)
    paintings = training_dataset(cfg, training_set.paintings["path"], training_set.paintings["label"], image_cache,
                                 seed)
    dataset = training_set.dataset(paintings, build_crop_train_transform(cfg, seed=seed), cache=image_cache)
    loader = train_loader_for(dataset, training_set.labels, cfg, device, workers, ctx, seed, shared_seed)
    optimizer = build_optimizer(cfg.optimizer, parameter_groups(model, cfg.optimizer), device)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=len(loader), epochs=cfg.train.epochs)
    use_scaler = autocast_dtype(cfg.train.amp, cfg.train.amp_dtype, device) == torch.float16
    if use_scaler and isinstance(optimizer, SAM):
        raise UserError("optimizer.sam_rho does not combine with float16 AMP (its gradient scaler); "
                        "set train.amp_dtype=bfloat16 or train.amp=false")
    ema = build_ema(model, cfg.train, steps_per_epoch=len(loader))
    train_model, eval_model = prepare_model(model, cfg, device, ctx)
    return Training(cfg, device, model, train_model, eval_model, mean, std, workers, loader, optimizer, scheduler,
                    torch.amp.GradScaler(device.type, enabled=use_scaler),
                    build_objective(cfg, n_classes, loss_terms(cfg)), ema,
                    prepare_model(ema.module, cfg, device, SINGLE_PROCESS)[1] if ema is not None else None,
                    training_inputs(cfg, mean, std, seed, uses_channels_last(cfg, device)))


def enable_grad_checkpointing(backbone: nn.Module, name: str) -> None:
    """timm's set_grad_checkpointing: the blocks' activations are recomputed in the backward pass."""
    try:
        backbone.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError, AttributeError):
        raise UserError(f"speed.grad_checkpointing: timm's {name} does not support gradient checkpointing; set "
                        "speed.grad_checkpointing=false") from None


def _check_finite(losses: list[torch.Tensor], lrs: list[float], first: int, desc: str, epoch: int) -> None:
    """Stop on the first step from `first` on whose loss is not finite (one wait for the device for all)."""
    recent = torch.stack(losses[first:])
    bad = torch.nonzero(~torch.isfinite(recent))
    if len(bad):
        step = first + int(bad[0, 0])
        raise UserError(f"{desc}: loss became {float(recent[step - first])} at epoch {epoch} step {step} "
                        f"(lr {lrs[step]:.2e}); lower optimizer.lr or check the data")


def micro_batch_sizes(images: int, steps: int) -> list[int]:
    """The sizes of the micro-batches a step's `images` are split into (train.accumulate_steps; as equal as can be)."""
    parts = min(steps, images)
    return [images // parts + (part < images % parts) for part in range(parts)]


def train_step(run: Training, images: torch.Tensor, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on a batch already on the device (two forward-backward passes under SAM), then the
    schedule's step and the EMA's. `targets` are the loader's (class indices, or the dict of a TrainingSet's targets).

    Gradient accumulation (train.accumulate_steps k): after CutMix, which mixes the whole batch as without it, the
    batch goes forward and backward in k micro-batches, each micro-batch's mean loss scaled by its share of the batch,
    so the summed gradients are those of the batch's mean loss; BatchNorm normalises each micro-batch on its own.
    Under DDP the gradients are averaged over the processes once, with the last micro-batch. Returns the batch's loss
    and its logged parts, left on the device."""
    cfg, optimizer, objective = run.cfg, run.optimizer, run.objective
    images, targets = objective.mix(images, objective.targets(targets, run.device))
    sizes = micro_batch_sizes(len(images), cfg.train.accumulate_steps)
    chunks = list(zip(images.split(sizes), targets.split(sizes) if len(sizes) > 1 else [targets]))

    def forward_backward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        optimizer.zero_grad(set_to_none=True)
        done = []  # (share of the batch, loss, parts) of each micro-batch
        for index, (chunk, chunk_targets) in enumerate(chunks):
            share = len(chunk) / len(images)
            syncing = index == len(chunks) - 1 or not hasattr(run.train_model, "no_sync")
            with contextlib.nullcontext() if syncing else run.train_model.no_sync():
                with autocast(run.device, cfg.train.amp, cfg.train.amp_dtype):
                    loss, loss_parts = objective.loss(run.train_model(chunk), chunk_targets)
                run.scaler.scale(loss if len(chunks) == 1 else loss * share).backward()
            done.append((share, loss.detach(), loss_parts))
        if cfg.train.grad_clip_norm:
            run.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip_norm)
        if len(done) == 1:
            return done[0][1], done[0][2]
        return (sum(share * loss for share, loss, _ in done),
                {name: sum(share * parts[name] for share, _, parts in done) for name in done[0][2]})

    if isinstance(optimizer, SAM):
        loss, parts = optimizer.step(forward_backward, run.model)
    else:
        loss, parts = forward_backward()
        run.scaler.step(optimizer)
        run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model, step=run.scheduler.last_epoch)
    return loss, parts


def train_one_epoch(run: Training, epoch: int, desc: str) -> EpochStats:
    """One pass over the training loader. Losses stay on the device; they are checked (finite?) every CHECK_EVERY
    steps and at the end, so the host never waits for the GPU within those steps. The first step of a compiled
    model is timed (run.compile_seconds): it compiles."""
    device = run.device
    sampler = getattr(run.loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    run.inputs.set_epoch(epoch)
    run.train_model.train()
    losses, parts, sizes, lrs, checked = [], [], [], [], 0
    started = time.perf_counter()
    batches = DeviceBatches(run.loader, device, run.inputs)
    progress = StepProgress(len(batches), desc, run.cfg.tracking.progress_seconds)
    compiled = is_compiled(run.train_model)
    for images, targets in batches:
        timing = run.compile_seconds is None and compiled
        step_started = time.perf_counter()
        lrs.append(base_lr(run.optimizer))
        loss, step_parts = train_step(run, images, targets)
        losses.append(loss)
        parts.append(step_parts)
        sizes.append(len(images))
        if timing:
            synchronize(device)
            run.compile_seconds = time.perf_counter() - step_started
        progress.update(len(images), batches.waited)
        if len(losses) - checked >= CHECK_EVERY:
            _check_finite(losses, lrs, checked, desc, epoch)
            checked = len(losses)
            progress.note(loss=f"{float(losses[-1]):.4f}", lr=f"{lrs[-1]:.2e}")
    progress.close()
    if not losses:
        return EpochStats(0.0, 0, time.perf_counter() - started, batches.waited)
    if checked < len(losses):
        _check_finite(losses, lrs, checked, desc, epoch)
    weights = torch.tensor(sizes, dtype=torch.float32, device=device)

    def mean(values: list[torch.Tensor]) -> float:
        return float((torch.stack(values).float() * weights).sum() / weights.sum())

    mean_loss, mean_parts = mean(losses), {name: mean([step[name] for step in parts]) for name in parts[0]}
    synchronize(device)
    return EpochStats(mean_loss, int(sum(sizes)), time.perf_counter() - started, batches.waited, mean_parts)
