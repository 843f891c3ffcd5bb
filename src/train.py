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
from .errors import UserError
from .inference import predict_probs, probs_frame
from .io_utils import save_torch, write_csv, write_json
from .losses import build_loss
from .metrics import scores
from .models import build_model, load_checkpoint, normalisation
from .optim import SAM, build_optimizer, build_scheduler
from .runtime import autocast, amp_dtype, seed_everything, worker_count
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


def capture_rng(loader, transform) -> dict:
    """Every random stream a training epoch draws from, as plain values (loadable with weights_only=True)."""
    legacy = np.random.get_state(legacy=False)
    generator = loader.generator if loader.generator is not None else loader.sampler.generator
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {**legacy, "state": {"key": legacy["state"]["key"].tolist(), "pos": legacy["state"]["pos"]}},
            "shuffle": generator.get_state(),
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
    generator = loader.generator if loader.generator is not None else loader.sampler.generator
    generator.set_state(state["shuffle"])
    transform.random_generator.bit_generator.state = state["augment_numpy"]
    transform.py_random.setstate(state["augment_python"])


def _train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, cutmix, cfg: ExperimentConfig,
                     device: torch.device, epoch: int, desc: str) -> float:
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty())
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
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


def train_fold(cfg: ExperimentConfig, data: CompetitionData, folds: pd.DataFrame, fold: int, fold_dir: Path,
               device: torch.device, fingerprint: str, log: Callable[[str], None] = print) -> FoldResult:
    """Train one fold and write best.pt, last.pt, history.csv, val_probs.csv, test_probs.csv, done.json.

    A last.pt saved with the same config and data resumes the fold after its epoch, with model, optimiser,
    scheduler, scaler, history and every random stream restored (exactly, when DataLoader workers are off).
    """
    seed_everything(cfg.seed + fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    is_val = (folds["fold"] == fold).to_numpy()
    train_rows, val_rows = data.train[~is_val], data.train[is_val]
    if data.style is not None:
        train_rows = pd.concat([train_rows, style_images_for_fold(data.style, set(val_rows["id"]))])

    model = build_model(cfg.model, len(data.classes)).to(device)
    mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
    workers = worker_count(cfg.train.num_workers, device)
    train_dataset = ImageDataset(train_rows["path"], train_rows["label"],
                                 build_train_transform(cfg, mean, std, seed=cfg.seed + fold))
    sampler = build_sampler(train_rows["label"].to_numpy(), cfg.train.sampler, cfg.seed + fold)
    train_loader = make_loader(train_dataset, cfg.train.batch_size, workers, device, train=True,
                               seed=cfg.seed + fold, sampler=sampler)
    val_loader = make_loader(ImageDataset(val_rows["path"], val_rows["label"], build_eval_transform(cfg, mean, std)),
                             cfg.inference.batch_size, workers, device, train=False)

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
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"], train_loader, train_dataset.transform)
            history, best_f1, best_epoch = state["history"], state["best_macro_f1"], state["best_epoch"]
            best_val_probs = state["best_val_probs"].numpy()
            first_epoch = cfg.train.epochs + 1 if state["finished"] else state["epoch"] + 1
            log(f"{name}: resuming after epoch {state['epoch']} from {last_path}")
    log(f"{name}: {len(train_rows)} train / {len(val_rows)} val images, {cfg.model.backbone} "
        f"at {cfg.input.img_size}px on {device.type}")
    for epoch in range(first_epoch, cfg.train.epochs + 1):
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = _train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion, cutmix, cfg,
                                      device, epoch, desc=f"{name} epoch {epoch}")
        val_probs, val_loss = predict_probs(model, val_loader, device, cfg.train.amp, cfg.train.amp_dtype,
                                            criterion=criterion, desc=f"{name} validate")
        val = scores(val_rows["label"].to_numpy(), val_probs)
        improved = val["macro_f1"] > best_f1
        if improved:
            best_f1, best_epoch, best_val_probs = val["macro_f1"], epoch, val_probs
            save_torch({"model": model.state_dict(), "epoch": epoch, "val_macro_f1": best_f1,
                        "classes": data.classes, "backbone": cfg.model.backbone}, fold_dir / "best.pt")
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": val_loss,
                        "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
                        "seconds": round(time.time() - started, 1)})
        stop = bool(cfg.train.patience) and epoch - best_epoch >= cfg.train.patience
        save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "classes": data.classes, "backbone": cfg.model.backbone, "fingerprint": fingerprint,
                    "history": history, "best_macro_f1": best_f1, "best_epoch": best_epoch,
                    "best_val_probs": torch.from_numpy(best_val_probs), "finished": stop,
                    "rng": capture_rng(train_loader, train_dataset.transform)}, last_path)
        write_csv(pd.DataFrame(history), fold_dir / "history.csv")
        log(f"{name} epoch {epoch}/{cfg.train.epochs}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val macro F1 {val['macro_f1']:.4f}  acc {val['accuracy']:.4f}  lr {lr:.2e}  "
            f"{time.time() - started:.0f}s{'  *best*' if improved else ''}")
        if stop:
            log(f"{name}: early stop, no better val macro F1 for {cfg.train.patience} epochs")
            break

    load_checkpoint(model, fold_dir / "best.pt", data.classes, cfg.model.backbone)
    test_loader = make_loader(ImageDataset(data.test["path"], None, build_eval_transform(cfg, mean, std, test=True)),
                              cfg.inference.batch_size, workers, device, train=False)
    test_probs, _ = predict_probs(model, test_loader, device, cfg.train.amp, cfg.train.amp_dtype,
                                  desc=f"{name} test")
    write_csv(probs_frame(val_rows["id"], best_val_probs, data.classes), fold_dir / "val_probs.csv")
    write_csv(probs_frame(data.test["id"], test_probs, data.classes), fold_dir / "test_probs.csv")
    result = FoldResult(fold=fold, best_epoch=best_epoch, best_macro_f1=best_f1, epochs_run=len(history))
    write_json({"fingerprint": fingerprint, **result.__dict__}, fold_dir / DONE_FILE)
    log(f"{name}: best val macro F1 {best_f1:.4f} at epoch {best_epoch}")
    return result
