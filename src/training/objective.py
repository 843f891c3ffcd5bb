"""The training objective: the one place where a batch becomes a loss (timm's task object). The loop hands it the
images and whatever targets the loader gave; it owns the targets (class indices, soft targets, per-image weights and
the per-image tensors a loss term needs, such as a teacher's probabilities), CutMix on all of them, the configured
loss, each technique's term of the loss, and the parts worth logging.

A technique of this kind is one module (src/training/techniques.py lists them): it may add rows and per-row targets
to what a fold trains on (`extend`, given a FoldContext), and a term of the loss (`term`); the loop does not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distributed import DistContext
from ..core.errors import UserError
from ..core.layout import FoldDir
from ..core.schema import ExperimentConfig
from ..data.competition import CompetitionData
from .losses import build_loss


@dataclass
class Targets:
    """A batch's targets on the device: class indices (N,) or target distributions (N, C); optional per-image loss
    weights (N,); per-image tensors the loss terms read (e.g. "teacher": (N, C))."""
    target: torch.Tensor
    weight: Optional[torch.Tensor] = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def split(self, sizes: Sequence[int]) -> list["Targets"]:
        """The targets of consecutive micro-batches of these sizes (gradient accumulation)."""
        def parts(tensor: Optional[torch.Tensor]) -> list:
            return list(tensor.split(list(sizes))) if tensor is not None else [None] * len(sizes)

        extras = {key: parts(value) for key, value in self.extras.items()}
        return [Targets(target, weight, {key: chunks[i] for key, chunks in extras.items()})
                for i, (target, weight) in enumerate(zip(parts(self.target), parts(self.weight)))]


class Term(Protocol):
    """A technique's part of the loss. `name` is logged (train_loss_NAME in history.csv)."""
    name: str

    def prepare(self, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-image tensors of the term, before CutMix mixes them (e.g. a teacher's tempered probabilities)."""

    def combine(self, loss: torch.Tensor, logits: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss with this term, and the term's value to log."""


@dataclass
class FoldContext:
    """What a technique sees of the fold it extends: the run's config and data, the fold, its folder (for caches)
    and result fingerprint, where finished runs live (a teacher's), and the device to predict on."""
    cfg: ExperimentConfig
    data: CompetitionData
    fold: int
    fold_dir: FoldDir
    fingerprint: str
    outputs: Path
    device: torch.device
    ctx: DistContext
    log: Callable[[str], None]


def weighted_mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The batch mean of per-image values, each times its weight when there are weights."""
    return values.mean() if weight is None else (values * weight).mean()


class Objective:
    """batch -> loss. `criterion` is the configured loss (mean over the batch) on class indices or distributions;
    validation reads it too."""

    def __init__(self, criterion: nn.Module, per_image: nn.Module, n_classes: int, cutmix=None,
                 terms: Sequence[Term] = ()):
        self.criterion, self.per_image, self.n_classes = criterion, per_image, n_classes
        self.cutmix, self.terms = cutmix, list(terms)

    def targets(self, batch_targets, device: torch.device) -> Targets:
        """The loader's targets on the device: a tensor of class indices, or a dict of the per-row targets a
        technique added ("label", "soft", "weight" and the terms' extras)."""
        if isinstance(batch_targets, torch.Tensor):
            return Targets(batch_targets.to(device, non_blocking=True))
        moved = {key: value.to(device, non_blocking=True) for key, value in batch_targets.items()}
        labels, soft, weight = moved.pop("label"), moved.pop("soft", None), moved.pop("weight", None)
        extras: dict[str, torch.Tensor] = {}
        for term in self.terms:
            extras.update(term.prepare(moved))
        return Targets(soft if soft is not None else labels, weight, extras)

    def mix(self, images: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, Targets]:
        """CutMix (timm's, on the whole batch with probability cutmix_prob): image i gets a box of image N-1-i, and
        every per-image target mixes in the same proportion: t_i' = lam t_i + (1 - lam) t_(N-1-i), with lam the share
        of image i left after clipping the box at the border. timm's Mixup takes class indices; given the batch's
        row numbers as classes it returns that N x N mixing, whose diagonal is lam and anti-diagonal 1 - lam."""
        if self.cutmix is None:
            return images, targets
        self.cutmix.num_classes = len(images)
        images, mixing = self.cutmix(images, torch.arange(len(images), device=images.device))
        kept, pasted = mixing.diagonal(), mixing.flip(1).diagonal()

        def mixed(values: torch.Tensor) -> torch.Tensor:
            shape = (-1,) + (1,) * (values.dim() - 1)
            return values * kept.view(shape) + values.flip(0) * pasted.view(shape)

        target = targets.target if targets.target.dim() == 2 else \
            F.one_hot(targets.target, self.n_classes).to(mixing.dtype)
        weight = mixed(targets.weight) if targets.weight is not None else None
        return images, Targets(mixed(target), weight, {key: mixed(value) for key, value in targets.extras.items()})

    def loss(self, logits: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The configured loss (each image's times its weight, when there are weights), then each term's; with terms,
        the parts are the label loss and each term's value."""
        if targets.weight is None:
            base = self.criterion(logits, targets.target)
        else:
            base = weighted_mean(self.per_image(logits, targets.target), targets.weight)
        loss, parts = base, {}
        for term in self.terms:
            loss, parts[term.name] = term.combine(loss, logits, targets)
        return loss, ({"labels": base.detach(), **{k: v.detach() for k, v in parts.items()}} if parts else {})


def build_cutmix(cfg: ExperimentConfig):
    """timm's CutMix on whole batches with probability cutmix_prob; correct_lam makes the target weights equal the
    pasted area after clipping at the border. Its classes are the rows of the batch (Objective.mix)."""
    if not cfg.train.cutmix_prob:
        return None
    if cfg.train.batch_size % 2:
        raise UserError(f"train.cutmix_prob needs an even train.batch_size, got {cfg.train.batch_size}")
    from timm.data import Mixup

    return Mixup(mixup_alpha=0.0, cutmix_alpha=cfg.train.cutmix_alpha, prob=cfg.train.cutmix_prob, switch_prob=0.0,
                 mode="batch", correct_lam=True, label_smoothing=0.0, num_classes=cfg.train.batch_size)


def build_objective(cfg: ExperimentConfig, n_classes: int, terms: Sequence[Term] = ()) -> Objective:
    """The configured loss (cfg.loss), CutMix (cfg.train.cutmix_*) and the techniques' terms."""
    return Objective(build_loss(cfg.loss), build_loss(cfg.loss, reduction="none"), n_classes, build_cutmix(cfg),
                     terms)
