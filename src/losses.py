"""Training losses, selected by cfg.loss.name. Both accept class indices or soft targets (CutMix)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): -sum_c y_c (1 - p_c)^gamma log p_c, averaged over the batch.

    gamma = 0 is cross entropy; larger gamma down-weights examples the model already gets right.
    """

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1:
            target = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[1]
        log_p = F.log_softmax(logits.float(), dim=1)
        weight = (1 - log_p.exp()).pow(self.gamma)
        return -(target * weight * log_p).sum(dim=1).mean()


def build_loss(cfg: LossConfig) -> nn.Module:
    if cfg.name == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
