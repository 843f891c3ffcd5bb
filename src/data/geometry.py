"""How the test images relate to the train images, measured from their sizes, and the validation crops that
imitate them.

The test images are crops of paintings that are not in train, but come from the same collection, so the train
paintings stand in for theirs. If a crop covers a share f of its painting's area, then log(test area) =
log(f) + log(painting area). The mean of log f is the difference of the two sets' mean log areas, and its variance
is what the test set's log-area variance has beyond the train set's (the crop share and the painting's size are
independent). Only the image headers are read, and the load-time scan reads them anyway.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

# Spread of a validation crop's aspect against its painting's: the width share is multiplied by exp(U(-a, a)).
ASPECT_JITTER = 0.15
# The quartiles of a normal distribution are its mean +- this many standard deviations.
QUARTILE_Z = 0.6745


@dataclass(frozen=True)
class CropGeometry:
    """The share of a painting's area a test image covers: its median and quartiles (log-normal fit)."""
    area_share: float
    area_share_low: float
    area_share_high: float
    train_images: int
    test_images: int

    @property
    def side_share(self) -> float:
        """The share of a painting's side a test image spans: the square root of the area share."""
        return math.sqrt(self.area_share)

    @property
    def mimic_scale(self) -> float:
        """augment.mimic_scale that makes a size x size training crop cover the test images' share of a painting:
        the painting is resized to mimic_scale x size on both sides."""
        return 1.0 / self.side_share

    def summary(self) -> str:
        return (f"test geometry: a test image covers about {self.area_share:.0%} of a painting's area (quartiles "
                f"{self.area_share_low:.0%}-{self.area_share_high:.0%}, {self.side_share:.2f} of its sides), "
                f"measured from the sizes of {self.test_images:,} test and {self.train_images:,} train images; "
                f"augment.mimic_scale=auto means {self.mimic_scale:.2f}")


def measure_test_geometry(train: pd.DataFrame, test: pd.DataFrame) -> CropGeometry:
    """Estimate the crop share from the `width` and `height` of the train and test images (see the module text).
    Shares are capped at 1: test images as large as the paintings are treated as whole paintings."""
    log_train = np.log(train["width"].to_numpy(float) * train["height"].to_numpy(float))
    log_test = np.log(test["width"].to_numpy(float) * test["height"].to_numpy(float))
    mean = log_test.mean() - log_train.mean()
    spread = math.sqrt(max(0.0, log_test.var() - log_train.var()))
    share = lambda z: float(min(1.0, math.exp(mean + z * spread)))  # noqa: E731
    return CropGeometry(share(0.0), share(-QUARTILE_Z), share(QUARTILE_Z), len(train), len(test))


def validation_crops(ids: Sequence[str], crops_per_image: int, area_share: tuple[float, float],
                     seed: int) -> np.ndarray:
    """Relative boxes (x0, y0, x1, y1 as shares of width and height), crops_per_image per id in order: image i's
    crop j is row i * crops_per_image + j.

    Each crop's area share is drawn log-uniformly from `area_share`, its aspect varies by ASPECT_JITTER around the
    painting's, and its position is uniform. A crop depends only on (seed, id, j), so every experiment validates
    on the same crops, whatever the image's size or cached copy."""
    low, high = area_share
    boxes = np.empty((len(ids) * crops_per_image, 4))
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, zlib.crc32(str(image_id).encode())])
        for j in range(crops_per_image):
            share = math.exp(rng.uniform(math.log(low), math.log(high)))
            width = min(1.0, math.sqrt(share) * math.exp(rng.uniform(-ASPECT_JITTER, ASPECT_JITTER)))
            height = min(1.0, share / width)
            x0, y0 = rng.uniform(0, 1 - width), rng.uniform(0, 1 - height)
            boxes[i * crops_per_image + j] = (x0, y0, x0 + width, y0 + height)
    return boxes


def crop_image(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The part of `image` (h, w, c) inside a relative box, at least one pixel each way."""
    height, width = image.shape[:2]
    x0, x1 = int(box[0] * width), max(int(box[0] * width) + 1, round(box[2] * width))
    y0, y1 = int(box[1] * height), max(int(box[1] * height) + 1, round(box[3] * height))
    return np.ascontiguousarray(image[y0:min(y1, height), x0:min(x1, width)])


def unresolved(cfg) -> list[str]:
    """The keys of `cfg` that the data decides and that are still 'auto'."""
    return [key for key, value in (("augment.mimic_scale", cfg.augment.mimic_scale),
                                   ("validation.crop_area", cfg.validation.crop_area)) if value == "auto"]


def resolve_for_data(cfg, geometry: CropGeometry):
    """`cfg` with its data-dependent 'auto' values replaced by what `geometry` measured: augment.mimic_scale and
    validation.crop_area (rounded to 3 decimals, as the run's config.yaml records them)."""
    augment, validation = cfg.augment, cfg.validation
    if augment.mimic_scale == "auto":
        augment = augment.model_copy(update={"mimic_scale": round(geometry.mimic_scale, 3)})
    if validation.crop_area == "auto":
        low, high = (max(0.001, round(share, 3)) for share in (geometry.area_share_low, geometry.area_share_high))
        validation = validation.model_copy(update={"crop_area": (low, high)})
    return cfg.model_copy(update={"augment": augment, "validation": validation})


@dataclass
class ValidationSet:
    """The rows a fold validates on: one per painting (mode whole, crop -1) or crops_per_image per painting."""
    ids: np.ndarray
    crops: np.ndarray
    paths: list[str]
    labels: np.ndarray
    boxes: np.ndarray | None  # relative crop boxes, None for whole paintings

    @property
    def are_crops(self) -> bool:
        return self.boxes is not None

    def describe(self) -> str:
        paintings = len(np.unique(self.ids))
        if not self.are_crops:
            return f"{paintings} whole paintings"
        return f"{len(self.ids)} crops ({len(self.ids) // max(paintings, 1)} of each of {paintings} paintings)"


def validation_set(cfg, rows: pd.DataFrame) -> ValidationSet:
    """The validation rows of train `rows` (id, path, label) under cfg.validation (crop_area resolved)."""
    validation = cfg.validation
    ids, paths, labels = rows["id"].to_numpy(), rows["path"].tolist(), rows["label"].to_numpy()
    if validation.mode == "whole":
        return ValidationSet(ids, np.full(len(ids), -1), paths, labels, None)
    if validation.crop_area == "auto":
        raise ValueError("validation.crop_area is still 'auto': resolve it with the data first (resolve_for_data)")
    k = validation.crops_per_image
    boxes = validation_crops(ids, k, tuple(validation.crop_area), validation.seed)
    return ValidationSet(np.repeat(ids, k), np.tile(np.arange(k), len(ids)), [p for p in paths for _ in range(k)],
                         np.repeat(labels, k), boxes)
