"""The techniques that change what a batch teaches, each one module beside the objective (src/training/objective.py):
`SECTION` (its config section, None when off; the section's `from` names the finished run it learns from),
`extend(training set, FoldContext)` (rows and per-row targets it adds to a fold) and `term(cfg)` (its part of the
loss, or None). Adding one: its module, its section in src/core/schema.py, a line here, and its tests; the loop, the
fold and the run do not change."""
from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError
from ..core.schema import ExperimentConfig
from ..data.training_set import TrainingSet
from . import distill, pseudo
from .objective import FoldContext, Term
from .teachers import read_teacher

# In this order: distillation gives teacher targets to the test crops that pseudo-labelling adds.
TECHNIQUES = (pseudo, distill)


def active(cfg: ExperimentConfig) -> list:
    return [technique for technique in TECHNIQUES if getattr(cfg, technique.SECTION) is not None]


def loss_terms(cfg: ExperimentConfig) -> list[Term]:
    return [term for technique in active(cfg) if (term := technique.term(cfg)) is not None]


def fold_training_set(training: TrainingSet, fold: FoldContext) -> TrainingSet:
    """What fold k trains on: its paintings, extended by every technique the config turns on."""
    for technique in active(fold.cfg):
        training = technique.extend(training, fold)
    return training


def sources(cfg: ExperimentConfig, outputs: Path) -> dict[str, str]:
    """{'pseudo.from': the teacher's identity, ...} for every technique on: what the run's result fingerprint
    adds, so a fold trained from other teacher predictions is never reused."""
    identities = {}
    if cfg.frozen and active(cfg):
        raise UserError(f"{cfg.name}: pseudo and distill train a network, frozen fits a classifier on frozen features "
                        "instead; set frozen=null, or remove pseudo and distill")
    for technique in active(cfg):
        key, source = f"{technique.SECTION}.from", getattr(cfg, technique.SECTION).source
        if source == cfg.name:
            raise UserError(f"{key}: {cfg.name} cannot learn from itself; name a finished experiment or ensemble")
        identities[key] = read_teacher(outputs, source, key).identity
    return identities
