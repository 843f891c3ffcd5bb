"""The pixel augmentations of augment.strong and augment.extra_colour on the device (speed.gpu_augment), batched with
per-image random parameters by kornia.augmentation, each drawn as the CPU pipeline (albumentations on uint8,
src/data/transforms.py) draws it.

kornia rather than torchvision.transforms.v2: kornia draws every parameter per image of a batch (and `p` per image),
torchvision v2 draws one set of parameters per call, so a batch would share one rotation and one colour shift.
kornia's own classes serve where their definition is albumentations' (affine, channel shuffle, colour jitter,
gamma, greyscale); three are written here on kornia's base class because kornia has no transform with their
definition: albumentations' HueSaturationValue adds shifts in OpenCV's 8-bit HSV units (kornia's hue and saturation
multiply or rotate), RandomBrightnessContrast is one clipped x * alpha + beta under one `p` (kornia clamps between
its two steps and draws two `p`s), and CoarseDropout cuts 1-8 holes of 5-10% of each side (kornia's RandomErasing
cuts one). tests/test_device_augment.py compares the distributions of both paths, not pixels.

Images are float32 in [0, 1] here (uint8 / 255), so shifts stated on 0..255 are divided by 255.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import kornia.augmentation as K
import torch
from kornia.augmentation import random_generator as rg
from kornia.augmentation._2d.intensity.base import IntensityAugmentationBase2D
from kornia.color import hsv_to_rgb, rgb_to_hsv
from torch import nn

from ..core.schema import AugmentConfig

OPENCV_HUE_UNITS = 180  # OpenCV's 8-bit hue: 0..179 for a full turn


class HueSaturationValueShift(IntensityAugmentationBase2D):
    """albumentations' HueSaturationValue on uint8 images: hue + U(-hue, hue) in OpenCV's units (2 degrees each),
    saturation + U(-sat, sat) and value + U(-val, val) on 0..255, clipped; a pixel without saturation keeps none."""

    def __init__(self, hue: float, saturation: float, value: float, p: float) -> None:
        super().__init__(p=p)
        self._param_generator = rg.PlainUniformGenerator(((-hue, hue), "hue", None, None),
                                                         ((-saturation, saturation), "saturation", None, None),
                                                         ((-value, value), "value", None, None))

    def apply_transform(self, input: torch.Tensor, params: Dict[str, torch.Tensor], flags: Dict[str, Any],
                        transform: Optional[torch.Tensor] = None) -> torch.Tensor:
        shift = {name: params[name].to(input).view(-1, 1, 1) for name in ("hue", "saturation", "value")}
        hue, saturation, value = rgb_to_hsv(input).unbind(1)
        hue = torch.remainder(hue + shift["hue"] * (2 * math.pi / OPENCV_HUE_UNITS), 2 * math.pi)
        saturation = torch.where(saturation > 0, (saturation + shift["saturation"] / 255).clamp(0, 1), saturation)
        value = (value + shift["value"] / 255).clamp(0, 1)
        return hsv_to_rgb(torch.stack((hue, saturation, value), 1))


class BrightnessContrast(IntensityAugmentationBase2D):
    """albumentations' RandomBrightnessContrast (brightness_by_max): x * (1 + U(-contrast, contrast)) +
    U(-brightness, brightness) x the maximum (1 here), clipped once."""

    def __init__(self, brightness: float, contrast: float, p: float) -> None:
        super().__init__(p=p)
        self._param_generator = rg.PlainUniformGenerator(((-contrast, contrast), "contrast", None, None),
                                                         ((-brightness, brightness), "brightness", None, None))

    def apply_transform(self, input: torch.Tensor, params: Dict[str, torch.Tensor], flags: Dict[str, Any],
                        transform: Optional[torch.Tensor] = None) -> torch.Tensor:
        alpha = 1 + params["contrast"].to(input).view(-1, 1, 1, 1)
        beta = params["brightness"].to(input).view(-1, 1, 1, 1)
        return (input * alpha + beta).clamp(0, 1)


class HoleGenerator(rg.RandomGeneratorBase):
    """For each image: randint(holes) holes, each of int(U(size) x side) on each side, at a uniform position that
    keeps it inside the image (albumentations' CoarseDropout). Unused hole slots have zero size."""

    def __init__(self, holes: tuple[int, int], size: tuple[float, float]) -> None:
        super().__init__()
        self.holes, self.size = holes, size

    def make_samplers(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> Dict[str, torch.Tensor]:
        batch, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        most = self.holes[1]
        count = torch.randint(self.holes[0], most + 1, (batch, 1))
        used = torch.arange(most).view(1, -1) < count
        low, high = self.size
        heights = ((low + (high - low) * torch.rand(batch, most)) * height).long() * used
        widths = ((low + (high - low) * torch.rand(batch, most)) * width).long() * used
        tops = (torch.rand(batch, most) * (height - heights + 1)).long()
        lefts = (torch.rand(batch, most) * (width - widths + 1)).long()
        return {"tops": tops, "lefts": lefts, "heights": heights, "widths": widths}


class CoarseDropout(IntensityAugmentationBase2D):
    """albumentations' CoarseDropout with fill 0: 1-8 rectangular holes, each 5-10% of the image's height and width."""

    def __init__(self, holes: tuple[int, int], size: tuple[float, float], p: float) -> None:
        super().__init__(p=p)
        self._param_generator = HoleGenerator(holes, size)

    def apply_transform(self, input: torch.Tensor, params: Dict[str, torch.Tensor], flags: Dict[str, Any],
                        transform: Optional[torch.Tensor] = None) -> torch.Tensor:
        height, width = input.shape[-2:]
        rows = torch.arange(height, device=input.device).view(1, 1, -1)
        cols = torch.arange(width, device=input.device).view(1, 1, -1)
        tops, lefts = params["tops"].to(input.device)[..., None], params["lefts"].to(input.device)[..., None]
        in_rows = (rows >= tops) & (rows < tops + params["heights"].to(input.device)[..., None])
        in_cols = (cols >= lefts) & (cols < lefts + params["widths"].to(input.device)[..., None])
        holes = (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).any(1)  # batch x height x width
        return input.masked_fill(holes.unsqueeze(1), 0)


def strong_pixel_augmentations() -> list[nn.Module]:
    """strong_augmentations() of src/data/transforms.py after its flips, with the same arguments."""
    return [K.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.9, 1.1, 0.9, 1.1),
                           padding_mode="zeros", p=0.5),
            HueSaturationValueShift(hue=20, saturation=30, value=20, p=0.5),
            BrightnessContrast(brightness=0.1, contrast=0.1, p=0.5),
            K.RandomChannelShuffle(p=0.5),
            CoarseDropout(holes=(1, 8), size=(0.05, 0.1), p=0.5)]


def extra_colour_augmentations() -> list[nn.Module]:
    """extra_colour_augmentations() of src/data/transforms.py: torchvision's ColorJitter (kornia's ColorJitter has
    that definition; it draws one order of its four steps per batch, albumentations one per image), gamma and
    greyscale (ITU-R 601 weights in both)."""
    return [K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.3, hue=0.05, p=0.5),
            K.RandomGamma(gamma=(0.8, 1.2), p=0.3),
            K.RandomGrayscale(p=0.1)]


def device_augmentations(cfg: AugmentConfig) -> nn.Module | None:
    """The device's share of the training augmentation of `cfg`, or None when it has none."""
    steps = (strong_pixel_augmentations() if cfg.strong else []) + \
        (extra_colour_augmentations() if cfg.extra_colour else [])
    return K.ImageSequential(*steps) if steps else None
