"""`bash run.sh gpucheck`: the GPU acceptance run.

One short run of a rung (exp07 by default: TinyViT-21M at 384 px; --experiment exp22 for EVA-02-B at 448 px) at the
competition's geometry (random weights unless asked for the hub's, demo paintings of 1,200-2,200 px) through the
fast code path (configs/profiles/fast.yaml): DataLoader workers reading an npy cache at the square the training
transform starts from, uint8 batches normalised and augmented on the GPU (kornia) while the previous batch trains,
autocast at the dtype the GPU computes in, channels_last and torch.compile with CUDA graphs, its compile time in the
log. It checks on the device what only a GPU run would hit, and measures the speeds that matter:
- predictions: the fold's val_probs.csv and test_probs.csv equal what a fresh model loaded from best.pt predicts,
  and a model that has already predicted, once loaded with other weights, predicts like a fresh one (TinyViT caches
  its attention biases in eval mode);
- augmentation streams: DataLoader workers draw different augmentations for every image and epoch, and the same
  ones as a loader without workers;
- precision: the autocast dtype follows the GPU's compute capability (bfloat16 from 8.0, float16 with a gradient
  scaler below), the run record says which, and a float16 run saves its scaler state;
- figures: training images/s through the trainer's own epoch, prediction images/s, peak GPU memory and the share
  of training time spent waiting for the input pipeline.
Without CUDA it says so in one line and ends (exit 0); `--device cpu` walks the same checks on the CPU (slowly; the
tests do that at a tiny geometry).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..core.config import resolve_config
from ..core.errors import UserError
from ..core.files import write_text
from ..core.layout import ExperimentDir, FoldDir, read_saved
from ..core.runtime import autocast_dtype, worker_count
from ..core.schema import ExperimentConfig
from ..data.competition import CompetitionData, load_competition_data
from ..data.folds import shared_folds
from ..data.geometry import ValidationSet, validation_set
from ..data.image_cache import ImageCache, cache_for
from ..data.loader import make_loader, training_dataset
from ..inference.predictor import Predictor
from ..inference.probabilities import read_probs
from ..model.checkpoints import load_weights
from ..pipeline.resolve import resolve_with_data
from ..pipeline.run import run_experiment
from .bench import Bench, loop_setting, machine_line
from .bench_common import peak_gib, reset_peak, timed_seconds, waiting

RUN_PROFILE = "fast"  # configs/profiles/fast.yaml
RUN_OVERRIDES = ["model.pretrained=false", "train.epochs=2", "train.patience=0", "train.folds=[0]",
                 "train.keep_checkpoints=true"]
# Probabilities of the same weights on the same device may differ by this much between two compiled graphs
# under autocast; stale attention biases move them by far more.
PROBABILITY_TOLERANCE = {"cuda": 2e-3, "cpu": 1e-5}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"| {self.name} | {'PASS' if self.passed else 'FAIL'} | {self.detail} |"


def fresh_predictor(cfg: ExperimentConfig, n_classes: int, device: torch.device, checkpoint: Path | None = None,
                    classes: list[str] | None = None, cache: ImageCache | None = None) -> Predictor:
    """A newly built network (random weights, or best.pt's), prepared as the trainer prepares its evaluation model."""
    predictor = Predictor.for_checkpoints(cfg, n_classes, device, cache=cache)
    if checkpoint is not None:
        predictor.load(checkpoint, classes)
    return predictor


def predict_validation(predictor: Predictor, validation: ValidationSet) -> np.ndarray:
    return predictor.predict(validation.paths, test=validation.are_crops, boxes=validation.boxes)


def check_fold_predictions(predictor: Predictor, data: CompetitionData, fold_dir: FoldDir, validation: ValidationSet,
                           epochs: int) -> Check:
    """The fold's saved probabilities against a fresh model loaded from its best.pt."""
    saved_val = read_probs(fold_dir.val_probs).set_index(["id", "crop"])
    saved_val = saved_val.loc[list(zip(validation.ids, validation.crops)), data.classes].to_numpy()
    saved_test = pd.read_csv(fold_dir.test_probs, dtype={"id": str}).set_index("id")
    saved_test = saved_test.loc[data.test["id"], data.classes].to_numpy()
    worst = max(float(np.abs(saved_val - predict_validation(predictor, validation)).max()),
                float(np.abs(saved_test - predictor.predict(data.test["path"].tolist(), test=True)).max()))
    best_epoch = int(torch.load(fold_dir.best, weights_only=True)["epoch"])
    tolerance = PROBABILITY_TOLERANCE[predictor.device.type]
    return Check("fold files = fresh model from best.pt", worst <= tolerance,
                 f"largest probability difference {worst:.1e} (tolerance {tolerance:.0e}); best epoch {best_epoch} "
                 f"of {epochs}; validation on {validation.describe()}, {len(data.test)} test rows")


def check_reload_after_predicting(cfg: ExperimentConfig, data: CompetitionData, fold_dir: FoldDir,
                                  device: torch.device) -> Check:
    """Predict with best.pt's weights, load other weights into the same model, predict again: the result must equal
    a fresh model built with those other weights. Eager (a compiled graph per model would cost minutes)."""
    eager = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"compile": False})})
    paths = data.test["path"].head(cfg.inference.batch_size).tolist()
    predictor = fresh_predictor(eager, len(data.classes), device, fold_dir.best, data.classes)
    predictor.predict(paths)
    torch.manual_seed(1)
    other = {key: value + 0.05 * torch.randn_like(value) if value.is_floating_point() else value
             for key, value in predictor.network.state_dict().items()}
    load_weights(predictor.network, other)
    reloaded = predictor.predict(paths)
    fresh = fresh_predictor(eager, len(data.classes), device)
    fresh.network.load_state_dict(other)
    difference = float(np.abs(reloaded - fresh.predict(paths)).max())
    tolerance = PROBABILITY_TOLERANCE[device.type]
    return Check(f"{cfg.model.backbone}: weights loaded after predicting = fresh model", difference <= tolerance,
                 f"largest probability difference {difference:.1e} on {len(paths)} test rows")


def augmentation_batches(cfg: ExperimentConfig, path: str, workers: int, epochs: int,
                         batches: int) -> list[torch.Tensor]:
    """Every batch of `epochs` epochs of a training loader built as the trainer builds it, over one painting
    repeated `batches` batches' worth: every image of them should differ."""
    size = cfg.train.batch_size * batches
    loader = make_loader(training_dataset(cfg, [path] * size, [0] * size, None, seed=cfg.seed), cfg.train.batch_size,
                         workers, torch.device("cpu"), train=True, seed=cfg.seed)
    drawn = []
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        drawn += [images for images, _ in loader]
    return drawn


def check_augmentation_streams(cfg: ExperimentConfig, path: str, workers: int) -> Check:
    """Two batches of 2 images for every worker in each of 2 epochs: every image distinct, and the same images as a
    loader without workers."""
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 2})})
    with_workers = augmentation_batches(cfg, path, workers, epochs=2, batches=2 * workers)
    images = [image.numpy().tobytes() for batch in with_workers for image in batch]
    distinct = len(set(images))
    without = augmentation_batches(cfg, path, 0, epochs=2, batches=2 * workers)
    same = all(torch.equal(a, b) for a, b in zip(with_workers, without))
    return Check(f"augmentations with {workers} workers", distinct == len(images) and same,
                 f"{distinct} distinct of {len(images)} augmented copies of one painting over 2 epochs; "
                 f"{'identical to' if same else 'DIFFERENT from'} a loader without workers")


def check_precision(cfg: ExperimentConfig, run_dir: ExperimentDir, device: torch.device) -> Check:
    """The resolved autocast dtype against the device, the run record and the saved scaler state."""
    dtype = autocast_dtype(cfg.train.amp, cfg.train.amp_dtype, device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        expected = torch.bfloat16 if major >= 8 else torch.float16
        where = f"compute capability {major}.{minor}"
    else:
        expected, where = None, "CPU"
    expected = expected if cfg.train.amp_dtype == "auto" else dtype
    recorded = read_saved(run_dir.path).run["precision"]["autocast"]
    scaler = torch.load(run_dir.fold(0).last, weights_only=True)["scaler"]
    name = str(dtype).removeprefix("torch.") if dtype else "off (float32)"
    passed = dtype == expected and recorded == name and bool(scaler) == (dtype == torch.float16)
    return Check("autocast dtype", passed, f"{where}, amp_dtype {cfg.train.amp_dtype}: autocast {name} (run record: "
                 f"{recorded}), gradient scaler {'on, its state saved' if scaler else 'off'}")


def timed_prediction(predictor: Predictor, paths: list[str]) -> float:
    """images/s of a second pass over the test images (the first compiled the model and filled the cache)."""
    return len(paths) / timed_seconds(lambda: predictor.predict(paths), predictor.device)[1]


def run_gpucheck(data_root: Path | None, outputs: Path, device: torch.device, overrides: list[str], steps: int,
                 log: Callable[[str], None] = print, experiment: str = "exp07") -> bool:
    """Train, check and measure; write outputs/gpucheck/report.md. Returns whether every check passed."""
    work = outputs / "gpucheck"
    if data_root is None:
        from ..demo.dataset import generate_demo_dataset

        data_root = work / "data"
        log(f"gpucheck: demo paintings of 1,200-2,200 px in {data_root} (made once)")
        generate_demo_dataset(data_root, seed=0, scale=0.02, min_side=1200, max_side=2200)
    cfg, _ = resolve_config(experiment, RUN_PROFILE, RUN_OVERRIDES + [f"speed.cache_dir={work / 'cache'}"] + overrides)
    data = load_competition_data(data_root, cfg.data.label_fixes, log=lambda _: None)
    run = resolve_with_data(cfg, None, data, say=lambda _: None)
    cfg = run.cfg
    run_outputs = work / "outputs"
    reset_peak(device)
    started = time.time()
    run_experiment(run, run_outputs, work / "submissions", extra_info={"command": "gpucheck"}, restart=True, log=log)
    fold_seconds = time.time() - started
    log(f"gpucheck: fold run took {fold_seconds:.0f}s")
    peaks = [peak_gib(device)]
    run_dir = ExperimentDir(run_outputs / cfg.name)
    fold_dir = run_dir.fold(0)
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, run_outputs / "folds")
    val_rows = data.train[(folds["fold"] == 0).to_numpy()]
    history = pd.read_csv(fold_dir.history)
    cache = cache_for(cfg, run_outputs)
    predictor = fresh_predictor(cfg, len(data.classes), device, fold_dir.best, data.classes, cache)
    checks = [check_fold_predictions(predictor, data, fold_dir, validation_set(cfg, val_rows), cfg.train.epochs),
              check_reload_after_predicting(cfg, data, fold_dir, device),
              check_augmentation_streams(cfg, data.train["path"].iloc[0],
                                         max(2, worker_count(cfg.train.num_workers, device))),
              check_precision(cfg, run_dir, device)]
    for check in checks:
        log(f"gpucheck: {check.name}: {'PASS' if check.passed else 'FAIL'} ({check.detail})")
    predict_rate = timed_prediction(predictor, data.test["path"].tolist())
    bench = Bench(cfg, data, len(data.train), steps, warmup=0, workers=None, log=lambda _: None, device=device)
    loop, looped = bench.train_loop(bench.cfg, cache)
    peaks.append(peak_gib(device))
    peak = max((p for p in peaks if p is not None), default=None)
    fold_rate = history["train_images_per_s"].iloc[-1]
    compiled = f"; compiled in {looped.compile_seconds:.0f}s (its first step)" if looped.compile_seconds else ""
    figures = [f"| training: the trainer's epoch over {loop.images} images, {bench.workers} workers, "
               f"{loop_setting(cfg, cache, device)} | {loop.images_per_s:,.1f} images/s | {waiting(loop)}{compiled}; "
               f"{bench.mfu(loop.images_per_s, cfg.train.amp)} |",
               f"| training: the fold run, {cfg.train.epochs} epochs, validation and test pass | {fold_seconds:.0f}s | "
               f"compilation included |",
               f"| training: fold run, epoch {len(history)} ({len(data.train) - len(val_rows)} images) | "
               f"{fold_rate:,.1f} images/s | input pipeline: {100 * history['data_wait_share'].iloc[-1]:.0f}% of the "
               f"time; {bench.mfu(fold_rate, cfg.train.amp)} |",
               f"| model FLOPs and the device's peak | | {bench.limits_line()} |",
               f"| prediction: {len(data.test)} test crops, no TTA, second pass | {predict_rate:,.1f} images/s | |",
               f"| peak GPU memory | {f'{peak:.2f} GiB' if peak is not None else 'CUDA only'} | fold run and the "
               f"trainer's epoch |"]
    report = [f"# gpucheck: {cfg.model.backbone} at {cfg.input.img_size}px, batch {cfg.train.batch_size}, "
              f"{'compiled' if cfg.speed.compile and device.type == 'cuda' else 'eager'}", "",
              f"machine: {machine_line(device)}",
              f"data: {len(data.train)} paintings and {len(data.test)} crops of {data_root}", "",
              "| check | result | detail |", "|---|---|---|", *(check.line() for check in checks), "",
              "| figure | value | note |", "|---|---:|---|", *figures]
    path = work / "report.md"
    write_text("\n".join(report) + "\n", path)
    log("\n".join(report))
    log(f"wrote {path}")
    return all(check.passed for check in checks)


def command_gpucheck(args: argparse.Namespace) -> None:
    from ..pipeline.resolve import log, resolve_data_root

    if args.device == "cuda" and not torch.cuda.is_available():
        log("gpucheck: no CUDA device here, so there is nothing to check; run it on a GPU machine "
            "(--device cpu walks the same checks slowly on the CPU)")
        return
    data_root = resolve_data_root(args.data) if args.data else None
    passed = run_gpucheck(data_root, Path(args.outputs), torch.device(args.device), list(args.overrides),
                          args.steps, log, args.experiment)
    if not passed:
        raise UserError("gpucheck: a check failed (FAIL above); see outputs/gpucheck/report.md")
