"""One fold, trained. The other folds' paintings train; the fold's own validate every epoch (macro F1); the best
epoch's weights and validation probabilities are kept (its share of the OOF); early stopping ends it after
`patience` epochs without improvement; then the test set is predicted with the best weights.

A fold killed at any point resumes from last.pt with model, optimiser, schedule, scaler, history and every random
stream restored, so it ends exactly where an uninterrupted run does, with any number of DataLoader workers. Under DDP
every rank trains and evaluates its share and only rank 0 writes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from ..core.distributed import SINGLE_PROCESS, DistContext, all_gather, barrier
from ..core.errors import UserError
from ..core.files import save_torch, write_csv
from ..core.layout import FoldDir
from ..core.metrics import painting_scores, scores
from ..core.removal import remove_output
from ..core.runtime import seed_everything
from ..core.schema import ExperimentConfig
from ..data.competition import CompetitionData, style_images_for_fold
from ..data.geometry import ValidationSet, validation_set
from ..data.image_cache import ImageCache
from ..data.training_set import TrainingSet
from ..inference.predictor import Predictor
from ..inference.probabilities import probs_frame
from ..model.checkpoints import load_weights, read_checkpoint
from ..model.prepare import compile_line
from .ema import ema_horizon_note, ema_line
from .loop import Training, build_training, capture_rng, restore_rng, train_one_epoch
from .objective import FoldContext
from .schedules import base_lr, early_stop_note, schedule_note
from .techniques import fold_training_set

AfterEpoch = Callable[[int, dict], None]


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_macro_f1: float
    epochs_run: int


@dataclass
class Progress:
    """Where a fold stands after its last finished epoch: what last.pt keeps besides the training state."""
    history: list[dict] = field(default_factory=list)
    best_macro_f1: float = -1.0
    best_epoch: int = 0
    best_val_probs: Optional[np.ndarray] = None
    finished: bool = False  # early stopping ended it

    @property
    def epochs_done(self) -> int:
        return len(self.history)


def resume(run: Training, fold_dir: FoldDir, fingerprint: str, ctx: DistContext, log: Callable[[str], None],
           name: str) -> Progress:
    """The state of last.pt restored into `run` when it was saved with this config and data; a fresh start else."""
    if not fold_dir.last.is_file():
        return Progress()
    state = read_checkpoint(fold_dir.last)
    if state.get("fingerprint") != fingerprint:
        return Progress()
    rng_per_rank = state["rng"] if isinstance(state.get("rng"), list) else [state.get("rng")]  # saved before DDP
    if len(rng_per_rank) != ctx.world_size:
        raise UserError(f"{fold_dir.last} was saved by {len(rng_per_rank)} training processes, this run has "
                        f"{ctx.world_size}; rerun with the same --ddp, or with --restart to start over")
    load_weights(run.model, state["model"])
    if run.ema is not None:
        load_weights(run.ema.module, state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.restore_scaler(state["scaler"], log, name)
    restore_rng(rng_per_rank[ctx.rank], lambda line: log(f"{name}: {line}"))
    log(f"{name}: resuming after epoch {state['epoch']} from {fold_dir.last}")
    return Progress(state["history"], state["best_macro_f1"], state["best_epoch"], state["best_val_probs"].numpy(),
                    state["finished"])


def save_best(run: Training, fold_dir: FoldDir, epoch: int, macro_f1: float, classes: list[str]) -> None:
    """best.pt: the weights that predict (the EMA's when on); the raw weights beside them if checkpoints are kept."""
    cfg = run.cfg
    raw = {"raw_model": run.model.state_dict()} if run.ema is not None and cfg.train.keep_checkpoints else {}
    save_torch({"model": run.predicting_state(), **raw, "epoch": epoch, "val_macro_f1": macro_f1,
                "classes": classes, "backbone": cfg.model.backbone}, fold_dir.best)


def save_last(run: Training, fold_dir: FoldDir, fingerprint: str, progress: Progress, rng_states: list[dict],
              classes: list[str]) -> None:
    """last.pt: everything `resume` needs to go on after this epoch, every rank's random streams included."""
    ema = {"ema": run.ema.module.state_dict()} if run.ema is not None else {}
    save_torch({"model": run.model.state_dict(), **ema, "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                "epoch": progress.epochs_done, "classes": classes, "backbone": run.cfg.model.backbone,
                "fingerprint": fingerprint, "history": progress.history, "best_macro_f1": progress.best_macro_f1,
                "best_epoch": progress.best_epoch, "best_val_probs": torch.from_numpy(progress.best_val_probs),
                "finished": progress.finished, "rng": rng_states}, fold_dir.last)


def validate(run: Training, predictor: Predictor, raw: Optional[Predictor], loader, validation: ValidationSet,
             name: str) -> tuple[dict, np.ndarray]:
    """The epoch's validation scores (and the raw weights' F1 under an EMA) and its probabilities."""
    probs, loss = predictor.probs(loader, run.objective.criterion, desc=f"{name} validate")
    val = scores(validation.labels, probs)
    record = {"val_loss": loss, "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
              "val_macro_f1_paintings": painting_scores(validation.ids, validation.labels, probs)["macro_f1"]}
    if raw is not None:
        raw_probs, _ = raw.probs(loader, desc=f"{name} validate raw")
        record["val_macro_f1_raw"] = scores(validation.labels, raw_probs)["macro_f1"]
    return record, probs


def epoch_line(name: str, epochs: int, record: dict, improved: bool) -> str:
    raw = f" (raw weights {record['val_macro_f1_raw']:.4f})" if "val_macro_f1_raw" in record else ""
    parts = ", ".join(f"{key.removeprefix('train_loss_')} {value:.4f}" for key, value in record.items()
                      if key.startswith("train_loss_"))
    return (f"{name} epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}"
            f"{f' ({parts})' if parts else ''}  val loss "
            f"{record['val_loss']:.4f}  val macro F1 {record['val_macro_f1']:.4f}{raw}  paintings "
            f"{record['val_macro_f1_paintings']:.4f}  acc {record['val_accuracy']:.4f}  lr {record['lr']:.2e}  "
            f"{record['train_images_per_s']:,.0f} images/s  {record['seconds']:.0f}s{'  *best*' if improved else ''}")


def fold_rows(data: CompetitionData, folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What fold `fold` trains on (the other folds' paintings and the style-transfer images none of its validation
    paintings made) and validates on (its own paintings)."""
    is_val = (folds["fold"] == fold).to_numpy()
    train_rows, val_rows = data.train[~is_val], data.train[is_val]
    if data.style is not None:
        train_rows = pd.concat([train_rows, style_images_for_fold(data.style, set(val_rows["id"]))])
    return train_rows, val_rows


def train_fold(cfg: ExperimentConfig, data: CompetitionData, folds: pd.DataFrame, fold: int, fold_dir: FoldDir,
               device: torch.device, fingerprint: str, log: Callable[[str], None] = print,
               image_cache: Optional[ImageCache] = None, ctx: DistContext = SINGLE_PROCESS,
               after_epoch: Optional[AfterEpoch] = None, *, outputs: Path) -> FoldResult:
    """Train one fold and write best.pt, last.pt, history.csv, val_probs.csv, test_probs.csv, done.json; once
    done.json is written, last.pt goes unless train.keep_checkpoints. What it trains on is its paintings, extended by
    the techniques the config turns on (pseudo-labels, distillation), which read their teachers under `outputs`.

    `after_epoch(fold, history row)` runs on every rank once the epoch's files are written; it may raise to end the
    fold there (a tuning trial's pruning), leaving last.pt to resume from."""
    name = f"{cfg.name} fold {fold}"
    seed_everything(cfg.seed + fold)
    train_rows, val_rows = fold_rows(data, folds, fold)
    stream_seed = cfg.seed + fold + 10_000 * ctx.rank
    if ctx.enabled:
        seed_everything(stream_seed)
    training_set = fold_training_set(TrainingSet(train_rows, len(data.classes)), FoldContext(
        cfg, data, fold, fold_dir, fingerprint, outputs, device, ctx, log))
    run = build_training(cfg, training_set, len(data.classes), device, ctx, image_cache, seed=stream_seed,
                         shared_seed=cfg.seed + fold)
    validation = validation_set(cfg, val_rows)
    predicting = run.ema.module if run.ema is not None else run.model
    predictor = Predictor(cfg, run.predicting_model, predicting, device, image_cache, run.workers, ctx)
    raw = Predictor(cfg, run.eval_model, run.model, device, image_cache, run.workers, ctx)
    val_loader = predictor.loader(predictor.dataset(validation.paths, validation.are_crops, validation.boxes,
                                                    validation.labels))
    progress = resume(run, fold_dir, fingerprint, ctx, log, name)
    synced = ", SyncBatchNorm" if ctx.enabled and cfg.train.sync_batchnorm else ""
    processes = f" x {ctx.world_size} processes (DDP{synced})" if ctx.enabled else ""
    crops = f" + {len(training_set.crops)} test crops" if len(training_set.crops) else ""
    log(f"{name}: {len(train_rows)} train{crops} / {len(val_rows)} val images, {cfg.model.backbone} "
        f"at {cfg.input.img_size}px on {device.type}{processes}, {run.workers} loader workers; validating on "
        f"{validation.describe()}")
    if run.ema is not None:
        log(f"{name}: {ema_line(run.ema, len(run.loader))}")
    notes = (schedule_note(cfg.scheduler, cfg.optimizer.lr, len(run.loader), cfg.train.epochs),
             early_stop_note(cfg.scheduler, cfg.train.epochs, cfg.train.patience),
             ema_horizon_note(run.ema, cfg.train.epochs * len(run.loader)) if run.ema is not None else None)
    for note in filter(None, notes if not progress.epochs_done else ()):
        log(f"{name}: {note}")

    first_epoch, last_epoch = progress.epochs_done + 1, progress.epochs_done if progress.finished else cfg.train.epochs
    for epoch in range(first_epoch, last_epoch + 1):
        started = time.time()
        lr = base_lr(run.optimizer)
        stats = train_one_epoch(run, epoch, desc=f"{name} epoch {epoch}")
        scored, val_probs = validate(run, predictor, raw if run.ema is not None else None, val_loader, validation,
                                     name)
        improved = scored["val_macro_f1"] > progress.best_macro_f1
        if improved:
            progress.best_macro_f1, progress.best_epoch, progress.best_val_probs = \
                scored["val_macro_f1"], epoch, val_probs
            if ctx.is_main:
                save_best(run, fold_dir, epoch, progress.best_macro_f1, data.classes)
        parts = {f"train_loss_{part}": float(np.mean(all_gather(ctx, value))) for part, value in stats.parts.items()}
        progress.history.append({
            "epoch": epoch, "lr": lr, "train_loss": float(np.mean(all_gather(ctx, stats.loss))), **parts, **scored,
            "seconds": round(time.time() - started, 1),
            "train_images_per_s": round(stats.images_per_s * ctx.world_size, 1),
            "data_wait_share": round(stats.data_seconds / stats.seconds, 3) if stats.seconds else 0.0})
        progress.finished = bool(cfg.train.patience) and epoch - progress.best_epoch >= cfg.train.patience
        rng_states = all_gather(ctx, capture_rng())
        if ctx.is_main:
            save_last(run, fold_dir, fingerprint, progress, rng_states, data.classes)
            write_csv(pd.DataFrame(progress.history), fold_dir.history)
        log(epoch_line(name, cfg.train.epochs, progress.history[-1], improved))
        if epoch == first_epoch and run.compile_seconds is not None:
            log(compile_line(name, run.compile_seconds, predictor.first_pass_seconds))
        if after_epoch is not None:
            after_epoch(fold, progress.history[-1])
        if progress.finished:
            log(f"{name}: early stop, no better val macro F1 for {cfg.train.patience} epochs")
            break

    barrier(ctx)
    result = FoldResult(fold=fold, best_epoch=progress.best_epoch, best_macro_f1=progress.best_macro_f1,
                        epochs_run=progress.epochs_done)
    write_fold_results(raw, fold_dir, data, validation, progress, fingerprint, result, name)
    if run.ema is not None:
        steps = run.scheduler.last_epoch
        log(f"{name}: EMA decay at the last step ({steps:,}): {run.ema.get_decay(steps):.6g}")
    log(f"{name}: best val macro F1 {progress.best_macro_f1:.4f} at epoch {progress.best_epoch}")
    return result


def write_fold_results(tester: Predictor, fold_dir: FoldDir, data: CompetitionData, validation: ValidationSet,
                       progress: Progress, fingerprint: str, result: FoldResult, name: str) -> None:
    """The test pass with best.pt's weights, then val_probs.csv, test_probs.csv and done.json (rank 0); last.pt
    goes unless train.keep_checkpoints."""
    tester.load(fold_dir.best, data.classes)
    test_probs = tester.predict(data.test["path"], test=True, desc=f"{name} test")
    if tester.ctx.is_main:
        write_csv(probs_frame(validation.ids, progress.best_val_probs, data.classes, crops=validation.crops),
                  fold_dir.val_probs)
        write_csv(probs_frame(data.test["id"], test_probs, data.classes), fold_dir.test_probs)
        fold_dir.write_done(fingerprint, dict(result.__dict__))
        if not tester.cfg.train.keep_checkpoints:
            remove_output(fold_dir.path, fold_dir.last)  # resuming needs it no more: the fold is done
    barrier(tester.ctx)
