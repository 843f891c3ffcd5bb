"""One experiment end to end: resolved config on disk, shared folds, every fold trained (finished folds of
the same config and data are kept), then the OOF table, the fold-averaged test probabilities and the
submission. Also the TTA re-prediction of a finished experiment, published the same way."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import yaml

from .config import ExperimentConfig, result_fingerprint, run_info
from .data import CompetitionData, shared_folds
from .distributed import SINGLE_PROCESS, DistContext, all_gather, barrier, device_for
from .errors import UserError
from .features import FEATURE_DIR, FrozenFeatureFolds
from .geometry import measure_test_geometry, resolve_for_data, validation_set
from .image_cache import cache_for
from .inference import predict_probs, probs_frame, read_probs
from .io_utils import write_csv, write_yaml
from .loader import ImageDataset
from .locks import ensure_unlocked, lock_path, locked
from .metrics import painting_scores, scores, solution_f1
from .models import build_model, load_checkpoint, normalisation
from .plots import plot_training_curves
from .runtime import precision_record, select_device, worker_count
from .submission import submission_from_probs, write_submission
from .tracking import NO_TRACKING, Tracker, open_trackers
from .train import DONE_FILE, eval_loader, prepare_model, train_fold, uses_channels_last
from .transforms import build_eval_transform
from .tta import with_tta

FOLD_RESULT_KEYS = ("best_macro_f1", "best_epoch", "epochs_run")  # what a fold's done.json tells the trackers


def fold_status(fold_dir: Path, fingerprint: str) -> str:
    """'done' when the fold finished with this config and data, else 'todo'. A fold finished with another config or
    data stops the run with one line: it is never mixed with folds of another config."""
    done = fold_dir / DONE_FILE
    if not done.is_file():
        return "todo"
    if json.loads(done.read_text())["fingerprint"] != fingerprint:
        raise UserError(f"{fold_dir} holds a fold trained with another config or data; rerun with --restart to "
                        f"discard {fold_dir.parent}, or name a new experiment")
    return "done"


@contextlib.contextmanager
def fold_lock(path: Path, what: str, ctx: DistContext) -> Iterator[None]:
    """The fold's lock (src/locks.py), held by rank 0 for all the ranks that train the fold together; when another
    run holds it, every rank stops with the same line."""
    with contextlib.ExitStack() as held:
        refusal = None
        if ctx.is_main:
            try:
                held.enter_context(locked(path, what))
            except UserError as error:
                refusal = str(error)
        refusal = all_gather(ctx, refusal)[0]
        if refusal:
            raise UserError(refusal)
        yield


def assemble_oof(out_dir: Path, data: CompetitionData, folds: pd.DataFrame, fold_ids: list[int],
                 cfg: ExperimentConfig) -> pd.DataFrame:
    """One row per validation row (a whole painting, or one of its crops): id, crop (-1 for the whole painting),
    fold, artist (true), pred, one probability column per artist; in train.csv's order, crops in order."""
    parts = pd.concat([read_probs(out_dir / f"fold{k}" / "val_probs.csv") for k in fold_ids])
    expected = validation_set(cfg, data.train)
    index = pd.MultiIndex.from_arrays([expected.ids, expected.crops], names=["id", "crop"])
    keys = pd.MultiIndex.from_frame(parts[["id", "crop"]])
    if keys.has_duplicates or len(keys) != len(index) or not keys.isin(index).all():
        raise UserError(f"{out_dir}: fold predictions do not cover every validation row ({expected.describe()}) "
                        "exactly once; rerun with --restart")
    probs = parts.set_index(["id", "crop"]).reindex(index)[data.classes].to_numpy()
    fold_of = dict(zip(folds["id"], folds["fold"]))
    artist_of = dict(zip(data.train["id"], data.train["artist"]))
    oof = pd.DataFrame({"id": expected.ids, "crop": expected.crops, "fold": [fold_of[i] for i in expected.ids],
                        "artist": [artist_of[i] for i in expected.ids],
                        "pred": np.asarray(data.classes)[probs.argmax(axis=1)]})
    return pd.concat([oof, pd.DataFrame(probs, columns=data.classes)], axis=1)


def mean_test_probs(out_dir: Path, data: CompetitionData, fold_ids: list[int]) -> pd.DataFrame:
    per_fold = [pd.read_csv(out_dir / f"fold{k}" / "test_probs.csv", dtype={"id": str}).set_index("id")
                .reindex(data.test["id"])[data.classes].to_numpy() for k in fold_ids]
    frame = pd.DataFrame(np.mean(per_fold, axis=0), columns=data.classes)
    frame.insert(0, "id", data.test["id"].to_numpy())
    return frame


def run_experiment(cfg: ExperimentConfig, data: CompetitionData, outputs: Path, submissions: Path,
                   extra_info: dict[str, Any], restart: bool = False,
                   log: Callable[[str], None] = print, ctx: DistContext = SINGLE_PROCESS,
                   out_dir: Path | None = None, on_epoch: Callable[[int, dict], None] | None = None,
                   publishes: bool = True) -> dict[str, float]:
    """Train the configured folds (fine-tuning, or a classifier on frozen features when cfg.frozen is set); once
    all folds are done write oof.csv, test_probs.csv and the submission, unless `publishes` is off (a --gpus fold
    job: the command that started it publishes). Under DDP every rank runs this; rank 0 alone writes files,
    reports to the trackers (cfg.tracking) and publishes. `out_dir` (default OUTPUTS/NAME) holds the experiment's
    files; the folds and the image cache stay shared under `outputs`. `on_epoch(fold, history row)` is called
    after every epoch (see train_fold)."""
    started = time.time()
    out_dir = out_dir or outputs / cfg.name
    geometry = measure_test_geometry(data.train, data.test)
    cfg = resolve_for_data(cfg, geometry)
    log(geometry.summary())
    fingerprint = result_fingerprint(cfg, data.fingerprint(with_style=True))
    device = device_for(ctx)
    tracker = NO_TRACKING
    if ctx.is_main and restart and out_dir.exists():
        ensure_unlocked(out_dir)
        shutil.rmtree(out_dir)
        log(f"--restart: removed {out_dir}")
    barrier(ctx)
    for fold in range(cfg.data.n_folds):  # before config.yaml is written: a refused run changes nothing
        fold_status(out_dir / f"fold{fold}", fingerprint)
    if ctx.is_main:
        resolved = {**cfg.model_dump(mode="json"),
                    "run": {**run_info(), **extra_info, "python": sys.version.split()[0],
                            "data_root": str(data.root), "data_fingerprint": data.fingerprint(),
                            "result_fingerprint": fingerprint, "processes": ctx.world_size,
                            "precision": precision_record(cfg.train.amp, cfg.train.amp_dtype, device),
                            "test_geometry": geometry.summary()}}
        write_yaml(resolved, out_dir / "config.yaml")
        shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
        tracker = open_trackers(cfg, out_dir, outputs, resolved, fingerprint)
        if tracker.where:
            log(f"tracking: {tracker.where}")
    barrier(ctx)
    try:
        tracker.start()
        result = _train_and_publish(cfg, data, outputs, out_dir, submissions, fingerprint, device, started, log,
                                    ctx, tracker, on_epoch, publishes)
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            tracker.close()
        raise
    tracker.close()
    return result


def _train_and_publish(cfg: ExperimentConfig, data: CompetitionData, outputs: Path, out_dir: Path,
                       submissions: Path, fingerprint: str, device, started: float, log: Callable[[str], None],
                       ctx: DistContext, tracker: Tracker, on_epoch: Callable[[int, dict], None] | None,
                       publishes: bool) -> dict[str, float]:
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    image_cache = cache_for(cfg, outputs)
    if cfg.frozen and ctx.enabled:
        raise UserError(f"{cfg.name} fits a classifier on frozen features in one process; run it without --ddp")
    frozen = FrozenFeatureFolds(cfg, data, outputs / FEATURE_DIR, device, log) if cfg.frozen else None
    all_folds = list(range(cfg.data.n_folds))
    for fold in cfg.train.folds if cfg.train.folds is not None else all_folds:
        if fold not in all_folds:
            raise UserError(f"train.folds: fold {fold} does not exist (data.n_folds={cfg.data.n_folds})")
        fold_dir = out_dir / f"fold{fold}"
        with fold_lock(lock_path(out_dir, fold_dir.name), f"training {cfg.name} fold {fold}", ctx):
            if fold_status(fold_dir, fingerprint) == "done":  # read under the lock: another run may just have ended it
                log(f"{cfg.name} fold {fold}: already complete, skipped")
                continue
            if frozen:
                result = {"best_macro_f1": frozen.fit_fold(folds, fold, fold_dir, fingerprint)}
            else:
                trained = train_fold(cfg, data, folds, fold, fold_dir, device, fingerprint, log, image_cache, ctx,
                                     tracker, on_epoch)
                result = {key: getattr(trained, key) for key in FOLD_RESULT_KEYS}
        tracker.fold_end(fold, result)

    if not ctx.is_main or not publishes:
        return {}
    pending = [k for k in all_folds if fold_status(out_dir / f"fold{k}", fingerprint) != "done"]
    if pending:
        log(f"{cfg.name}: folds {pending} not trained yet; oof.csv and the submission are written once all "
            f"{cfg.data.n_folds} folds are done")
        return {}
    with locked(lock_path(out_dir, "publish"), f"publishing {cfg.name}", wait=True):
        result = publish(cfg.name, out_dir, assemble_oof(out_dir, data, folds, all_folds, cfg),
                         mean_test_probs(out_dir, data, all_folds), data, submissions, started, log)
        curves = plot_training_curves(out_dir) if tracker.keeps_files else None
        tracker.experiment_end({k: fold_result(out_dir / f"fold{k}") for k in all_folds}, result,
                               [submissions / f"{cfg.name}.csv", out_dir / "oof.csv", *filter(None, [curves])])
    return result


def fold_result(fold_dir: Path) -> dict[str, float]:
    """What a done fold's done.json says of its result (best_macro_f1; best_epoch and epochs_run when trained)."""
    done = json.loads((fold_dir / DONE_FILE).read_text())
    return {key: done[key] for key in FOLD_RESULT_KEYS if key in done}


def publish(name: str, out_dir: Path, oof: pd.DataFrame, test_probs: pd.DataFrame, data: CompetitionData,
            submissions: Path, started: float, log: Callable[[str], None] = print) -> dict[str, float]:
    """Write oof.csv, test_probs.csv and the validated submission; log the scores as the last line."""
    write_csv(oof, out_dir / "oof.csv")
    write_csv(test_probs, out_dir / "test_probs.csv")
    submission = submission_from_probs(test_probs, data.sample_submission, data.classes)
    submission_path = submissions / f"{name}.csv"
    write_submission(submission, submission_path, data.sample_submission, data.classes)
    labels = oof["artist"].map({artist: i for i, artist in enumerate(data.classes)}).to_numpy()
    probs = oof[data.classes].to_numpy()
    result = {f"cv_{k}": v for k, v in scores(labels, probs).items()}
    paintings = oof["id"].nunique()
    if (oof["crop"] >= 0).any():
        result["cv_paintings_macro_f1"] = painting_scores(oof["id"].to_numpy(), labels, probs)["macro_f1"]
        summary = (f"{name}: CV macro F1 {result['cv_macro_f1']:.4f} (OOF of {len(oof)} validation crops, "
                   f"{len(oof) // paintings} of each of {paintings} train images, {oof['fold'].nunique()} folds; "
                   f"painting-level {result['cv_paintings_macro_f1']:.4f})")
    else:
        summary = f"{name}: CV macro F1 {result['cv_macro_f1']:.4f} (OOF of {len(oof)} train images, " \
                  f"{oof['fold'].nunique()} folds)"
    if data.solution is not None:
        result["test_macro_f1"] = solution_f1(submission["id"], submission["artist"], data.solution)
        summary += f" | demo test macro F1 {result['test_macro_f1']:.4f} ({len(submission)} crops, solution.csv)"
    log(f"wrote {out_dir / 'oof.csv'}, {out_dir / 'test_probs.csv'}, {submission_path}")
    log(f"{summary} | {(time.time() - started) / 60:.1f} min")
    return result


def saved_config(out_dir: Path) -> ExperimentConfig:
    """The resolved config a finished experiment ran with (profile and overrides included)."""
    path = out_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found; run the experiment first (bash run.sh {out_dir.name})")
    saved = yaml.safe_load(path.read_text())
    saved.pop("run", None)
    return ExperimentConfig.model_validate(saved)


def run_tta(source: str, mode: str, data: CompetitionData, outputs: Path, submissions: Path,
            log: Callable[[str], None] = print) -> dict[str, float]:
    """Predict the validation folds and the test set of a finished experiment again with TTA, from each fold's
    best.pt, as a new experiment `<source>-tta-<mode>` whose parent is the source, so the ablation table shows
    whether TTA helps."""
    started = time.time()
    cfg = saved_config(outputs / source)
    if cfg.frozen:
        raise UserError(f"{source} is a frozen-feature experiment (a {cfg.frozen.classifier} classifier, no fold "
                        "networks); TTA needs a fine-tuned experiment")
    name = f"{source}-tta-{mode}"
    out_dir = outputs / name
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    device = select_device()
    workers = worker_count(cfg.train.num_workers, device)
    image_cache = cache_for(cfg, outputs)
    all_folds = list(range(cfg.data.n_folds))
    for fold in all_folds:
        checkpoint = outputs / source / f"fold{fold}" / "best.pt"
        if not checkpoint.is_file():
            raise UserError(f"{checkpoint} not found; finish {source}'s folds first (bash run.sh {source})")
        model = build_model(cfg.model.model_copy(update={"pretrained": False}), len(data.classes))
        load_checkpoint(model, checkpoint, data.classes, cfg.model.backbone)
        model.to(device)
        mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
        _, eval_model = prepare_model(model, cfg, device, SINGLE_PROCESS)
        predictor = with_tta(eval_model, mode)
        validation = validation_set(cfg, data.train[(folds["fold"] == fold).to_numpy()])
        datasets = {"val_probs.csv": ImageDataset(validation.paths, None,
                                                  build_eval_transform(cfg, mean, std, test=validation.are_crops),
                                                  cache=image_cache, boxes=validation.boxes),
                    "test_probs.csv": ImageDataset(data.test["path"], None,
                                                   build_eval_transform(cfg, mean, std, test=True), cache=image_cache)}
        for filename, dataset in datasets.items():
            probs, _ = predict_probs(predictor, eval_loader(dataset, cfg, device, workers, SINGLE_PROCESS), device,
                                     cfg.train.amp, cfg.train.amp_dtype, desc=f"{name} fold {fold}",
                                     channels_last=uses_channels_last(cfg, device))
            rows = (validation.ids, validation.crops) if filename == "val_probs.csv" else (data.test["id"], None)
            write_csv(probs_frame(rows[0], probs, data.classes, crops=rows[1]), out_dir / f"fold{fold}" / filename)
        log(f"{name} fold {fold}: predicted {validation.describe()} and {len(data.test)} test images")
    write_yaml({"name": name, "parent": source, "description": f"{source} with {mode} TTA", "tta": mode,
                "validation": cfg.validation.model_dump(mode="json"), "source_config": cfg.model_dump(mode="json"),
                "run": {**run_info(), "data_root": str(data.root), "data_fingerprint": data.fingerprint()}},
               out_dir / "config.yaml")
    return publish(name, out_dir, assemble_oof(out_dir, data, folds, all_folds, cfg),
                   mean_test_probs(out_dir, data, all_folds), data, submissions, started, log)
