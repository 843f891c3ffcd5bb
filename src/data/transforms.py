"""Albumentations pipelines. Every transform is built with strict=True, so a misspelt or removed argument
is an error instead of a silently ignored warning."""
from __future__ import annotations

import random
from typing import Callable

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from ..core.schema import AugmentConfig, ExperimentConfig


def _to_tensor(mean, std) -> list:
    return [A.Normalize(mean=mean, std=std, strict=True), ToTensorV2()]


def _resize(size: int) -> A.BasicTransform:
    return A.Resize(size, size, interpolation=cv2.INTER_AREA, strict=True)


def _mimic_resize(cfg: AugmentConfig, size: int) -> A.BasicTransform:
    """The whole painting to a square of mimic_scale x size a side, squashed like a test crop is: a size x size crop
    of it then covers 1 / mimic_scale^2 of the painting's area at every aspect ratio, and is as distorted as a test
    crop of that painting once resized to the input square."""
    if cfg.mimic_scale == "auto":
        raise ValueError("augment.mimic_scale is still 'auto': resolve it with the data first (resolve_for_data)")
    side = round(size * cfg.mimic_scale)
    return A.Resize(side, side, interpolation=cv2.INTER_AREA, strict=True)


def train_crop(cfg: AugmentConfig, size: int) -> list:
    """The transforms that take a training image to the size x size input (augment.crop), before any other
    augmentation."""
    if cfg.crop == "random":
        big = round(size * cfg.resize_scale)
        return [A.Resize(big, big, interpolation=cv2.INTER_AREA, strict=True), A.RandomCrop(size, size, strict=True)]
    if cfg.crop == "mimic":
        return [_mimic_resize(cfg, size), A.RandomCrop(size, size, strict=True)]
    if cfg.crop == "rrc":
        return [A.RandomResizedCrop(size=(size, size), scale=cfg.rrc_scale, ratio=cfg.rrc_ratio,
                                    interpolation=cv2.INTER_AREA, strict=True)]
    return [_resize(size)]


def strong_augmentations() -> list:
    """The published augmentation set (ShiftScaleRotate became Affine in albumentations 2)."""
    return [
        A.Transpose(p=0.5, strict=True),
        A.HorizontalFlip(p=0.5, strict=True),
        A.VerticalFlip(p=0.5, strict=True),
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), p=0.5, strict=True),
        A.HueSaturationValue(hue_shift_limit=20, sat_shift_limit=30, val_shift_limit=20, p=0.5, strict=True),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5, strict=True),
        A.ChannelShuffle(p=0.5, strict=True),
        A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.05, 0.1), hole_width_range=(0.05, 0.1),
                        fill=0, p=0.5, strict=True),
    ]


def extra_colour_augmentations() -> list:
    return [
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.3, hue=0.05, p=0.5, strict=True),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3, strict=True),
        A.ToGray(p=0.1, strict=True),
    ]


# The augmentation study (augment.single): each preset is one image-level transform applied to half the
# images, added alone to a base without other augmentation, so its row of the ablation table measures it alone.
SINGLE_AUGMENTATIONS: dict[str, Callable[[], A.BasicTransform]] = {
    "blur": lambda: A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.5, 2.0), p=0.5, strict=True),
    "brightness": lambda: A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.0, p=0.5, strict=True),
    "exposure": lambda: A.RandomGamma(gamma_limit=(60, 160), p=0.5, strict=True),
    "grayscale": lambda: A.ToGray(p=0.5, strict=True),
    "hue": lambda: A.HueSaturationValue(hue_shift_limit=20, sat_shift_limit=0, val_shift_limit=0, p=0.5,
                                        strict=True),
    "noise": lambda: A.GaussNoise(std_range=(0.02, 0.08), p=0.5, strict=True),
    "saturation": lambda: A.ColorJitter(brightness=0, contrast=0, saturation=(0.5, 1.5), hue=0, p=0.5,
                                        strict=True),
}


def reseed(transform: A.Compose, seed: int) -> None:
    """Give every transform of the pipeline one shared random stream started from `seed`.

    Compose(seed=...) and Compose.set_random_seed give each transform its own generator with the same seed
    (albumentations 2.0.8), so transforms with equal probabilities draw equal numbers and fire together: with
    seed set, Transpose, HorizontalFlip and VerticalFlip at p=0.5 are all applied or none is."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def build_train_transform(cfg: ExperimentConfig, mean, std, seed: int) -> A.Compose:
    """Crop (cfg.augment.crop), optional augmentation sets, normalise; seeded with one stream for all transforms.
    Training loaders reseed it for every image (src/data/loader.py)."""
    aug = cfg.augment
    steps = train_crop(aug, cfg.input.img_size)
    steps += [A.HorizontalFlip(p=0.5, strict=True)] if aug.hflip else []
    steps += strong_augmentations() if aug.strong else []
    steps += extra_colour_augmentations() if aug.extra_colour else []
    steps += [SINGLE_AUGMENTATIONS[aug.single]()] if aug.single != "none" else []
    transform = A.Compose(steps + _to_tensor(mean, std), strict=True)
    reseed(transform, seed)
    return transform


def build_crop_train_transform(cfg: ExperimentConfig, mean, std, seed: int) -> A.Compose:
    """Test crops trained on (pseudo-labels) as the crops they are: resized whole to the input as a test crop is,
    then only the horizontal flip when the config flips (augment.hflip or the strong set); no crop of the crop."""
    flips = cfg.augment.hflip or cfg.augment.strong
    steps = [_resize(cfg.input.img_size)] + ([A.HorizontalFlip(p=0.5, strict=True)] if flips else [])
    transform = A.Compose(steps + _to_tensor(mean, std), strict=True)
    reseed(transform, seed)
    return transform


def build_eval_transform(cfg: ExperimentConfig, mean, std, test: bool = False) -> A.Compose:
    """Test images (already quarter crops) are resized whole, and so are validation crops (test=True). Whole
    validation paintings are resized whole too, except under crop=mimic, where they get the centre crop of the
    training geometry (the painting squashed to mimic_scale x size, then the middle size x size)."""
    size = cfg.input.img_size
    if cfg.augment.crop == "mimic" and not test:
        steps = [_mimic_resize(cfg.augment, size), A.CenterCrop(size, size, strict=True)]
    else:
        steps = [_resize(size)]
    return A.Compose(steps + _to_tensor(mean, std), strict=True)
