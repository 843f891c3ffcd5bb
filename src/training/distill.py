"""Knowledge distillation (`distill: {from, temperature, alpha}`; Hinton et al., 2015): the student also matches a
finished teacher's softened probabilities. For fold k the teacher's fold k model(s) predict every training image once
(src/training/teachers.py), cached in the fold's folder: a painting's target is their mean over its crops at the
validation geometry (how the run reads a painting), a pseudo-labelled test crop's is their prediction of the crop.

The loss is (1 - alpha) L + alpha T^2 KL(q_T || p_T), L the configured loss, p_T = softmax(z / T) the student's
softened probabilities, q_T = softmax(log q / T) the teacher's probabilities q softened alike (exactly the softmax of
its logits at T for one model); T^2 keeps the term's gradients at the scale of L's as T changes. Under CutMix the
softened teacher targets mix as the labels do."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..core.distributed import barrier
from ..core.errors import UserError
from ..core.files import write_csv
from ..core.schema import ExperimentConfig
from ..data.geometry import validation_set
from ..data.training_set import TrainingSet
from ..inference.probabilities import probs_frame, read_probs
from .objective import FoldContext, Targets, weighted_mean
from .teachers import Teacher, read_teacher

SECTION = "distill"


def teacher_probs(teacher: Teacher, training: TrainingSet, fold: FoldContext) -> np.ndarray:
    """The teacher's fold k probabilities of every row of `training` (paintings, then crops)."""
    paintings = validation_set(fold.cfg, training.paintings)
    predicted = teacher.fold_predictions(fold.fold, paintings.paths, paintings.are_crops, paintings.boxes,
                                         fold.data.classes, fold.device, fold.outputs)
    per_painting = predicted.reshape(len(training.paintings), -1, len(fold.data.classes)).mean(axis=1)
    crops = teacher.fold_test_probs(fold.fold, training.crops["id"], fold.data.classes) if len(training.crops) \
        else np.empty((0, len(fold.data.classes)))
    return np.concatenate([per_painting, crops])


def cached_teacher_probs(teacher: Teacher, training: TrainingSet, fold: FoldContext) -> np.ndarray:
    """teacher_probs, read from the fold's cache when it holds these rows (it is keyed by the run's fingerprint,
    which holds the teacher's identity); under DDP rank 0 predicts and writes it, the others read it."""
    path = fold.fold_dir.teacher_probs(fold.fingerprint)
    ids = np.concatenate([training.paintings["id"].astype(str), training.crops["id"].astype(str)])
    if not path.is_file() and fold.ctx.is_main:
        write_csv(probs_frame(ids, teacher_probs(teacher, training, fold), fold.data.classes), path)
        fold.log(f"{fold.cfg.name} fold {fold.fold}: {teacher.name}'s fold {fold.fold} predicted the {len(ids)} "
                 f"training images; cached in {path}")
    barrier(fold.ctx)
    cached = read_probs(path)
    if cached["id"].tolist() != ids.tolist():
        raise UserError(f"{path} holds other images than fold {fold.fold} trains on; delete it (it is made again)")
    return cached[fold.data.classes].to_numpy(np.float32)


def extend(training: TrainingSet, fold: FoldContext) -> TrainingSet:
    teacher = read_teacher(fold.outputs, fold.cfg.distill.source, f"{SECTION}.from")
    teacher.check(fold.cfg, fold.data)
    return training.with_targets(teacher=cached_teacher_probs(teacher, training, fold))


class Distillation:
    """The distillation term of the loss (see the module text)."""
    name = "distill"

    def __init__(self, temperature: float, alpha: float):
        self.temperature, self.alpha = temperature, alpha

    def prepare(self, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's probabilities softened at T: softmax(log q / T)."""
        return {"teacher": torch.softmax(extras["teacher"].float().log() / self.temperature, dim=1)}

    def combine(self, loss: torch.Tensor, logits: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
        student = F.log_softmax(logits.float() / self.temperature, dim=1)
        kl = F.kl_div(student, targets.extras["teacher"], reduction="none").sum(dim=1)
        term = self.temperature ** 2 * weighted_mean(kl, targets.weight)
        return (1 - self.alpha) * loss + self.alpha * term, term


def term(cfg: ExperimentConfig) -> Optional[Distillation]:
    return Distillation(cfg.distill.temperature, cfg.distill.alpha) if cfg.distill else None
