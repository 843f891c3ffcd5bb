"""Predict a test set from saved fold checkpoints, with no training data (`bash run.sh predict NAME --data DIR`).

A model is what `OUTPUTS/NAME/config.yaml` names: an experiment (its folds' best.pt), a TTA run (its source's
checkpoints, predicted with its TTA) or an ensemble (its members, combined as `bash run.sh ensemble` does). The
probabilities equal those the experiment wrote to its test_probs.csv for the same images: the same transform,
image cache, batch size and fold average.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from ..core.errors import UserError
from ..core.files import write_csv
from ..core.layout import ExperimentDir, read_saved
from ..core.runtime import select_device
from ..core.schema import ExperimentConfig
from ..data.competition import TestSet, load_test_set
from ..data.image_cache import cache_for
from ..inference.predictor import Predictor
from ..inference.probabilities import probs_frame
from ..inference.voting import combine
from ..model.checkpoints import read_checkpoint
from .submission import submission_from_probs, write_submission


@dataclass
class FoldModels:
    """One experiment's fold checkpoints and how to predict with them."""
    name: str
    cfg: ExperimentConfig
    tta: str
    checkpoints: list[Path]
    config_path: Path


@dataclass
class SavedModel:
    """An experiment (one member) or an ensemble of several, with the weights and method that combine them."""
    name: str
    members: list[FoldModels]
    weights: list[float]
    method: str = "soft"
    config_path: Optional[Path] = None  # the ensemble's own config


def fold_models(outputs: Path, name: str, tta: Optional[str] = None) -> FoldModels:
    """An experiment's (or a TTA run's) resolved config and fold checkpoints; `tta` overrides the run's own."""
    saved = read_saved(outputs / name)
    if saved.kind == "ensemble":
        raise UserError(f"{name} is an ensemble; an ensemble member must be an experiment")
    cfg = saved.fine_tuned("predict and export")
    checkpoints = []
    for fold in range(cfg.data.n_folds):
        own, from_source = (ExperimentDir(outputs / run).fold(fold).best for run in (name, saved.source))
        checkpoint = own if own.is_file() else from_source
        if not checkpoint.is_file():
            raise UserError(f"{checkpoint} not found; finish {saved.source}'s folds first (bash run.sh "
                            f"{saved.source})")
        checkpoints.append(checkpoint)
    return FoldModels(name, cfg, tta or saved.tta, checkpoints, ExperimentDir(outputs / name).config)


def load_saved_model(outputs: Path, name: str, tta: Optional[str] = None) -> SavedModel:
    """What `OUTPUTS/NAME/config.yaml` describes: an experiment, a TTA run or an ensemble of them."""
    saved = read_saved(outputs / name)
    if saved.kind != "ensemble":
        return SavedModel(name, [fold_models(outputs, name, tta)], [1.0])
    members = [fold_models(outputs, member, tta) for member in saved.members]
    return SavedModel(name, members, saved.member_weights(), saved.method, ExperimentDir(outputs / name).config)


def fold_probs(models: FoldModels, test: TestSet, cache_dir: Path, device: torch.device,
               weights_dtype: Optional[torch.dtype] = None, rows: Optional[slice] = None,
               log: Callable[[str], None] = print) -> tuple[np.ndarray, list[str]]:
    """Probabilities of every fold model for the test images, shape (folds, images, classes), and the artists.
    `weights_dtype` rounds the weights through that dtype first (the half-precision check)."""
    cfg = models.cfg
    cache = cache_for(cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"cache_dir": str(cache_dir)})}),
                      cache_dir)
    images = test.images if rows is None else test.images.iloc[rows]
    classes = read_checkpoint(models.checkpoints[0]).get("classes") or []
    predictor = Predictor.for_checkpoints(cfg, len(classes), device, tta=models.tta, cache=cache)
    loader = predictor.loader(predictor.dataset(images["path"], test=True))
    per_fold = []
    for checkpoint in models.checkpoints:
        predictor.load(checkpoint, classes, weights_dtype)
        per_fold.append(predictor.probs(loader, desc=f"{models.name} {checkpoint.parent.name}")[0])
    if weights_dtype is None:
        log(f"{models.name}: predicted {len(images)} images with {len(per_fold)} fold models"
            + (f" and {models.tta} TTA" if models.tta != "none" else ""))
    return np.stack(per_fold), classes


def predict(model: SavedModel, test: TestSet, cache_dir: Path, log: Callable[[str], None] = print
            ) -> pd.DataFrame:
    """id and one probability column per artist: the fold average of each member, combined as the ensemble says."""
    device = select_device()
    member_probs, classes = [], None
    for member in model.members:
        probs, member_classes = fold_probs(member, test, cache_dir, device, log=log)
        if classes is not None and member_classes != classes:
            raise UserError(f"{member.name} was trained on other artists than {model.members[0].name}; "
                            "an ensemble needs members trained on the same data")
        classes = member_classes
        member_probs.append(probs.astype(np.float64).mean(axis=0))
    combined = combine(np.stack(member_probs), np.asarray(model.weights), model.method)
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
    model = load_saved_model(outputs, name, tta)
    test = load_test_set(data, log=log)
    what = "sample_submission.csv" if test.sample_submission is not None else "the test set's order"
    log(f"{name}: predicting {len(test.images)} images of {data} ({what}) with "
        f"{', '.join(m.name for m in model.members)}")
    probs = predict(model, test, cache_dir or outputs / "cache" / "images", log)
    write_prediction(probs, test, out, log)
    log(f"{name}: done in {time.time() - started:.0f}s")
    return probs


def command_predict(args: argparse.Namespace) -> None:
    from .resolve import log

    out = Path(args.out) if args.out else Path(args.submissions) / f"{args.name}-predict.csv"
    run_predict(Path(args.outputs), args.name, Path(args.data), out, args.tta,
                Path(args.cache_dir) if args.cache_dir else None, log=log)
