"""Optimisers and learning-rate schedules. Schedules are stepped once per training iteration."""
from __future__ import annotations

import torch

from .config import OptimizerConfig, SchedulerConfig


def build_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """'constant' keeps the optimiser's learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
