"""Training losses, selected by cfg.loss.name."""
from __future__ import annotations

from torch import nn

from .config import LossConfig


def build_loss(cfg: LossConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
