"""Training losses, selected by cfg.loss.name. Both accept class indices or soft targets (CutMix, pseudo-labels), and
average over the batch or (reduction="none") give each image's loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.schema import LossConfig


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) of the label-smoothed cross entropy, averaged over the batch.

    For a target class c, let l_c = (1 - eps) * (-log p_c) + eps * mean_k(-log p_k) be the cross entropy with label
    smoothing eps. The loss is sum_c t_c * (1 - exp(-l_c))^gamma * l_c over the target weights t (one-hot, or CutMix's
    soft targets). Without smoothing exp(-l_c) = p_c, so this is Lin et al.'s -sum_c t_c (1 - p_c)^gamma log p_c;
    at gamma = 0 it is torch's CrossEntropyLoss(label_smoothing=eps). Because (1 - e^-l)^gamma * l grows with l, the
    optimum stays that of the smoothed cross entropy: smoothing still keeps the true class at 1 - eps + eps/K.
    Smoothing the targets first and weighting every class by its own (1 - p_k)^gamma would not: the off-class terms
    keep a weight near 1 while the true class's shrinks, and the optimum falls to about 0.69 at eps 0.1, K 50.
    """

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1:
            target = F.one_hot(target, logits.shape[1])
        nll = -F.log_softmax(logits.float(), dim=1)
        eps = self.label_smoothing
        per_class = (1 - eps) * nll + eps * nll.mean(dim=1, keepdim=True) if eps else nll
        weight = (-torch.expm1(-per_class)).pow(self.gamma)
        per_image = (target.float() * weight * per_class).sum(dim=1)
        return per_image if self.reduction == "none" else per_image.mean()


def build_loss(cfg: LossConfig, reduction: str = "mean") -> nn.Module:
    if cfg.name == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.label_smoothing, reduction)
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction=reduction)
