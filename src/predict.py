"""Predict a test set from saved fold checkpoints, with no training data, and export an experiment or an ensemble
as one folder (and .zip) that predicts offline with the pinned packages alone: what a competitor uploads as a
Kaggle dataset for a code competition's offline kernel.

A model is what `OUTPUTS/NAME/config.yaml` names: an experiment (its folds' best.pt), a TTA run (its source's
checkpoints, predicted with its TTA) or an ensemble (its members, combined as `bash run.sh ensemble` does). The
probabilities equal those the experiment wrote to its test_probs.csv for the same images: the same transform,
image cache, batch size and fold average.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
import yaml

from .config import ExperimentConfig, run_info
from .data import TestSet, load_test_set
from .distributed import SINGLE_PROCESS
from .ensemble import combine
from .errors import UserError
from .image_cache import cache_for
from .inference import predict_probs, probs_frame
from .io_utils import atomic_path, save_torch, write_csv, write_json, write_text
from .loader import ImageDataset
from .models import build_model, load_checkpoint, load_weights, normalisation, read_checkpoint
from .runtime import select_device, worker_count
from .submission import submission_from_probs, write_submission
from .train import eval_loader, prepare_model, uses_channels_last
from .transforms import build_eval_transform
from .tta import with_tta

REPO = Path(__file__).resolve().parent.parent
CODE = ("src", "configs", "ensemble", "run.sh", "requirements.txt")  # what a bundle carries besides the models
MODELS_DIR = "models"
FP16_TOLERANCE = 1e-3  # largest change of any probability that half-precision weights may cause
FP16_CHECK_IMAGES = 64


@dataclass
class FoldModels:
    """One experiment's fold checkpoints and how to predict with them."""
    name: str
    cfg: ExperimentConfig
    tta: str
    checkpoints: list[Path]
    config_path: Path


@dataclass
class Predictor:
    """An experiment (one member) or an ensemble of several, with the weights and method that combine them."""
    name: str
    members: list[FoldModels]
    weights: list[float]
    method: str = "soft"
    config_path: Optional[Path] = None  # the ensemble's own config


def _saved(outputs: Path, name: str) -> tuple[Path, dict]:
    path = outputs / name / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found; run {name} first (bash run.sh {name}), or point --outputs at the folder "
                        "that holds it")
    return path, yaml.safe_load(path.read_text(encoding="utf-8"))


def fold_models(outputs: Path, name: str, tta: Optional[str] = None) -> FoldModels:
    """An experiment's (or a TTA run's) resolved config and fold checkpoints; `tta` overrides the run's own."""
    path, saved = _saved(outputs, name)
    if "members" in saved:
        raise UserError(f"{name} is an ensemble; an ensemble member must be an experiment")
    source = saved["parent"] if "tta" in saved else name
    cfg = ExperimentConfig.model_validate(saved["source_config"] if "tta" in saved else
                                          {k: v for k, v in saved.items() if k != "run"})
    if cfg.frozen:
        raise UserError(f"{name} is a frozen-feature experiment (a {cfg.frozen.classifier} classifier, no fold "
                        "networks); predict and export need a fine-tuned experiment")
    checkpoints = []
    for fold in range(cfg.data.n_folds):
        own, from_source = (outputs / run / f"fold{fold}" / "best.pt" for run in (name, source))
        checkpoint = own if own.is_file() else from_source
        if not checkpoint.is_file():
            raise UserError(f"{checkpoint} not found; finish {source}'s folds first (bash run.sh {source})")
        checkpoints.append(checkpoint)
    return FoldModels(name, cfg, tta or saved.get("tta", "none"), checkpoints, path)


def load_predictor(outputs: Path, name: str, tta: Optional[str] = None) -> Predictor:
    """What `OUTPUTS/NAME/config.yaml` describes: an experiment, a TTA run or an ensemble of them."""
    path, saved = _saved(outputs, name)
    if "members" not in saved:
        return Predictor(name, [fold_models(outputs, name, tta)], [1.0])
    members = [fold_models(outputs, member, tta) for member in saved["members"]]
    if saved.get("weights") == "fit":
        weights = saved["fitted"]["test_weights"]
    else:
        weights = saved.get("weights") or [1.0] * len(members)
    return Predictor(name, members, [float(w) for w in weights], saved.get("method", "soft"), path)


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict with its floating-point tensors in `dtype` (integer buffers such as BN's counters unchanged)."""
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}


def fold_probs(models: FoldModels, test: TestSet, cache_dir: Path, device: torch.device,
               weights_dtype: Optional[torch.dtype] = None, rows: Optional[slice] = None,
               log: Callable[[str], None] = print) -> tuple[np.ndarray, list[str]]:
    """Probabilities of every fold model for the test images, shape (folds, images, classes), and the artists.
    `weights_dtype` rounds the weights through that dtype first (the half-precision check)."""
    cfg = models.cfg
    cache = cache_for(cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"cache_dir": str(cache_dir)})}),
                      cache_dir)
    workers = worker_count(cfg.train.num_workers, device)
    images = test.images if rows is None else test.images.iloc[rows]
    classes = read_checkpoint(models.checkpoints[0]).get("classes") or []
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), len(classes))  # one network, every fold
    mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
    dataset = ImageDataset(images["path"], None, build_eval_transform(cfg, mean, std, test=True), cache=cache)
    # prepared (and compiled, where configured) once: each fold's weights are loaded into the same parameters
    predictor = with_tta(prepare_model(model.to(device), cfg, device, SINGLE_PROCESS)[1], models.tta)
    per_fold = []
    for checkpoint in models.checkpoints:
        load_checkpoint(model, checkpoint, classes, cfg.model.backbone)
        if weights_dtype is not None:
            load_weights(model, cast_floating(model.state_dict(), weights_dtype))
        probs, _ = predict_probs(predictor, eval_loader(dataset, cfg, device, workers, SINGLE_PROCESS), device,
                                 cfg.train.amp, cfg.train.amp_dtype, desc=f"{models.name} {checkpoint.parent.name}",
                                 channels_last=uses_channels_last(cfg, device))
        per_fold.append(probs)
    if weights_dtype is None:
        log(f"{models.name}: predicted {len(images)} images with {len(per_fold)} fold models"
            + (f" and {models.tta} TTA" if models.tta != "none" else ""))
    return np.stack(per_fold), classes


def predict(predictor: Predictor, test: TestSet, cache_dir: Path, log: Callable[[str], None] = print
            ) -> pd.DataFrame:
    """id and one probability column per artist: the fold average of each member, combined as the ensemble says."""
    device = select_device()
    member_probs, classes = [], None
    for member in predictor.members:
        probs, member_classes = fold_probs(member, test, cache_dir, device, log=log)
        if classes is not None and member_classes != classes:
            raise UserError(f"{member.name} was trained on other artists than {predictor.members[0].name}; "
                            "an ensemble needs members trained on the same data")
        classes = member_classes
        member_probs.append(probs.astype(np.float64).mean(axis=0))
    combined = combine(np.stack(member_probs), np.asarray(predictor.weights), predictor.method)
    return probs_frame(test.images["id"], combined, classes)


def write_prediction(probs: pd.DataFrame, test: TestSet, out: Path, log: Callable[[str], None] = print) -> Path:
    """The validated submission (in sample_submission's order when there is one, else the test set's) and the
    probabilities beside it (NAME_probs.csv)."""
    classes = list(probs.columns[1:])
    sample = test.sample_submission if test.sample_submission is not None else test.images[["id"]]
    write_submission(submission_from_probs(probs, sample, classes), out, sample, classes)
    probs_path = out.with_name(f"{out.stem}_probs.csv")
    write_csv(probs, probs_path)
    log(f"wrote {out} ({len(probs)} images) and {probs_path}")
    return probs_path


def run_predict(outputs: Path, name: str, data: Path, out: Path, tta: Optional[str], cache_dir: Optional[Path],
                log: Callable[[str], None] = print) -> pd.DataFrame:
    started = time.time()
    predictor = load_predictor(outputs, name, tta)
    test = load_test_set(data, log=log)
    what = "sample_submission.csv" if test.sample_submission is not None else "the test set's order"
    log(f"{name}: predicting {len(test.images)} images of {data} ({what}) with "
        f"{', '.join(m.name for m in predictor.members)}")
    probs = predict(predictor, test, cache_dir or outputs / "cache" / "images", log)
    write_prediction(probs, test, out, log)
    log(f"{name}: done in {time.time() - started:.0f}s")
    return probs


# ----- export -----

def half_precision_change(models: FoldModels, test: TestSet, cache_dir: Path) -> float:
    """The largest change of any predicted probability (the fold average, as `predict` writes it) when the fold
    models' weights are rounded to float16, measured on up to FP16_CHECK_IMAGES test images.

    Both sides compute in float32 (autocast off), as the bundle does on an offline CPU: under a GPU's bfloat16
    autocast both would be rounded alike on the way in, and any weights would pass."""
    device = select_device()
    rows = slice(0, FP16_CHECK_IMAGES)
    models = replace(models, cfg=models.cfg.model_copy(update={
        "train": models.cfg.train.model_copy(update={"amp": False})}))
    full, _ = fold_probs(models, test, cache_dir, device, weights_dtype=torch.float32, rows=rows)
    half, _ = fold_probs(models, test, cache_dir, device, weights_dtype=torch.float16, rows=rows)
    return float(np.abs(full.astype(np.float64).mean(axis=0) - half.astype(np.float64).mean(axis=0)).max())


def _weights_only(checkpoint: Path, dtype: torch.dtype) -> dict:
    saved = read_checkpoint(checkpoint)
    return {"model": cast_floating(saved["model"], dtype), "classes": saved["classes"], "backbone": saved["backbone"],
            "epoch": saved.get("epoch"), "val_macro_f1": saved.get("val_macro_f1")}


ENTRY = '''"""Predict with the exported models, offline:

    python predict.py --data DIR [--out submission.csv] [--tta hflip|flips|d4]

DIR holds test.csv (id, img_path) and, when there is one, sample_submission.csv; or it is a folder of images.
Needs only the packages of requirements.txt.
"""
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for its version on import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from src.cli import main  # noqa: E402

if __name__ == "__main__":
    defaults = ["--out", "submission.csv", "--cache-dir", os.path.join(tempfile.gettempdir(), "artist-image-cache")]
    sys.exit(main(["predict", {name!r}, "--outputs", os.path.join(HERE, "models"), *defaults, *sys.argv[1:]]))
'''


def _copy_code(bundle: Path) -> None:
    for item in CODE:
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, bundle / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            shutil.copy2(source, bundle / item)


def _zip(folder: Path, path: Path) -> None:
    """The folder as a .zip: code and configs deflated, checkpoints stored (weights barely compress, and
    deflating them takes seconds per fold)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder),
                              compress_type=zipfile.ZIP_STORED if file.suffix == ".pt" else zipfile.ZIP_DEFLATED)


def run_export(outputs: Path, name: str, data: Optional[Path], precision: str, out_dir: Path,
               log: Callable[[str], None] = print) -> Path:
    """OUT/NAME/ (models/, code, predict.py, manifest.json) and OUT/NAME.zip. With precision 'auto' the weights are
    stored in float16 where that changes no probability by more than FP16_TOLERANCE on the test images of `data`
    (the experiment's own data root when not given), in float32 otherwise."""
    predictor = load_predictor(outputs, name)
    data = data or Path(yaml.safe_load(predictor.members[0].config_path.read_text())["run"]["data_root"])
    test = load_test_set(data, log=log) if precision == "auto" else None
    bundle = out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    manifest = {"name": name, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": run_info()["git_commit"],
                "method": predictor.method, "weights": predictor.weights, "members": {}}
    try:
        for member in predictor.members:
            dtype, change = torch.float32, None
            if precision == "fp16":
                dtype = torch.float16
            elif precision == "auto":
                change = half_precision_change(member, test, staging / "cache")
                dtype = torch.float16 if change <= FP16_TOLERANCE else torch.float32
            target = staging / MODELS_DIR / member.name
            target.mkdir(parents=True)
            shutil.copy2(member.config_path, target / "config.yaml")
            for fold, checkpoint in enumerate(member.checkpoints):
                save_torch(_weights_only(checkpoint, dtype), target / f"fold{fold}" / "best.pt")
            stored = "float16" if dtype == torch.float16 else "float32"
            measured = "" if change is None else f" (float16 changes a probability by at most {change:.1e} on " \
                f"{min(len(test.images), FP16_CHECK_IMAGES)} test images; limit {FP16_TOLERANCE:g})"
            log(f"export {name}: {member.name}: {len(member.checkpoints)} fold checkpoints in {stored}{measured}")
            manifest["members"][member.name] = {"weights": stored, "max_probability_change_fp16": change,
                                                "folds": len(member.checkpoints), "tta": member.tta}
        if predictor.config_path is not None:  # an ensemble: its members, weights and method
            (staging / MODELS_DIR / name).mkdir()
            shutil.copy2(predictor.config_path, staging / MODELS_DIR / name / "config.yaml")
        shutil.rmtree(staging / "cache", ignore_errors=True)
        _copy_code(staging)
        write_text(ENTRY.format(name=name), staging / "predict.py")
        write_json(manifest, staging / "manifest.json")
        if bundle.exists():
            shutil.rmtree(bundle)
        staging.rename(bundle)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _zip(bundle, out_dir / f"{name}.zip")
    size = (out_dir / f"{name}.zip").stat().st_size / 2**20
    log(f"export {name}: wrote {bundle}/ and {out_dir / f'{name}.zip'} ({size:.1f} MiB); offline: "
        f"python predict.py --data DIR --out submission.csv")
    return bundle
