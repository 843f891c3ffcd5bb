"""Stratified folds, shared by every experiment: computed once per (data, n_folds, seed) and read back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import UserError
from ..core.files import write_csv
from .competition import TRAIN_COLUMNS, CompetitionData, read_csv


def make_folds(ids: pd.Series, labels: pd.Series, n_folds: int, seed: int) -> np.ndarray:
    """Stratified k-fold assignment (fold index per row), seeded."""
    from sklearn.model_selection import StratifiedKFold

    smallest = labels.value_counts().min()
    if smallest < n_folds:
        rare = labels.value_counts().idxmin()
        raise UserError(f"artist '{rare}' has {smallest} training images, fewer than data.n_folds={n_folds}; "
                        "lower n_folds or add images")
    folds = np.full(len(ids), -1, dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(ids)), labels)):
        folds[val_idx] = fold
    return folds


def shared_folds(data: CompetitionData, n_folds: int, seed: int, folds_dir: Path) -> pd.DataFrame:
    """The fold of every train id, written once per (data, n_folds, seed) and read back by every experiment.

    Folds are stratified on the labels as distributed (before label fixes), so label_fixes never change the
    split itself (only the file's name, which follows the labels in use).
    """
    path = folds_dir / f"folds_k{n_folds}_seed{seed}_{data.fingerprint()}.csv"
    if path.is_file():
        folds = pd.read_csv(path, dtype={"id": str, "fold": int}, keep_default_na=False)
        if list(folds["id"]) != list(data.train["id"]):
            raise UserError(f"{path}: its ids do not match train.csv; delete it to make the folds again")
        return folds
    raw_labels = read_csv(data.root / "train.csv", TRAIN_COLUMNS)["artist"]
    folds = pd.DataFrame({"id": data.train["id"], "artist": raw_labels,
                          "fold": make_folds(data.train["id"], raw_labels, n_folds, seed)})
    write_csv(folds, path)
    return folds
