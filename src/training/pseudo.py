"""Pseudo-labels (`pseudo: {from, threshold, soft, weight}`): the test crops, labelled by a finished teacher, train
beside the fold's paintings. Fold k takes the teacher's fold k probabilities (src/training/teachers.py), never the
fold average: the teacher's fold k model never saw fold k's validation paintings, so neither does the student's.
The crops train as the crops they are (src/data/training_set.py): resized whole, the horizontal flip only."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from ..core.schema import ExperimentConfig
from ..data.training_set import TrainingSet
from .objective import FoldContext, Term
from .teachers import read_teacher

SECTION = "pseudo"


def extend(training: TrainingSet, fold: FoldContext) -> TrainingSet:
    """The test crops whose top fold-k teacher probability reaches the threshold, added with the teacher's top
    artist as their label, its probabilities as their target (soft) and their loss weight."""
    settings, test = fold.cfg.pseudo, fold.data.test
    teacher = read_teacher(fold.outputs, settings.source, f"{SECTION}.from")
    teacher.check(fold.cfg, fold.data)
    probs = teacher.fold_test_probs(fold.fold, test["id"], fold.data.classes)
    keep = probs.max(axis=1) >= settings.threshold
    crops = pd.DataFrame({"id": test["id"][keep].to_numpy(), "path": test["path"][keep].to_numpy(),
                          "label": probs[keep].argmax(axis=1)})
    targets = {"soft": probs[keep]} if settings.soft else {}
    if settings.weight != 1:
        targets["weight"] = np.full(int(keep.sum()), settings.weight)
    fold.log(f"{fold.cfg.name} fold {fold.fold}: {int(keep.sum())} of {len(test)} test crops pseudo-labelled by "
             f"{teacher.name}'s fold {fold.fold} (top probability >= {settings.threshold:g}; "
             f"{'its probabilities' if settings.soft else 'its top artist'} as target, weight {settings.weight:g})")
    return training.with_crops(crops, **targets)


def term(cfg: ExperimentConfig) -> Optional[Term]:
    """Pseudo-labels add rows and targets, no term of the loss."""
    return None
