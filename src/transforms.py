"""Albumentations pipelines. Every transform is built with strict=True, so a misspelt or removed argument
is an error instead of a silently ignored warning."""
from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from .config import ExperimentConfig


def _finish(size: int, mean, std) -> list:
    return [A.Resize(size, size, interpolation=cv2.INTER_AREA, strict=True),
            A.Normalize(mean=mean, std=std, strict=True), ToTensorV2()]


def build_train_transform(cfg: ExperimentConfig, mean, std, seed: int) -> A.Compose:
    """The training pipeline named by cfg.augment.train; seeded through Compose's own generator."""
    size = cfg.input.img_size
    presets = {"resize": []}
    return A.Compose(presets[cfg.augment.train] + _finish(size, mean, std), seed=seed, strict=True)


def build_eval_transform(cfg: ExperimentConfig, mean, std) -> A.Compose:
    """Validation and test: resize the whole image (a test crop or a train painting) to the input size."""
    return A.Compose(_finish(cfg.input.img_size, mean, std), strict=True)
