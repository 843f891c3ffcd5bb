"""`bash run.sh gpucheck`: the GPU acceptance run.

One short run of exp07 at the competition's geometry (TinyViT-21M at 384 px, random weights unless asked for the
hub's, demo paintings of 1,200-2,200 px) through the real code path: DataLoader workers, the image cache,
autocast at the dtype the GPU computes in, channels_last and torch.compile. It checks on the device what only a GPU
run would hit, and measures the speeds that matter:
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

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import yaml

from .bench import Bench, machine_line, peak_gib, reset_peak, waiting
from .config import ExperimentConfig, resolve_config
from .data import CompetitionData, load_competition_data, shared_folds
from .demo_data import generate_demo_dataset
from .distributed import SINGLE_PROCESS
from .experiment import run_experiment
from .geometry import ValidationSet, resolved, validation_set
from .image_cache import ImageCache, cache_for, needed_short_side
from .inference import predict_probs, read_probs
from .io_utils import write_text
from .loader import ImageDataset, make_loader
from .models import build_model, load_checkpoint, load_weights, normalisation
from .runtime import autocast_dtype, synchronize, worker_count
from .train import eval_loader, prepare_model, uses_channels_last
from .transforms import build_eval_transform, build_train_transform

EXPERIMENT = "exp07"
RUN_OVERRIDES = ["model.pretrained=false", "train.epochs=2", "train.patience=0", "train.folds=[0]",
                 "train.keep_checkpoints=true", "speed.compile=true", "speed.image_cache=jpg"]
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


class PreparedModel:
    """A model prepared as the trainer prepares its evaluation model (speed switches, compiled once), predicting
    rows through the trainer's evaluation loader and autocast."""

    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module, device: torch.device, outputs: Path):
        self.cfg, self.device = cfg, device
        self.mean, self.std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
        _, self.model = prepare_model(model.to(device), cfg, device, SINGLE_PROCESS)
        self.cache = cache_for(cfg, outputs)
        self.workers = worker_count(cfg.train.num_workers, device)

    def __call__(self, paths: list[str], test: bool, boxes: np.ndarray | None = None) -> np.ndarray:
        """Probabilities for the images (test=True: resized whole, as test crops and validation crops are; False:
        the validation transform of whole paintings), or for these crops of them."""
        dataset = ImageDataset(paths, None, build_eval_transform(self.cfg, self.mean, self.std, test=test),
                               cache=self.cache, boxes=boxes)
        loader = eval_loader(dataset, self.cfg, self.device, self.workers, SINGLE_PROCESS)
        probs, _ = predict_probs(self.model, loader, self.device, self.cfg.train.amp, self.cfg.train.amp_dtype,
                                 channels_last=uses_channels_last(self.cfg, self.device))
        return probs


def fresh_model(cfg: ExperimentConfig, n_classes: int, checkpoint: Path | None = None,
                classes: list[str] | None = None) -> torch.nn.Module:
    """A newly built model: random weights, or best.pt's."""
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), n_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, classes, cfg.model.backbone)
    return model


def predict_validation(predict: PreparedModel, validation: ValidationSet) -> np.ndarray:
    return predict(validation.paths, test=validation.are_crops, boxes=validation.boxes)


def check_fold_predictions(predict: PreparedModel, data: CompetitionData, fold_dir: Path, validation: ValidationSet,
                           epochs: int) -> Check:
    """The fold's saved probabilities against a fresh model loaded from its best.pt."""
    saved_val = read_probs(fold_dir / "val_probs.csv").set_index(["id", "crop"])
    saved_val = saved_val.loc[list(zip(validation.ids, validation.crops)), data.classes].to_numpy()
    saved_test = pd.read_csv(fold_dir / "test_probs.csv", dtype={"id": str}).set_index("id")
    saved_test = saved_test.loc[data.test["id"], data.classes].to_numpy()
    worst = max(float(np.abs(saved_val - predict_validation(predict, validation)).max()),
                float(np.abs(saved_test - predict(data.test["path"].tolist(), test=True)).max()))
    best_epoch = int(torch.load(fold_dir / "best.pt", weights_only=True)["epoch"])
    tolerance = PROBABILITY_TOLERANCE[predict.device.type]
    return Check("fold files = fresh model from best.pt", worst <= tolerance,
                 f"largest probability difference {worst:.1e} (tolerance {tolerance:.0e}); best epoch {best_epoch} "
                 f"of {epochs}; validation on {validation.describe()}, {len(data.test)} test rows")


def check_reload_after_predicting(cfg: ExperimentConfig, data: CompetitionData, fold_dir: Path,
                                  device: torch.device) -> Check:
    """Predict with best.pt's weights, load other weights into the same model, predict again: the result must equal
    a fresh model built with those other weights. Eager (a compiled graph per model would cost minutes)."""
    eager = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"compile": False})})
    paths = data.test["path"].head(cfg.inference.batch_size).tolist()
    model = fresh_model(cfg, len(data.classes), fold_dir / "best.pt", data.classes)
    PreparedModel(eager, model, device, fold_dir)(paths, test=True)
    torch.manual_seed(1)
    other = {key: value + 0.05 * torch.randn_like(value) if value.is_floating_point() else value
             for key, value in model.state_dict().items()}
    load_weights(model, other)
    reloaded = PreparedModel(eager, model, device, fold_dir)(paths, test=True)
    fresh = fresh_model(cfg, len(data.classes))
    fresh.load_state_dict(other)
    difference = float(np.abs(reloaded - PreparedModel(eager, fresh, device, fold_dir)(paths, test=True)).max())
    tolerance = PROBABILITY_TOLERANCE[device.type]
    return Check(f"{cfg.model.backbone}: weights loaded after predicting = fresh model", difference <= tolerance,
                 f"largest probability difference {difference:.1e} on {len(paths)} test rows")


def augmentation_batches(cfg: ExperimentConfig, path: str, workers: int, epochs: int,
                         batches: int) -> list[torch.Tensor]:
    """Every batch of `epochs` epochs of a training loader built as the trainer builds it, over one painting
    repeated `batches` batches' worth: every image of them should differ."""
    transform = build_train_transform(cfg, (0.5,) * 3, (0.5,) * 3, seed=cfg.seed)
    size = cfg.train.batch_size * batches
    loader = make_loader(ImageDataset([path] * size, [0] * size, transform), cfg.train.batch_size, workers,
                         torch.device("cpu"), train=True, seed=cfg.seed)
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


def check_precision(cfg: ExperimentConfig, run_dir: Path, device: torch.device) -> Check:
    """The resolved autocast dtype against the device, the run record and the saved scaler state."""
    dtype = autocast_dtype(cfg.train.amp, cfg.train.amp_dtype, device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        expected = torch.bfloat16 if major >= 8 else torch.float16
        where = f"compute capability {major}.{minor}"
    else:
        expected, where = None, "CPU"
    expected = expected if cfg.train.amp_dtype == "auto" else dtype
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["precision"]["autocast"]
    scaler = torch.load(run_dir / "fold0" / "last.pt", weights_only=True)["scaler"]
    name = str(dtype).removeprefix("torch.") if dtype else "off (float32)"
    passed = dtype == expected and recorded == name and bool(scaler) == (dtype == torch.float16)
    return Check("autocast dtype", passed, f"{where}, amp_dtype {cfg.train.amp_dtype}: autocast {name} (run record: "
                 f"{recorded}), gradient scaler {'on, its state saved' if scaler else 'off'}")


def timed_prediction(predict: PreparedModel, paths: list[str]) -> float:
    """images/s of a second pass over the test images (the first compiled the model and filled the cache)."""
    synchronize(predict.device)
    started = time.perf_counter()
    predict(paths, test=True)
    synchronize(predict.device)
    return len(paths) / (time.perf_counter() - started)


def run_gpucheck(data_root: Path | None, outputs: Path, device: torch.device, overrides: list[str], steps: int,
                 log: Callable[[str], None] = print) -> bool:
    """Train, check and measure; write outputs/gpucheck/report.md. Returns whether every check passed."""
    work = outputs / "gpucheck"
    if data_root is None:
        data_root = work / "data"
        log(f"gpucheck: demo paintings of 1,200-2,200 px in {data_root} (made once)")
        generate_demo_dataset(data_root, seed=0, scale=0.02, min_side=1200, max_side=2200)
    cfg, _ = resolve_config(EXPERIMENT, None, RUN_OVERRIDES + [f"speed.cache_dir={work / 'cache'}"] + overrides)
    data = load_competition_data(data_root, cfg.data.label_fixes, log=lambda _: None)
    cfg = resolved(cfg, data)
    run_outputs = work / "outputs"
    shutil.rmtree(run_outputs, ignore_errors=True)
    reset_peak(device)
    started = time.time()
    run_experiment(cfg, data, run_outputs, work / "submissions", extra_info={"command": "gpucheck"}, log=log)
    log(f"gpucheck: fold run took {time.time() - started:.0f}s")
    peaks = [peak_gib(device)]
    run_dir = run_outputs / cfg.name
    fold_dir = run_dir / "fold0"
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, run_outputs / "folds")
    val_rows = data.train[(folds["fold"] == 0).to_numpy()]
    history = pd.read_csv(fold_dir / "history.csv")
    predict = PreparedModel(cfg, fresh_model(cfg, len(data.classes), fold_dir / "best.pt", data.classes), device,
                        run_outputs)
    checks = [check_fold_predictions(predict, data, fold_dir, validation_set(cfg, val_rows), cfg.train.epochs),
              check_reload_after_predicting(cfg, data, fold_dir, device),
              check_augmentation_streams(cfg, data.train["path"].iloc[0],
                                         max(2, worker_count(cfg.train.num_workers, device))),
              check_precision(cfg, run_dir, device)]
    for check in checks:
        log(f"gpucheck: {check.name}: {'PASS' if check.passed else 'FAIL'} ({check.detail})")
    predict_rate = timed_prediction(predict, data.test["path"].tolist())
    bench = Bench(cfg, data, len(data.train), steps, warmup=0, workers=None, log=lambda _: None, device=device)
    loop = bench.train_loop(bench.cfg, ImageCache(Path(cfg.speed.cache_dir), needed_short_side(cfg), "jpg"))
    peaks.append(peak_gib(device))
    peak = max((p for p in peaks if p is not None), default=None)
    figures = [f"| training: the trainer's epoch over {loop.images} images, {bench.workers} workers, jpg cache "
               f"warm | {loop.images_per_s:,.1f} images/s | {waiting(loop)} |",
               f"| training: fold run, epoch {len(history)} ({len(data.train) - len(val_rows)} images) | "
               f"{history['train_images_per_s'].iloc[-1]:,.1f} images/s | input pipeline: "
               f"{100 * history['data_wait_share'].iloc[-1]:.0f}% of the time |",
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
