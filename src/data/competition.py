"""The competition's files under a data root, loaded and checked: train.csv, test.csv, sample_submission.csv, the
images they list (headers only), the known label fixes and the generated style-transfer images.

Every problem found on load stops with one line naming the file, the line and what to do. Line numbers
are the CSV file's own (the header is line 1). docs/bad-input.md lists every case.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..core.errors import UserError
from ..core.files import missing_file_reason
from ..core.layout import TABLE_COLUMNS

TRAIN_COLUMNS = ("id", "img_path", "artist")
TEST_COLUMNS = ("id", "img_path")
SUBMISSION_COLUMNS = ("id", "artist")
STYLE_CSV = "style_transfer.csv"
STYLE_COLUMNS = ("id", "img_path", "artist", "style_source_id", "content_source_id")
MAX_PIXELS_ENV = "ARTIST_MAX_IMAGE_PIXELS"
# Pillow's own decompression-bomb threshold: 256 MiB once decoded as RGB, about 23 times the largest real train
# image (2024x1944). OpenCV's limit (CV_IO_MAX_IMAGE_PIXELS, 2**30) is 12 times higher, so this one acts first.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# The load-time scan enforces the limit itself, with a message that says how to raise it; Pillow's check would
# warn, or fail with a traceback above twice its limit, before the scan sees the size.
Image.MAX_IMAGE_PIXELS = None
RESTORE = "restore the file or remove the row"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# A data root holding this file is the built-in demo dataset (src/demo writes it, with its parameters).
DEMO_MARKER = "DEMO.json"


@dataclass
class CompetitionData:
    root: Path
    train: pd.DataFrame  # id, img_path, artist, path (absolute), width, height (from the header), label (class index)
    test: pd.DataFrame  # id, img_path, path, width, height
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


def read_csv(path: Path, required: tuple[str, ...], log: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """Read a CSV as text (a byte-order mark and stray spaces around values are removed) and check its columns.
    Extra columns are dropped (and logged when `log` is given). The header is read as a plain row so that a row
    with more fields than the header is an error naming its line, not a silent shift of every column."""
    if not path.is_file():
        reason = missing_file_reason(path)
        raise UserError(f"{path}: {'file not found' if reason == 'is not found' else reason}; put the competition "
                        "files in the data root (see README)")
    try:
        rows = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: cannot parse as CSV ({str(exc).strip().splitlines()[0]}); save it as "
                        "comma-separated UTF-8 with quotes around values that hold commas") from None
    columns = [str(c).strip() for c in rows.iloc[0]]
    df = rows.iloc[1:].reset_index(drop=True)
    df.columns = columns
    twice = next((c for c in required if columns.count(c) > 1), None)
    if twice:
        raise UserError(f"{path}: column '{twice}' appears twice in the header; keep one")
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{path}: missing column '{missing[0]}' (found: {', '.join(columns)}); "
                        f"expected columns {', '.join(required)}")
    extra = [c for c in columns if c not in required]
    if extra and log:
        log(f"{path}: ignoring extra columns {', '.join(repr(c) for c in extra)} (only {', '.join(required)} "
            "are used)")
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


def max_image_pixels() -> int:
    """The largest image (width x height) a run accepts: ARTIST_MAX_IMAGE_PIXELS if set, else the default."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive whole number of pixels, e.g. 200000000")
    return limit


def _on_disk(path: Path) -> Path:
    """`path`, or the same file name in the other Unicode normalisation form (NFC/NFD) when only that one exists:
    archives made on macOS hold decomposed (NFD) names while a CSV usually holds composed (NFC) ones."""
    if path.exists():
        return path
    for form in ("NFC", "NFD"):
        other = path.with_name(unicodedata.normalize(form, path.name))
        if other.exists():
            return other
    return path


def _check_image(path: Path, limit: int) -> tuple[Path, Optional[str], int, int]:
    """The file's path on disk, what is wrong with it (None if nothing), and its width and height. Reads the
    header only: the pixel limit is checked before anything is decoded."""
    path = _on_disk(path)
    if not path.is_file():
        return path, f"{missing_file_reason(path)}; {RESTORE}", 0, 0
    if path.stat().st_size == 0:
        return path, f"is an empty (zero-byte) file; {RESTORE}", 0, 0
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        return path, f"is not a readable image ({exc.__class__.__name__}); {RESTORE}", 0, 0
    if width * height > limit:
        return path, (f"is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
                      f"(a decompression bomb?); shrink or remove it, or if it is genuine raise the limit with "
                      f"{MAX_PIXELS_ENV}={width * height}"), width, height
    return path, None, width, height


def _resolve_images(df: pd.DataFrame, csv_path: Path, root: Path) -> pd.DataFrame:
    """Absolute image paths (column path) and sizes from the headers (width, height); every path must stay inside
    the data root and open as an image.

    Inside means lexically (no '..' out of it, no absolute path); symbolic links inside the root are followed,
    so train/ or test/ may link to another disk."""
    root_absolute = Path(os.path.abspath(root))
    paths = []
    for row, rel in zip(df.index, df["img_path"]):
        if not rel:
            raise UserError(f"{csv_path} line {line_of(row)}: empty img_path")
        full = Path(os.path.abspath(root / rel))
        if not full.is_relative_to(root_absolute):
            raise UserError(f"{csv_path} line {line_of(row)}: img_path '{rel}' escapes the data root {root}; "
                            "image paths must be relative paths inside it")
        paths.append(full)
    with ThreadPoolExecutor(max_workers=8) as pool:
        checked = list(pool.map(partial(_check_image, limit=max_image_pixels()), paths))
    for row, rel, (_, problem, _, _) in zip(df.index, df["img_path"], checked):
        if problem:
            raise UserError(f"{csv_path} line {line_of(row)}: image '{rel}' under {root} {problem}")
    return pd.DataFrame({"path": [str(path) for path, *_ in checked], "width": [c[2] for c in checked],
                         "height": [c[3] for c in checked]}, index=df.index)


def _check_label_spellings(train: pd.DataFrame, path: Path) -> None:
    """Two spellings of one name that differ only in Unicode normalisation (e.g. 'é' as one code point or as
    'e' plus an accent) would become two classes that look identical."""
    first_spelling: dict[str, str] = {}
    for artist in train["artist"].unique():
        key = unicodedata.normalize("NFC", artist)
        if first_spelling.setdefault(key, artist) != artist:
            rows = [train.index[train["artist"] == name][0] for name in (first_spelling[key], artist)]
            raise UserError(f"{path} line {line_of(rows[1])}: artist '{artist}' is spelled with other Unicode "
                            f"code points (NFC vs NFD) than at line {line_of(rows[0])}; write every name the "
                            "same way")


def _check_reserved_names(train: pd.DataFrame, path: Path) -> None:
    """An artist is a column of the tables a run writes (its probabilities), beside columns of the run's own."""
    reserved = train.index[train["artist"].isin(TABLE_COLUMNS)]
    if len(reserved):
        raise UserError(f"{path} line {line_of(reserved[0])}: artist '{train.at[reserved[0], 'artist']}' has the "
                        f"name of a column of the tables a run writes ({', '.join(TABLE_COLUMNS)}); rename the "
                        "artist in every row")


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
    style[["path", "width", "height"]] = _resolve_images(style, path, root)
    style["label"] = style["artist"].map({name: i for i, name in enumerate(classes)}).astype(int)
    return style.reset_index(drop=True)


def style_images_for_fold(style: pd.DataFrame, val_ids: set[str]) -> pd.DataFrame:
    """Generated images fold k may train on: neither their style source nor their content source is in fold
    k's validation set, so no validation painting leaks into training through a generated copy."""
    leaks = style["style_source_id"].isin(val_ids) | style["content_source_id"].isin(val_ids)
    return style[~leaks]


def _check_sample_ids(test: pd.DataFrame, sample: pd.DataFrame, test_path: Path) -> None:
    missing = sorted(set(sample["id"]) - set(test["id"]))
    extra = sorted(set(test["id"]) - set(sample["id"]))
    if missing or extra:
        detail = "; ".join(part for part in (
            f"{len(missing)} ids of sample_submission.csv not in test.csv (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} ids of test.csv not in sample_submission.csv (e.g. {extra[0]})" if extra else "",
        ) if part)
        raise UserError(f"{test_path}: test ids differ from sample_submission.csv: {detail}; "
                        "use the two files as distributed")


@dataclass
class TestSet:
    """Images to predict without any training data: test.csv's rows (with sample_submission.csv when there is
    one), or every image of a plain folder (ids = file stems)."""
    root: Path
    images: pd.DataFrame  # id, img_path, path, width, height
    sample_submission: Optional[pd.DataFrame]


def load_test_set(root: str | os.PathLike, log: Callable[[str], None] = print) -> TestSet:
    """The test set under `root`, each image checked as on load (found, readable, under the pixel limit)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data {root}: not a folder; give a folder with test.csv or with the images to predict")
    test_path = root / "test.csv"
    sample = None
    if test_path.is_file():
        images = read_csv(test_path, TEST_COLUMNS, log)
        _check_ids(images, test_path)
        if (root / "sample_submission.csv").is_file():
            sample = read_csv(root / "sample_submission.csv", SUBMISSION_COLUMNS, log)
            _check_ids(sample, root / "sample_submission.csv")
            _check_sample_ids(images, sample, test_path)
    else:
        names = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise UserError(f"--data {root}: no test.csv and no images ({', '.join(IMAGE_SUFFIXES)}) in it; give "
                            "the folder holding test.csv or the images")
        images = pd.DataFrame({"id": [Path(name).stem for name in names], "img_path": names})
        twice = images[images["id"].duplicated(keep=False)]
        if len(twice):
            raise UserError(f"--data {root}: {twice['img_path'].iloc[0]} and {twice['img_path'].iloc[1]} have the "
                            "same id (an image's id is its file name without the extension); rename one")
    listed_in = test_path if test_path.is_file() else root
    images[["path", "width", "height"]] = _resolve_images(images, listed_in, root)
    return TestSet(root, images.reset_index(drop=True), sample)


def load_competition_data(root: str | os.PathLike, label_fixes: Optional[dict[int, str]] = None,
                          log: Callable[[str], None] = print, style_transfer: bool = False) -> CompetitionData:
    root = Path(root)
    train_path, test_path = root / "train.csv", root / "test.csv"
    sample_path = root / "sample_submission.csv"
    train = read_csv(train_path, TRAIN_COLUMNS, log)
    test = read_csv(test_path, TEST_COLUMNS, log)
    sample = read_csv(sample_path, SUBMISSION_COLUMNS, log)
    if train.empty:
        raise UserError(f"{train_path}: no rows; it must list the training images")
    _check_ids(train, train_path)
    _check_ids(test, test_path)
    _check_ids(sample, sample_path)
    empty_label = train.index[train["artist"] == ""]
    if len(empty_label):
        raise UserError(f"{train_path} line {line_of(empty_label[0])}: empty artist label; "
                        "fill it in or remove the row")
    _check_label_spellings(train, train_path)
    _check_reserved_names(train, train_path)
    _check_sample_ids(test, sample, test_path)
    classes = sorted(train["artist"].unique())
    for note in _apply_label_fixes(train, label_fixes or {}, classes):
        log(note)
    train[["path", "width", "height"]] = _resolve_images(train, train_path, root)
    test[["path", "width", "height"]] = _resolve_images(test, test_path, root)
    train["label"] = train["artist"].map({name: i for i, name in enumerate(classes)}).astype(int)
    solution = None
    if (root / "solution.csv").is_file():
        solution = read_csv(root / "solution.csv", SUBMISSION_COLUMNS)
    style = load_style_images(root, train, classes) if style_transfer else None
    return CompetitionData(root=root, train=train.reset_index(drop=True), test=test.reset_index(drop=True),
                           sample_submission=sample, classes=classes, is_demo=(root / DEMO_MARKER).is_file(),
                           solution=solution, style=style)
