"""Test-time augmentation through ttach, merging probabilities (softmax before the mean, not logits). ttach is
imported only when a TTA mode is used: predicting without TTA runs where it is not installed (Kaggle's image)."""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import UserError
from ..core.requirements import require

TTA_MODES = ("none", "hflip", "flips", "d4")
_ROTATING = {"d4"}


def tta_transforms(mode: str):
    """ttach's transforms of `mode` (a ttach.Compose)."""
    if mode not in TTA_MODES[1:]:
        raise UserError(f"unknown TTA mode '{mode}'; choose one of {', '.join(TTA_MODES)}")
    ttach = require("ttach", "ttach", f"TTA '{mode}'")
    if mode == "hflip":
        return ttach.aliases.hflip_transform()
    if mode == "flips":
        return ttach.aliases.flip_transform()
    return ttach.aliases.d4_transform()


class _Softmax(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images).float(), dim=1)


class ProbabilityTTA(nn.Module):
    """Averages the model's probabilities over the TTA views. Returns log-probabilities, so the usual
    softmax of the predictor gives back exactly the averaged probabilities."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        transforms = tta_transforms(mode)
        ttach = require("ttach", "ttach", f"TTA '{mode}'")
        self.mode = mode
        self.wrapper = ttach.ClassificationTTAWrapper(_Softmax(model), transforms, merge_mode="mean")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if self.mode in _ROTATING and height != width:
            raise UserError(f"TTA '{self.mode}' rotates by 90 degrees, which swaps height and width of a "
                            f"{height}x{width} input; use square inputs or TTA 'flips'")
        return torch.log(self.wrapper(images).clamp_min(1e-12))


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    return model if mode == "none" else ProbabilityTTA(model, mode)
