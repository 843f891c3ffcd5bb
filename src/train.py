"""The training loop, written once: one fold per call. Every technique is an option of the config.

A fold trains on the other folds' images, validates every epoch on its own fold (macro F1), keeps the
best epoch's weights and validation probabilities (its share of the OOF), stops early after `patience`
epochs without improvement, and finally predicts the test set with the best weights.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from .config import ExperimentConfig
from .data import CompetitionData, style_images_for_fold
from .distributed import (
    SINGLE_PROCESS,
    DistContext,
    all_gather,
    barrier,
    convert_sync_batchnorm,
    gather_shards,
    shard,
    sync_buffers,
)
from .errors import UserError
from .geometry import validation_set
from .image_cache import ImageCache
from .inference import predict_probs, probs_frame
from .io_utils import save_torch, write_csv, write_json
from .loader import ImageDataset, make_loader
from .losses import build_loss
from .metrics import painting_scores, scores
from .models import build_model, load_checkpoint, load_weights, normalisation, read_checkpoint
from .optim import SAM, build_optimizer, build_scheduler, early_stop_note, schedule_note
from .runtime import autocast, autocast_dtype, seed_everything, synchronize, to_device, worker_count
from .sampler import build_sampler
from .tracking import NO_TRACKING, Tracker
from .transforms import build_eval_transform, build_train_transform

DONE_FILE = "done.json"
# The training loop looks at its losses on the host (finite? running mean for the progress bar) once every this
# many steps, not every step: reading a loss waits for the GPU to finish all queued work.
CHECK_EVERY = 50


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_macro_f1: float
    epochs_run: int


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_seconds: float  # of which the loop waited for the DataLoader

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def build_cutmix(cfg: ExperimentConfig, n_classes: int):
    """timm's CutMix on whole batches with probability cutmix_prob; correct_lam makes the target weights
    equal the pasted area after clipping at the border."""
    if not cfg.train.cutmix_prob:
        return None
    if cfg.train.batch_size % 2:
        raise UserError(f"train.cutmix_prob needs an even train.batch_size, got {cfg.train.batch_size}")
    from timm.data import Mixup

    return Mixup(mixup_alpha=0.0, cutmix_alpha=cfg.train.cutmix_alpha, prob=cfg.train.cutmix_prob,
                 switch_prob=0.0, mode="batch", correct_lam=True, label_smoothing=0.0, num_classes=n_classes)


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


def uses_channels_last(cfg: ExperimentConfig, device: torch.device) -> bool:
    return cfg.speed.channels_last and device.type == "cuda"


def prepare_model(model: nn.Module, cfg: ExperimentConfig, device: torch.device,
                  ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """The model to train (DDP-wrapped under torchrun, compiled when asked) and the one to evaluate (neither:
    each rank predicts its own shard). Both share `model`'s parameters, whose state_dict is what gets saved."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.speed.cudnn_benchmark
    if uses_channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    train_model = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiles(cfg, device):
        return torch.compile(train_model), torch.compile(model)
    return train_model, model


def compiles(cfg: ExperimentConfig, device: torch.device) -> bool:
    """speed.compile applies on CUDA (on the CPU, compiling costs more than a demo run saves)."""
    return cfg.speed.compile and device.type == "cuda"


def train_loader_for(dataset: ImageDataset, labels: np.ndarray, cfg: ExperimentConfig, device: torch.device,
                     workers: int, ctx: DistContext, seed: int, shared_seed: int):
    """The training loader. Under DDP each rank takes batch_size / world_size images a step, so a step still
    sees train.batch_size images and the schedule is the same; DistributedSampler shuffles (set_epoch, with a
    seed all ranks share) unless a class-balancing sampler draws each rank's share (with the rank's own seed)."""
    if cfg.train.batch_size % ctx.world_size:
        raise UserError(f"train.batch_size {cfg.train.batch_size} does not split over {ctx.world_size} processes; "
                        f"choose a multiple of {ctx.world_size}")
    batch_size = cfg.train.batch_size // ctx.world_size
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
    criterion: nn.Module
    cutmix: object
    ema: ModelEmaV3 | None = None
    ema_eval_model: nn.Module | None = None

    @property
    def predictor(self) -> nn.Module:
        """The model that validates and predicts: the EMA of the weights when train.ema_decay is set."""
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


def build_training(cfg: ExperimentConfig, rows: pd.DataFrame, n_classes: int, device: torch.device,
                   ctx: DistContext = SINGLE_PROCESS, image_cache: ImageCache | None = None, seed: int = 0,
                   shared_seed: int = 0) -> Training:
    """Model (SyncBatchNorm under DDP), training loader over `rows` (path, label), optimiser, schedule, gradient
    scaler (float16 only), loss and CutMix, as the config says."""
    model = sync_for(build_model(cfg.model, n_classes).to(device), cfg, ctx)
    mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
    workers = worker_count(cfg.train.num_workers, device, processes=ctx.local_world_size)
    dataset = ImageDataset(rows["path"], rows["label"], build_train_transform(cfg, mean, std, seed=seed),
                           cache=image_cache)
    loader = train_loader_for(dataset, rows["label"].to_numpy(), cfg, device, workers, ctx, seed, shared_seed)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), device)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=len(loader), epochs=cfg.train.epochs)
    use_scaler = autocast_dtype(cfg.train.amp, cfg.train.amp_dtype, device) == torch.float16
    if use_scaler and isinstance(optimizer, SAM):
        raise UserError("optimizer.sam_rho does not combine with float16 AMP (its gradient scaler); "
                        "set train.amp_dtype=bfloat16 or train.amp=false")
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema_decay else None
    train_model, eval_model = prepare_model(model, cfg, device, ctx)
    return Training(cfg, device, model, train_model, eval_model, mean, std, workers, loader, optimizer, scheduler,
                    torch.amp.GradScaler(device.type, enabled=use_scaler), build_loss(cfg.loss),
                    build_cutmix(cfg, n_classes), ema,
                    prepare_model(ema.module, cfg, device, SINGLE_PROCESS)[1] if ema is not None else None)


def _check_finite(losses: list[torch.Tensor], lrs: list[float], first: int, desc: str, epoch: int) -> None:
    """Stop on the first step from `first` on whose loss is not finite (one wait for the device for all)."""
    recent = torch.stack(losses[first:])
    bad = torch.nonzero(~torch.isfinite(recent))
    if len(bad):
        step = first + int(bad[0, 0])
        raise UserError(f"{desc}: loss became {float(recent[step - first])} at epoch {epoch} step {step} "
                        f"(lr {lrs[step]:.2e}); lower optimizer.lr or check the data")


def train_step(run: Training, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimiser step on a batch already on the device (two forward-backward passes under SAM), then the
    schedule's step. Returns the loss, left on the device."""
    cfg, optimizer = run.cfg, run.optimizer
    if run.cutmix is not None:
        images, targets = run.cutmix(images, targets)

    def forward_backward() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(run.device, cfg.train.amp, cfg.train.amp_dtype):
            loss = run.criterion(run.train_model(images), targets)
        run.scaler.scale(loss).backward()
        if cfg.train.grad_clip_norm:
            run.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip_norm)
        return loss

    if isinstance(optimizer, SAM):
        loss = optimizer.step(forward_backward, run.model)
    else:
        loss = forward_backward()
        run.scaler.step(optimizer)
        run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model, step=run.scheduler.last_epoch)
    return loss.detach()


def train_one_epoch(run: Training, epoch: int, desc: str) -> EpochStats:
    """One pass over the training loader. Losses stay on the device; they are checked (finite?) every CHECK_EVERY
    steps and at the end, so the host never waits for the GPU within those steps."""
    device = run.device
    sampler = getattr(run.loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    run.train_model.train()
    channels_last = uses_channels_last(run.cfg, device)
    losses, sizes, lrs, checked = [], [], [], 0
    started, waited = time.perf_counter(), 0.0
    bar = tqdm(total=len(run.loader), desc=desc, leave=False, disable=not sys.stderr.isatty())
    batches = iter(run.loader)
    while True:
        fetch = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - fetch
        if batch is None:
            break
        images, labels = batch
        lrs.append(run.optimizer.param_groups[0]["lr"])
        losses.append(train_step(run, to_device(images, device, channels_last), labels.to(device, non_blocking=True)))
        sizes.append(len(images))
        bar.update()
        if len(losses) - checked >= CHECK_EVERY:
            _check_finite(losses, lrs, checked, desc, epoch)
            checked = len(losses)
            bar.set_postfix(loss=f"{float(losses[-1]):.4f}", lr=f"{lrs[-1]:.2e}")
    bar.close()
    if not losses:
        return EpochStats(0.0, 0, time.perf_counter() - started, waited)
    if checked < len(losses):
        _check_finite(losses, lrs, checked, desc, epoch)
    weights = torch.tensor(sizes, dtype=torch.float32, device=device)
    mean_loss = float((torch.stack(losses).float() * weights).sum() / weights.sum())
    synchronize(device)
    return EpochStats(mean_loss, int(sum(sizes)), time.perf_counter() - started, waited)


def eval_loader(dataset: ImageDataset, cfg: ExperimentConfig, device: torch.device, workers: int,
                ctx: DistContext):
    """A loader over this rank's shard of an evaluation dataset (all of it without DDP)."""
    return make_loader(shard(ctx, dataset), cfg.inference.batch_size, workers, device, train=False,
                       pin_memory=cfg.speed.pin_memory, persistent_workers=cfg.speed.persistent_workers)


def evaluate(model: nn.Module, loader, cfg: ExperimentConfig, device: torch.device, ctx: DistContext,
             criterion=None, desc: str = "predict") -> tuple[np.ndarray, float | None]:
    """Probabilities for every row of the loader's full dataset in order, gathered from the ranks' shards."""
    sync_buffers(ctx, model)
    probs, loss = predict_probs(model, loader, device, cfg.train.amp, cfg.train.amp_dtype, criterion=criterion,
                                desc=desc, channels_last=uses_channels_last(cfg, device))
    if criterion is not None:
        totals = all_gather(ctx, (loss * len(probs), len(probs)))
        loss = sum(total for total, _ in totals) / sum(count for _, count in totals)
    return gather_shards(ctx, probs, sum(all_gather(ctx, len(probs)))), loss


def train_fold(cfg: ExperimentConfig, data: CompetitionData, folds: pd.DataFrame, fold: int, fold_dir: Path,
               device: torch.device, fingerprint: str, log: Callable[[str], None] = print,
               image_cache: ImageCache | None = None, ctx: DistContext = SINGLE_PROCESS,
               tracker: Tracker = NO_TRACKING, on_epoch: Callable[[int, dict], None] | None = None) -> FoldResult:
    """Train one fold and write best.pt, last.pt, history.csv, val_probs.csv, test_probs.csv, done.json.

    After each epoch's files are written, `tracker` (rank 0) gets the epoch's history row, then `on_epoch(fold,
    row)` runs on every rank; it may raise to end the fold there (a tuning trial's pruning), leaving last.pt.

    A last.pt saved with the same config and data resumes the fold after its epoch, with model, optimiser,
    scheduler, scaler, history and every random stream restored, so it ends exactly where an uninterrupted run
    does, with any number of DataLoader workers. Under DDP (ctx.enabled) every rank trains and evaluates its
    share and only rank 0 writes.
    """
    seed_everything(cfg.seed + fold)
    is_val = (folds["fold"] == fold).to_numpy()
    train_rows, val_rows = data.train[~is_val], data.train[is_val]
    if data.style is not None:
        train_rows = pd.concat([train_rows, style_images_for_fold(data.style, set(val_rows["id"]))])

    stream_seed = cfg.seed + fold + 10_000 * ctx.rank
    if ctx.enabled:
        seed_everything(stream_seed)
    run = build_training(cfg, train_rows, len(data.classes), device, ctx, image_cache, seed=stream_seed,
                         shared_seed=cfg.seed + fold)
    validation = validation_set(cfg, val_rows)
    val_loader = eval_loader(ImageDataset(validation.paths, validation.labels,
                                          build_eval_transform(cfg, run.mean, run.std, test=validation.are_crops),
                                          cache=image_cache, boxes=validation.boxes), cfg, device, run.workers, ctx)

    history, best_f1, best_epoch, best_val_probs, first_epoch = [], -1.0, 0, None, 1
    name = f"{cfg.name} fold {fold}"
    last_path = fold_dir / "last.pt"
    if last_path.is_file():
        state = read_checkpoint(last_path)
        rng_per_rank = state["rng"] if isinstance(state.get("rng"), list) else [state.get("rng")]  # before DDP
        if state.get("fingerprint") == fingerprint and len(rng_per_rank) != ctx.world_size:
            raise UserError(f"{last_path} was saved by {len(rng_per_rank)} training processes, this run has "
                            f"{ctx.world_size}; rerun with the same --ddp, or with --restart to start over")
        if state.get("fingerprint") == fingerprint:
            load_weights(run.model, state["model"])
            if run.ema is not None:
                load_weights(run.ema.module, state["ema"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
            run.restore_scaler(state["scaler"], log, name)
            restore_rng(rng_per_rank[ctx.rank], lambda line: log(f"{name}: {line}"))
            history, best_f1, best_epoch = state["history"], state["best_macro_f1"], state["best_epoch"]
            best_val_probs = state["best_val_probs"].numpy()
            first_epoch = cfg.train.epochs + 1 if state["finished"] else state["epoch"] + 1
            log(f"{name}: resuming after epoch {state['epoch']} from {last_path}")
    synced = ", SyncBatchNorm" if ctx.enabled and cfg.train.sync_batchnorm else ""
    processes = f" x {ctx.world_size} processes (DDP{synced})" if ctx.enabled else ""
    log(f"{name}: {len(train_rows)} train / {len(val_rows)} val images, {cfg.model.backbone} "
        f"at {cfg.input.img_size}px on {device.type}{processes}, {run.workers} loader workers; validating on "
        f"{validation.describe()}{', EMA of the weights' if run.ema is not None else ''}")
    notes = (schedule_note(cfg.scheduler, cfg.optimizer.lr, len(run.loader), cfg.train.epochs),
             early_stop_note(cfg.scheduler, cfg.train.epochs, cfg.train.patience))
    for note in filter(None, notes if first_epoch == 1 else ()):
        log(f"{name}: {note}")
    for epoch in range(first_epoch, cfg.train.epochs + 1):
        started = time.time()
        lr = run.optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(run, epoch, desc=f"{name} epoch {epoch}")
        train_loss = float(np.mean(all_gather(ctx, stats.loss)))
        val_probs, val_loss = evaluate(run.predictor, val_loader, cfg, device, ctx, run.criterion,
                                       desc=f"{name} validate")
        val = scores(validation.labels, val_probs)
        record = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": val_loss,
                  "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
                  "val_macro_f1_paintings": painting_scores(validation.ids, validation.labels, val_probs)["macro_f1"]}
        if run.ema is not None:
            raw_probs, _ = evaluate(run.eval_model, val_loader, cfg, device, ctx, desc=f"{name} validate raw")
            record["val_macro_f1_raw"] = scores(validation.labels, raw_probs)["macro_f1"]
        improved = val["macro_f1"] > best_f1
        if improved:
            best_f1, best_epoch, best_val_probs = val["macro_f1"], epoch, val_probs
            if ctx.is_main:
                raw = {"raw_model": run.model.state_dict()} if run.ema is not None and cfg.train.keep_checkpoints \
                    else {}
                save_torch({"model": run.predicting_state(), **raw, "epoch": epoch, "val_macro_f1": best_f1,
                            "classes": data.classes, "backbone": cfg.model.backbone}, fold_dir / "best.pt")
        history.append({**record, "seconds": round(time.time() - started, 1),
                        "train_images_per_s": round(stats.images_per_s * ctx.world_size, 1),
                        "data_wait_share": round(stats.data_seconds / stats.seconds, 3) if stats.seconds else 0.0})
        stop = bool(cfg.train.patience) and epoch - best_epoch >= cfg.train.patience
        rng_states = all_gather(ctx, capture_rng())
        if ctx.is_main:
            ema = {"ema": run.ema.module.state_dict()} if run.ema is not None else {}
            save_torch({"model": run.model.state_dict(), **ema, "optimizer": run.optimizer.state_dict(),
                        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
                        "classes": data.classes, "backbone": cfg.model.backbone, "fingerprint": fingerprint,
                        "history": history, "best_macro_f1": best_f1, "best_epoch": best_epoch,
                        "best_val_probs": torch.from_numpy(best_val_probs), "finished": stop,
                        "rng": rng_states}, last_path)
            write_csv(pd.DataFrame(history), fold_dir / "history.csv")
            tracker.epoch(fold, history[-1])
        raw_note = f" (raw weights {record['val_macro_f1_raw']:.4f})" if run.ema is not None else ""
        log(f"{name} epoch {epoch}/{cfg.train.epochs}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val macro F1 {val['macro_f1']:.4f}{raw_note}  paintings {record['val_macro_f1_paintings']:.4f}  "
            f"acc {val['accuracy']:.4f}  lr {lr:.2e}  {history[-1]['train_images_per_s']:,.0f} images/s  "
            f"{time.time() - started:.0f}s{'  *best*' if improved else ''}")
        if on_epoch is not None:
            on_epoch(fold, history[-1])
        if stop:
            log(f"{name}: early stop, no better val macro F1 for {cfg.train.patience} epochs")
            break

    barrier(ctx)
    load_checkpoint(run.model, fold_dir / "best.pt", data.classes, cfg.model.backbone)
    test_loader = eval_loader(ImageDataset(data.test["path"], None,
                                           build_eval_transform(cfg, run.mean, run.std, test=True),
                                           cache=image_cache), cfg, device, run.workers, ctx)
    test_probs, _ = evaluate(run.eval_model, test_loader, cfg, device, ctx, desc=f"{name} test")
    result = FoldResult(fold=fold, best_epoch=best_epoch, best_macro_f1=best_f1, epochs_run=len(history))
    if ctx.is_main:
        write_csv(probs_frame(validation.ids, best_val_probs, data.classes, crops=validation.crops),
                  fold_dir / "val_probs.csv")
        write_csv(probs_frame(data.test["id"], test_probs, data.classes), fold_dir / "test_probs.csv")
        write_json({"fingerprint": fingerprint, **result.__dict__}, fold_dir / DONE_FILE)
        if not cfg.train.keep_checkpoints:
            last_path.unlink(missing_ok=True)  # resuming needs it no more: the fold is done
    barrier(ctx)
    log(f"{name}: best val macro F1 {best_f1:.4f} at epoch {best_epoch}")
    return result
