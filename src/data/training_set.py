"""What a fold trains on: its paintings, which go through the configured crop and augmentation, and the test crops a
technique adds (pseudo-labels), which are trained on as the crops they are: resized whole as a test crop is, with the
light augmentation only, never cropped again (a crop-mimic of a quarter-painting crop would see a sixteenth).

Per-row targets a technique adds travel with each image to the training objective (src/training/objective.py):
"soft" (N, C) target distributions, "weight" (N,) loss weights, and whatever a loss term reads ("teacher" (N, C)).
A set without them yields (image, class index) items, as it always did; with them, (image, {"label": ..., key: row}).
A set with crops also marks its paintings (PAINTING), the rows the device augments under speed.gpu_augment
(src/data/device_input.py takes the mark off the batch): a crop gets the crop's light augmentation alone there too.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd

from .loader import ImageDataset

ROW_COLUMNS = ["id", "path", "label"]
PAINTING = "painting"  # an item's mark: a painting (True), or an added test crop (False)


def _defaults(key: str, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The value of a target for rows that have none of their own: weight 1, a one-hot soft target."""
    if key == "weight":
        return np.ones(len(labels), dtype=np.float32)
    if key == "soft":
        return np.eye(n_classes, dtype=np.float32)[labels]
    raise ValueError(f"target '{key}' has no default; give it for every row")


@dataclass(frozen=True)
class TrainingSet:
    paintings: pd.DataFrame  # path, label (and id)
    n_classes: int
    crops: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ROW_COLUMNS))
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # per row: the paintings', then the crops'

    def __len__(self) -> int:
        return len(self.paintings) + len(self.crops)

    @property
    def labels(self) -> np.ndarray:
        """Every row's class index, paintings first."""
        return np.concatenate([self.paintings["label"].to_numpy(np.int64), self.crops["label"].to_numpy(np.int64)])

    def with_crops(self, crops: pd.DataFrame, **targets: np.ndarray) -> "TrainingSet":
        """These crops (id, path, label) added, with their targets; the rows before get the default of a target
        they lack, and every target they had must be given for the crops."""
        missing = set(self.targets) - set(targets)
        if missing:
            raise ValueError(f"targets {sorted(missing)} of the rows before are not given for the added crops")
        merged = {key: np.concatenate([self.targets[key] if key in self.targets else
                                       _defaults(key, self.labels, self.n_classes), value.astype(np.float32)])
                  for key, value in targets.items()}
        return replace(self, crops=pd.concat([self.crops, crops[ROW_COLUMNS]], ignore_index=True), targets=merged)

    def with_targets(self, **targets: np.ndarray) -> "TrainingSet":
        """Per-row targets for every row (paintings, then crops)."""
        for key, value in targets.items():
            if len(value) != len(self):
                raise ValueError(f"target '{key}' has {len(value)} rows for {len(self)}")
        return replace(self, targets={**self.targets, **{k: v.astype(np.float32) for k, v in targets.items()}})

    def dataset(self, paintings: ImageDataset, crop_transform: Callable, cache=None):
        """`paintings`, the paintings' images as the trainer reads them (src/data/loader.py's training_dataset), then
        the crops' under `crop_transform`, read through `cache` (the evaluation geometry's: a crop is a test image)."""
        if self.crops.empty and not self.targets:
            return paintings
        crops = ImageDataset(self.crops["path"], self.crops["label"], crop_transform, cache=cache)
        return TrainingDataset([paintings, crops], self.targets)


class TrainingDataset:
    """The paintings' and the crops' ImageDatasets read as one (keys as ImageDataset's: a row index, or (row index,
    augmentation seed)); each item's label becomes a dict with the row's targets when there are any, and with the
    PAINTING mark when there are crops."""

    def __init__(self, parts: list[ImageDataset], targets: dict[str, np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])
        self.targets = targets
        self.marks = len(parts[1]) > 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        local = int(index - self.starts[part])
        image, label = self.parts[part][(local, seed) if seed is not None else local]
        if not self.targets and not self.marks:
            return image, label
        mark = {PAINTING: part == 0} if self.marks else {}
        return image, {"label": label, **{key: value[index] for key, value in self.targets.items()}, **mark}

