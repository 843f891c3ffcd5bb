"""The competition's files under a data root: loading with validation, label fixes, shared folds, and the
torch Dataset that reads images.

Every problem found on load stops with one line naming the file, the line and what to do. Line numbers
are the CSV file's own (the header is line 1).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from torch.utils.data import DataLoader

from .demo_data import DEMO_MARKER
from .errors import UserError
from .io_utils import write_csv

TRAIN_COLUMNS = ("id", "img_path", "artist")
TEST_COLUMNS = ("id", "img_path")
SUBMISSION_COLUMNS = ("id", "artist")
STYLE_CSV = "style_transfer.csv"
STYLE_COLUMNS = ("id", "img_path", "artist", "style_source_id", "content_source_id")


@dataclass
class CompetitionData:
    root: Path
    train: pd.DataFrame  # id, img_path, artist, path (absolute), label (class index)
    test: pd.DataFrame  # id, img_path, path
    sample_submission: pd.DataFrame
    classes: list[str]
    is_demo: bool
    solution: Optional[pd.DataFrame]  # demo data only: the true artist of every test id
    style: Optional[pd.DataFrame] = None  # generated training images (style_transfer.csv), when asked for

    def fingerprint(self, with_style: bool = False) -> str:
        """Identifies the train labels and images listed (and the generated images, if asked), so results from
        other data are never reused. Folds are keyed by the train part alone."""
        frames = [self.train[list(TRAIN_COLUMNS)]]
        if with_style and self.style is not None:
            frames.append(self.style[list(STYLE_COLUMNS)])
        payload = "\n".join(",".join(row) for frame in frames for row in frame.itertuples(index=False))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def line_of(row_index: int) -> int:
    """CSV line of a DataFrame row (line 1 is the header)."""
    return int(row_index) + 2


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as text (a byte-order mark and stray spaces around values are removed) and check its columns."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; put the competition files in the data root (see README)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: cannot parse as CSV ({str(exc).strip().splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column '{missing[0]}' (found: {', '.join(df.columns)}); "
                        f"expected columns {', '.join(required)}")
    df = df[list(required)].copy()
    for column in required:
        df[column] = df[column].str.strip()
    return df


def _check_ids(df: pd.DataFrame, path: Path) -> None:
    empty = df.index[df["id"] == ""]
    if len(empty):
        raise UserError(f"{path} line {line_of(empty[0])}: empty id; every row needs an id")
    duplicated = df.index[df["id"].duplicated()]
    if len(duplicated):
        row = duplicated[0]
        first = df.index[df["id"] == df.at[row, "id"]][0]
        raise UserError(f"{path} line {line_of(row)}: duplicate id '{df.at[row, 'id']}' "
                        f"(first at line {line_of(first)}); ids must be unique")


def _image_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return "not found"
    if path.stat().st_size == 0:
        return "is an empty (zero-byte) file"
    try:
        Image.open(path).close()  # reads and checks the header only
    except (UnidentifiedImageError, OSError) as exc:
        return f"is not a readable image ({exc.__class__.__name__})"
    return None


def _resolve_images(df: pd.DataFrame, csv_path: Path, root: Path) -> pd.Series:
    """Absolute image paths; every path must stay inside the data root and open as an image."""
    root_resolved = root.resolve()
    paths = []
    for row, rel in zip(df.index, df["img_path"]):
        if not rel:
            raise UserError(f"{csv_path} line {line_of(row)}: empty img_path")
        full = (root / rel).resolve()
        if not full.is_relative_to(root_resolved):
            raise UserError(f"{csv_path} line {line_of(row)}: img_path '{rel}' escapes the data root {root}; "
                            "image paths must be relative paths inside it")
        paths.append(full)
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = list(pool.map(_image_problem, paths))
    for row, rel, problem in zip(df.index, df["img_path"], problems):
        if problem:
            raise UserError(f"{csv_path} line {line_of(row)}: image '{rel}' {problem} under {root}; "
                            "restore the file or remove the row")
    return pd.Series([str(p) for p in paths], index=df.index)


def _apply_label_fixes(train: pd.DataFrame, label_fixes: dict[int, str], classes: list[str]) -> list[str]:
    """Correct known noisy labels; returns a note per fix for the log."""
    notes = []
    for train_id, artist in label_fixes.items():
        rows = train.index[train["id"] == str(train_id)]
        if not len(rows):
            notes.append(f"label fix for id {train_id} skipped: no such id in train.csv")
            continue
        if artist not in classes:
            raise UserError(f"data.label_fixes: id {train_id} -> '{artist}' is not an artist in train.csv; "
                            "fix the name in the config")
        old = train.at[rows[0], "artist"]
        train.at[rows[0], "artist"] = artist
        notes.append(f"label fix: id {train_id} '{old}' -> '{artist}'")
    return notes


def load_style_images(root: Path, train: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The generated images of style_transfer.csv, checked like train.csv; their sources must be train ids."""
    path = root / STYLE_CSV
    if not path.is_file():
        raise UserError(f"data.style_transfer is on but {path} does not exist; generate the style-transfer images "
                        f"first (bash run.sh style --rarest 11 --per-artist 5) or turn data.style_transfer off")
    style = read_csv(path, STYLE_COLUMNS)
    _check_ids(style, path)
    known_ids = set(train["id"])
    for column in ("style_source_id", "content_source_id"):
        unknown = style.index[~style[column].isin(known_ids)]
        if len(unknown):
            raise UserError(f"{path} line {line_of(unknown[0])}: {column} '{style.at[unknown[0], column]}' is not a "
                            "train id; regenerate the style-transfer images for this data")
    unknown = style.index[~style["artist"].isin(classes)]
    if len(unknown):
        raise UserError(f"{path} line {line_of(unknown[0])}: artist '{style.at[unknown[0], 'artist']}' is not in "
                        "train.csv")
    style["path"] = _resolve_images(style, path, root)
    style["label"] = style["artist"].map({name: i for i, name in enumerate(classes)}).astype(int)
    return style.reset_index(drop=True)


def style_images_for_fold(style: pd.DataFrame, val_ids: set[str]) -> pd.DataFrame:
    """Generated images fold k may train on: neither their style source nor their content source is in fold
    k's validation set, so no validation painting leaks into training through a generated copy."""
    leaks = style["style_source_id"].isin(val_ids) | style["content_source_id"].isin(val_ids)
    return style[~leaks]


def load_competition_data(root: str | os.PathLike, label_fixes: Optional[dict[int, str]] = None,
                          log: Callable[[str], None] = print, style_transfer: bool = False) -> CompetitionData:
    root = Path(root)
    train_path, test_path = root / "train.csv", root / "test.csv"
    sample_path = root / "sample_submission.csv"
    train = read_csv(train_path, TRAIN_COLUMNS)
    test = read_csv(test_path, TEST_COLUMNS)
    sample = read_csv(sample_path, SUBMISSION_COLUMNS)
    if train.empty:
        raise UserError(f"{train_path}: no rows; it must list the training images")
    _check_ids(train, train_path)
    _check_ids(test, test_path)
    _check_ids(sample, sample_path)
    empty_label = train.index[train["artist"] == ""]
    if len(empty_label):
        raise UserError(f"{train_path} line {line_of(empty_label[0])}: empty artist label; "
                        "fill it in or remove the row")
    missing = sorted(set(sample["id"]) - set(test["id"]))
    extra = sorted(set(test["id"]) - set(sample["id"]))
    if missing or extra:
        detail = "; ".join(part for part in (
            f"{len(missing)} ids of sample_submission.csv not in test.csv (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} ids of test.csv not in sample_submission.csv (e.g. {extra[0]})" if extra else "",
        ) if part)
        raise UserError(f"{test_path}: test ids differ from {sample_path.name}: {detail}; "
                        "use the two files as distributed")
    classes = sorted(train["artist"].unique())
    for note in _apply_label_fixes(train, label_fixes or {}, classes):
        log(note)
    train["path"] = _resolve_images(train, train_path, root)
    test["path"] = _resolve_images(test, test_path, root)
    train["label"] = train["artist"].map({name: i for i, name in enumerate(classes)}).astype(int)
    solution = None
    if (root / "solution.csv").is_file():
        solution = read_csv(root / "solution.csv", SUBMISSION_COLUMNS)
    style = load_style_images(root, train, classes) if style_transfer else None
    return CompetitionData(root=root, train=train.reset_index(drop=True), test=test.reset_index(drop=True),
                           sample_submission=sample, classes=classes, is_demo=(root / DEMO_MARKER).is_file(),
                           solution=solution, style=style)


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


def read_image(path: str, reduce: int = 1) -> np.ndarray:
    """Decode an image file to RGB uint8 (greyscale is expanded, alpha dropped), optionally `reduce` (2, 4 or 8)
    times smaller at decode time, which is faster; raises UserError if it fails."""
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror}); restore it or remove its row") from None
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    image = cv2.imdecode(buffer, flags) if buffer.size else None
    if image is None:
        raise UserError(f"{path}: cannot decode the image (corrupt or unsupported); replace it or remove its row")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageDataset:
    """(image tensor, label) pairs; label is -1 where unknown (test)."""

    def __init__(self, paths: list[str], labels: Optional[list[int]], transform: Callable):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_image(self.paths[index])
        return self.transform(image=image)["image"], self.labels[index]


def make_loader(dataset: ImageDataset, batch_size: int, workers: int, device: torch.device, train: bool,
                seed: int = 0, sampler=None) -> DataLoader:
    """Training loaders shuffle (or draw from `sampler`) and drop the last incomplete batch; others keep order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      drop_last=train and len(dataset) > batch_size,
                      generator=torch.Generator().manual_seed(seed) if train and sampler is None else None)
