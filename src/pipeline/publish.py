"""Publishing an experiment once every fold is done: the OOF table (every validation row, each predicted by the fold
that held it out), the fold-averaged test probabilities, the validated submission and the run's last line."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..core.errors import UserError
from ..core.files import write_csv
from ..core.layout import ExperimentDir
from ..core.metrics import painting_scores, scores, solution_f1
from ..core.schema import ExperimentConfig
from ..data.competition import CompetitionData
from ..data.geometry import validation_set
from ..inference.probabilities import read_probs
from .submission import submission_from_probs, write_submission


def assemble_oof(out_dir: Path, data: CompetitionData, folds: pd.DataFrame, fold_ids: list[int],
                 cfg: ExperimentConfig, remedy: str) -> pd.DataFrame:
    """One row per validation row (a whole painting, or one of its crops): id, crop (-1 for the whole painting),
    fold, artist (true), pred, one probability column per artist; in train.csv's order, crops in order. `remedy`:
    what the message says to do when the folds' predictions do not cover the validation rows."""
    experiment = ExperimentDir(out_dir)
    parts = pd.concat([read_probs(experiment.fold(k).val_probs) for k in fold_ids])
    expected = validation_set(cfg, data.train)
    index = pd.MultiIndex.from_arrays([expected.ids, expected.crops], names=["id", "crop"])
    keys = pd.MultiIndex.from_frame(parts[["id", "crop"]])
    if keys.has_duplicates or len(keys) != len(index) or not keys.isin(index).all():
        raise UserError(f"{out_dir}: fold predictions do not cover every validation row ({expected.describe()}) "
                        f"exactly once; {remedy}")
    probs = parts.set_index(["id", "crop"]).reindex(index)[data.classes].to_numpy()
    fold_of = dict(zip(folds["id"], folds["fold"]))
    artist_of = dict(zip(data.train["id"], data.train["artist"]))
    oof = pd.DataFrame({"id": expected.ids, "crop": expected.crops, "fold": [fold_of[i] for i in expected.ids],
                        "artist": [artist_of[i] for i in expected.ids],
                        "pred": np.asarray(data.classes)[probs.argmax(axis=1)]})
    return pd.concat([oof, pd.DataFrame(probs, columns=data.classes)], axis=1)


def mean_test_probs(out_dir: Path, data: CompetitionData, fold_ids: list[int]) -> pd.DataFrame:
    experiment = ExperimentDir(out_dir)
    per_fold = [pd.read_csv(experiment.fold(k).test_probs, dtype={"id": str}).set_index("id")
                .reindex(data.test["id"])[data.classes].to_numpy() for k in fold_ids]
    frame = pd.DataFrame(np.mean(per_fold, axis=0), columns=data.classes)
    frame.insert(0, "id", data.test["id"].to_numpy())
    return frame


def publish(name: str, out_dir: Path, oof: pd.DataFrame, test_probs: pd.DataFrame, data: CompetitionData,
            submissions: Path, started: float, log: Callable[[str], None] = print) -> dict[str, float]:
    """Write oof.csv, test_probs.csv and the validated submission; log the scores as the last line: the CV, and
    against solution.csv when the data root has one (the demo data's true test labels)."""
    experiment = ExperimentDir(out_dir)
    write_csv(oof, experiment.oof)
    write_csv(test_probs, experiment.test_probs)
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
        which = "demo test" if data.is_demo else "test (solution.csv)"
        summary += f" | {which} macro F1 {result['test_macro_f1']:.4f} ({len(submission)} crops, solution.csv)"
    log(f"wrote {experiment.oof}, {experiment.test_probs}, {submission_path}")
    log(f"{summary} | {(time.time() - started) / 60:.1f} min")
    return result
