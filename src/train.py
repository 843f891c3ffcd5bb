"""The training loop, written once: one fold per call. Every technique is an option of the config.

A fold trains on the other folds' images, validates every epoch on its own fold (macro F1), keeps the
best epoch's weights and validation probabilities (its share of the OOF), stops early after `patience`
epochs without improvement, and finally predicts the test set with the best weights.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .config import ExperimentConfig
from .data import CompetitionData, ImageDataset, make_loader, style_images_for_fold
from .distributed import SINGLE_PROCESS, DistContext, all_gather, barrier, gather_shards, shard, sync_buffers
from .errors import UserError
from .image_cache import ImageCache
from .inference import predict_probs, probs_frame
from .io_utils import save_torch, write_csv, write_json
from .losses import build_loss
from .metrics import scores
from .models import build_model, load_checkpoint, normalisation, read_checkpoint
from .optim import SAM, build_optimizer, build_scheduler
from .runtime import amp_dtype, autocast, seed_everything, to_device, worker_count
from .sampler import build_sampler
from .transforms import build_eval_transform, build_train_transform

DONE_FILE = "done.json"


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_macro_f1: float
    epochs_run: int


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


def _shuffle_generator(loader) -> torch.Generator | None:
    """The generator that orders a training epoch; None under DDP, where DistributedSampler.set_epoch does."""
    if loader.generator is not None:
        return loader.generator
    return getattr(loader.sampler, "generator", None)


def capture_rng(loader, transform) -> dict:
    """Every random stream a training epoch draws from, as plain values (loadable with weights_only=True)."""
    legacy = np.random.get_state(legacy=False)
    generator = _shuffle_generator(loader)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {**legacy, "state": {"key": legacy["state"]["key"].tolist(), "pos": legacy["state"]["pos"]}},
            "shuffle": generator.get_state() if generator is not None else None,
            "augment_numpy": transform.random_generator.bit_generator.state,
            "augment_python": transform.py_random.getstate()}


def restore_rng(state: dict, loader, transform) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    legacy = state["numpy"]
    np.random.set_state({**legacy, "state": {"key": np.asarray(legacy["state"]["key"], dtype=np.uint32),
                                             "pos": legacy["state"]["pos"]}})
    generator = _shuffle_generator(loader)
    if generator is not None:
        generator.set_state(state["shuffle"])
    transform.random_generator.bit_generator.state = state["augment_numpy"]
    transform.py_random.setstate(state["augment_python"])


def uses_channels_last(cfg: ExperimentConfig, device: torch.device) -> bool:
    return cfg.speed.channels_last and device.type == "cuda"


def prepare_model(model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device,
                  ctx: DistContext) -> tuple[torch.nn.Module, torch.nn.Module]:
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
    if cfg.speed.compile and device.type == "cuda":
        return torch.compile(train_model), torch.compile(model)
    return train_model, model


def _train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, cutmix, cfg: ExperimentConfig,
                     device: torch.device, epoch: int, desc: str) -> float:
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty())
    for step, (images, labels) in enumerate(bar):
        images = to_device(images, device, uses_channels_last(cfg, device))
        targets = labels.to(device, non_blocking=True)
        if cutmix is not None:
            images, targets = cutmix(images, targets)

        def forward_backward() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, cfg.train.amp, cfg.train.amp_dtype):
                loss = criterion(model(images), targets)
            if not math.isfinite(loss.item()):
                raise UserError(f"{desc}: loss became {loss.item()} at epoch {epoch} step {step} "
                                f"(lr {optimizer.param_groups[0]['lr']:.2e}); lower optimizer.lr or check the data")
            scaler.scale(loss).backward()
            if cfg.train.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
            return loss

        if isinstance(optimizer, SAM):
            loss = optimizer.step(forward_backward)
        else:
            loss = forward_backward()
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        total += loss.item() * len(images)
        seen += len(images)
        bar.set_postfix(loss=f"{total / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return total / max(seen, 1)


def eval_loader(dataset: ImageDataset, cfg: ExperimentConfig, device: torch.device, workers: int,
                ctx: DistContext):
    """A loader over this rank's shard of an evaluation dataset (all of it without DDP)."""
    return make_loader(shard(ctx, dataset), cfg.inference.batch_size, workers, device, train=False,
                       pin_memory=cfg.speed.pin_memory, persistent_workers=cfg.speed.persistent_workers)


def evaluate(model: torch.nn.Module, loader, cfg: ExperimentConfig, device: torch.device, ctx: DistContext,
             criterion=None, desc: str = "predict") -> tuple[np.ndarray, float | None]:
    """Probabilities for every row of the loader's full dataset in order, gathered from the ranks' shards."""
    sync_buffers(ctx, model)
    probs, loss = predict_probs(model, loader, device, cfg.train.amp, cfg.train.amp_dtype, criterion=criterion,
                                desc=desc, channels_last=uses_channels_last(cfg, device))
    if criterion is not None:
        totals = all_gather(ctx, (loss * len(probs), len(probs)))
        loss = sum(total for total, _ in totals) / sum(count for _, count in totals)
    return gather_shards(ctx, probs, sum(all_gather(ctx, len(probs)))), loss


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


def train_fold(cfg: ExperimentConfig, data: CompetitionData, folds: pd.DataFrame, fold: int, fold_dir: Path,
               device: torch.device, fingerprint: str, log: Callable[[str], None] = print,
               image_cache: ImageCache | None = None, ctx: DistContext = SINGLE_PROCESS) -> FoldResult:
    """Train one fold and write best.pt, last.pt, history.csv, val_probs.csv, test_probs.csv, done.json.

    A last.pt saved with the same config and data resumes the fold after its epoch, with model, optimiser,
    scheduler, scaler, history and every random stream restored (exactly, when DataLoader workers are off).
    Under DDP (ctx.enabled) every rank trains and evaluates its share and only rank 0 writes.
    """
    seed_everything(cfg.seed + fold)
    is_val = (folds["fold"] == fold).to_numpy()
    train_rows, val_rows = data.train[~is_val], data.train[is_val]
    if data.style is not None:
        train_rows = pd.concat([train_rows, style_images_for_fold(data.style, set(val_rows["id"]))])

    model = build_model(cfg.model, len(data.classes)).to(device)
    mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
    stream_seed = cfg.seed + fold + 10_000 * ctx.rank
    if ctx.enabled:
        seed_everything(stream_seed)
    workers = worker_count(cfg.train.num_workers, device, processes=ctx.world_size)
    train_dataset = ImageDataset(train_rows["path"], train_rows["label"],
                                 build_train_transform(cfg, mean, std, seed=stream_seed), cache=image_cache)
    train_loader = train_loader_for(train_dataset, train_rows["label"].to_numpy(), cfg, device, workers, ctx,
                                    stream_seed, shared_seed=cfg.seed + fold)
    val_loader = eval_loader(ImageDataset(val_rows["path"], val_rows["label"], build_eval_transform(cfg, mean, std),
                                          cache=image_cache), cfg, device, workers, ctx)

    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=len(train_loader))
    use_scaler = device.type == "cuda" and cfg.train.amp and amp_dtype(cfg.train.amp_dtype) == torch.float16
    if use_scaler and isinstance(optimizer, SAM):
        raise UserError("optimizer.sam_rho does not combine with float16 AMP (its gradient scaler); "
                        "set train.amp_dtype=bfloat16 or train.amp=false")
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    criterion = build_loss(cfg.loss)
    cutmix = build_cutmix(cfg, len(data.classes))

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
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng(rng_per_rank[ctx.rank], train_loader, train_dataset.transform)
            history, best_f1, best_epoch = state["history"], state["best_macro_f1"], state["best_epoch"]
            best_val_probs = state["best_val_probs"].numpy()
            first_epoch = cfg.train.epochs + 1 if state["finished"] else state["epoch"] + 1
            log(f"{name}: resuming after epoch {state['epoch']} from {last_path}")
    train_model, eval_model = prepare_model(model, cfg, device, ctx)
    processes = f" x {ctx.world_size} processes (DDP)" if ctx.enabled else ""
    log(f"{name}: {len(train_rows)} train / {len(val_rows)} val images, {cfg.model.backbone} "
        f"at {cfg.input.img_size}px on {device.type}{processes}")
    for epoch in range(first_epoch, cfg.train.epochs + 1):
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        train_loss = _train_one_epoch(train_model, train_loader, optimizer, scheduler, scaler, criterion, cutmix,
                                      cfg, device, epoch, desc=f"{name} epoch {epoch}")
        train_loss = float(np.mean(all_gather(ctx, train_loss)))
        val_probs, val_loss = evaluate(eval_model, val_loader, cfg, device, ctx, criterion, desc=f"{name} validate")
        val = scores(val_rows["label"].to_numpy(), val_probs)
        improved = val["macro_f1"] > best_f1
        if improved:
            best_f1, best_epoch, best_val_probs = val["macro_f1"], epoch, val_probs
            if ctx.is_main:
                save_torch({"model": model.state_dict(), "epoch": epoch, "val_macro_f1": best_f1,
                            "classes": data.classes, "backbone": cfg.model.backbone}, fold_dir / "best.pt")
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": val_loss,
                        "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
                        "seconds": round(time.time() - started, 1)})
        stop = bool(cfg.train.patience) and epoch - best_epoch >= cfg.train.patience
        rng_states = all_gather(ctx, capture_rng(train_loader, train_dataset.transform))
        if ctx.is_main:
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                        "classes": data.classes, "backbone": cfg.model.backbone, "fingerprint": fingerprint,
                        "history": history, "best_macro_f1": best_f1, "best_epoch": best_epoch,
                        "best_val_probs": torch.from_numpy(best_val_probs), "finished": stop,
                        "rng": rng_states}, last_path)
            write_csv(pd.DataFrame(history), fold_dir / "history.csv")
        log(f"{name} epoch {epoch}/{cfg.train.epochs}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val macro F1 {val['macro_f1']:.4f}  acc {val['accuracy']:.4f}  lr {lr:.2e}  "
            f"{time.time() - started:.0f}s{'  *best*' if improved else ''}")
        if stop:
            log(f"{name}: early stop, no better val macro F1 for {cfg.train.patience} epochs")
            break

    barrier(ctx)
    load_checkpoint(model, fold_dir / "best.pt", data.classes, cfg.model.backbone)
    test_loader = eval_loader(ImageDataset(data.test["path"], None, build_eval_transform(cfg, mean, std, test=True),
                                           cache=image_cache), cfg, device, workers, ctx)
    test_probs, _ = evaluate(eval_model, test_loader, cfg, device, ctx, desc=f"{name} test")
    result = FoldResult(fold=fold, best_epoch=best_epoch, best_macro_f1=best_f1, epochs_run=len(history))
    if ctx.is_main:
        write_csv(probs_frame(val_rows["id"], best_val_probs, data.classes), fold_dir / "val_probs.csv")
        write_csv(probs_frame(data.test["id"], test_probs, data.classes), fold_dir / "test_probs.csv")
        write_json({"fingerprint": fingerprint, **result.__dict__}, fold_dir / DONE_FILE)
    barrier(ctx)
    log(f"{name}: best val macro F1 {best_f1:.4f} at epoch {best_epoch}")
    return result
