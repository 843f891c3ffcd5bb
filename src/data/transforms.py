"""Albumentations pipelines. Every transform is built with strict=True, so a misspelt or removed argument
is an error instead of a silently ignored warning.

The pipelines end in uint8 CHW tensors: DataLoader workers hand over a quarter of the bytes of float32 images, and
the device converts and normalises them (src/data/device_input.py), as timm's prefetcher does."""
from __future__ import annotations

import random
from typing import Callable

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from ..core.errors import UserError
from ..core.schema import AugmentConfig, ExperimentConfig


def square_resize(side: int) -> A.BasicTransform:
    """The image squashed to side x side (INTER_AREA): the first step of every crop but rrc, and what the image
    cache stores under speed.train_cache=transform_start."""
    return A.Resize(side, side, interpolation=cv2.INTER_AREA, strict=True)


def mimic_side(cfg: AugmentConfig, size: int) -> int:
    """The side of crop-mimic's square: the whole painting squashed to mimic_scale x size a side, like a test crop
    is: a size x size crop of it then covers 1 / mimic_scale^2 of the painting's area at every aspect ratio, and is
    as distorted as a test crop of that painting once resized to the input square."""
    if cfg.mimic_scale == "auto":
        raise ValueError("augment.mimic_scale is still 'auto': resolve it with the data first (resolve_for_data)")
    return round(size * cfg.mimic_scale)


def train_start_side(cfg: AugmentConfig, size: int) -> int | None:
    """The side of the square every training image is resized to first (crop random: resize_scale x size; mimic:
    mimic_scale x size; none: the input size), or None for rrc, which crops the image at its own geometry."""
    return {"random": lambda: round(size * cfg.resize_scale), "mimic": lambda: mimic_side(cfg, size),
            "none": lambda: size, "rrc": lambda: None}[cfg.crop]()


def train_crop(cfg: AugmentConfig, size: int, resized: bool = False) -> list:
    """The transforms that take a training image to the size x size input (augment.crop), before any other
    augmentation; `resized`: the image is already the square train_start_side gives (a transform_start cache)."""
    side = train_start_side(cfg, size)
    first = [] if resized or side is None else [square_resize(side)]
    if cfg.crop in ("random", "mimic"):
        return first + [A.RandomCrop(size, size, strict=True)]
    if cfg.crop == "rrc":
        return [A.RandomResizedCrop(size=(size, size), scale=cfg.rrc_scale, ratio=cfg.rrc_ratio,
                                    interpolation=cv2.INTER_AREA, strict=True)]
    return first


def strong_flips() -> list:
    """The geometric start of the published set: cheap on uint8 in a worker, and always run there."""
    return [A.Transpose(p=0.5, strict=True), A.HorizontalFlip(p=0.5, strict=True),
            A.VerticalFlip(p=0.5, strict=True)]


def strong_augmentations() -> list:
    """The published augmentation set (ShiftScaleRotate became Affine in albumentations 2). Under speed.gpu_augment
    everything after the flips runs on the device instead (src/data/device_augment.py mirrors it)."""
    return strong_flips() + [
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


def build_train_transform(cfg: ExperimentConfig, seed: int, resized: bool = False) -> A.Compose:
    """Crop (cfg.augment.crop), optional augmentation sets, a uint8 tensor; seeded with one stream for all
    transforms. Training loaders reseed it for every image (src/data/loader.py). `resized`: the images come from a
    transform_start cache, already squashed to the crop's square. Under speed.gpu_augment the worker stops after the
    flips and the device runs the rest (src/data/device_augment.py)."""
    aug = cfg.augment
    if cfg.speed.gpu_augment and aug.single != "none":
        raise UserError(f"speed.gpu_augment covers augment.strong and augment.extra_colour, not augment.single="
                        f"{aug.single}; set speed.gpu_augment=false")
    steps = train_crop(aug, cfg.input.img_size, resized)
    steps += [A.HorizontalFlip(p=0.5, strict=True)] if aug.hflip else []
    if cfg.speed.gpu_augment:
        steps += strong_flips() if aug.strong else []
    else:
        steps += strong_augmentations() if aug.strong else []
        steps += extra_colour_augmentations() if aug.extra_colour else []
        steps += [SINGLE_AUGMENTATIONS[aug.single]()] if aug.single != "none" else []
    transform = A.Compose(steps + [ToTensorV2()], strict=True)
    reseed(transform, seed)
    return transform


def build_crop_train_transform(cfg: ExperimentConfig, seed: int) -> A.Compose:
    """Test crops trained on (pseudo-labels) as the crops they are: resized whole to the input as a test crop is,
    then only the horizontal flip when the config flips (augment.hflip or the strong set); no crop of the crop, and
    no device augmentation under speed.gpu_augment either (src/data/training_set.py marks the paintings). uint8."""
    flips = cfg.augment.hflip or cfg.augment.strong
    steps = [square_resize(cfg.input.img_size)] + ([A.HorizontalFlip(p=0.5, strict=True)] if flips else [])
    transform = A.Compose(steps + [ToTensorV2()], strict=True)
    reseed(transform, seed)
    return transform


def build_eval_transform(cfg: ExperimentConfig, test: bool = False) -> A.Compose:
    """Test images (already quarter crops) are resized whole, and so are validation crops (test=True). Whole
    validation paintings are resized whole too, except under crop=mimic, where they get the centre crop of the
    training geometry (the painting squashed to mimic_scale x size, then the middle size x size). uint8 tensors."""
    size = cfg.input.img_size
    if cfg.augment.crop == "mimic" and not test:
        steps = [square_resize(mimic_side(cfg.augment, size)), A.CenterCrop(size, size, strict=True)]
    else:
        steps = [square_resize(size)]
    return A.Compose(steps + [ToTensorV2()], strict=True)
