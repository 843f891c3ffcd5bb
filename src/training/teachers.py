"""Finished runs a fold learns from (pseudo-labels, distillation): an experiment, a TTA run of one, or an ensemble of
them, read from OUTPUTS. A student's fold k learns only from the teacher's fold k: each member's fold k model, which
never saw fold k's validation paintings, combined with the weights the ensemble gives fold k (fitted weights: those
fitted on the other folds' OOF, as the ensemble's own CV uses them). So the student's CV stays honest.

A teacher's identity is the result fingerprint of the experiment (with the TTA mode for a TTA run; for an ensemble,
its members' identities, method and weights); it enters the student's fingerprint, so a student trained from other
teacher predictions is never reused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ..core.errors import UserError
from ..core.layout import ExperimentDir, SavedRun, read_saved
from ..core.schema import ExperimentConfig
from ..data.competition import CompetitionData
from ..data.image_cache import cache_for
from ..inference.predictor import Predictor
from ..inference.voting import combine


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Member:
    """An experiment or a TTA run of one: whose fold models predict (`models`: the experiment) and whose folds hold
    its test probabilities (`own`: the run itself)."""
    name: str
    cfg: ExperimentConfig
    tta: str
    models: ExperimentDir
    own: ExperimentDir
    trained: str  # the experiment's result fingerprint, which its done folds record
    identity: str
    data_fingerprint: str


def _member(outputs: Path, saved: SavedRun, role: str) -> Member:
    if saved.kind == "ensemble":
        raise UserError(f"{role}: {saved.name} is an ensemble inside an ensemble; name its members' ensemble only")
    cfg = saved.fine_tuned(role)
    source = saved if saved.kind == "experiment" else read_saved(outputs / saved.source)
    trained = source.run.get("result_fingerprint")
    if trained is None:
        raise UserError(f"{role}: {ExperimentDir(outputs / source.name).config} records no result fingerprint; rerun "
                        f"{source.name} with this version (bash run.sh {source.name})")
    identity = _digest({"source": trained, "tta": saved.tta}) if saved.kind == "tta" else trained
    return Member(saved.name, cfg, saved.tta, ExperimentDir(outputs / source.name), ExperimentDir(outputs / saved.name),
                  trained, identity, saved.run.get("data_fingerprint", ""))


@dataclass(frozen=True)
class Teacher:
    name: str
    role: str  # the config key that names it, for messages (pseudo.from, distill.from)
    members: tuple[Member, ...]
    method: str
    ensemble: Optional[SavedRun]  # the ensemble's config.yaml, None for a single member
    identity: str

    def weights(self, fold: int) -> np.ndarray:
        """The members' weights for fold k: equal, as configured, or fitted without fold k's paintings."""
        if self.ensemble is None:
            return np.ones(len(self.members))
        return np.asarray(self.ensemble.member_weights(fold), dtype=float)

    def check(self, cfg: ExperimentConfig, data: CompetitionData) -> None:
        """Every member trained on this data with these folds, or its fold k did not leave out fold k."""
        fingerprint = data.fingerprint()
        for member in self.members:
            if (member.cfg.data.n_folds, member.cfg.data.fold_seed) != (cfg.data.n_folds, cfg.data.fold_seed):
                raise UserError(f"{self.role}: {member.name} was trained with data.n_folds={member.cfg.data.n_folds} "
                                f"data.fold_seed={member.cfg.data.fold_seed}, this run has {cfg.data.n_folds} and "
                                f"{cfg.data.fold_seed}; a teacher's fold k must leave out the same paintings")
            if member.data_fingerprint != fingerprint:
                raise UserError(f"{self.role}: {member.name} was trained on other data than {data.root} (its data "
                                f"fingerprint {member.data_fingerprint or 'unknown'}, this data's "
                                f"{fingerprint}); rerun it on this data")

    def _done(self, member: Member, fold: int) -> None:
        """Stop unless the member's fold k model is done with the config its config.yaml records, and its fold k
        test probabilities are written."""
        done = member.models.fold(fold).done_record()
        if done is None or not member.own.fold(fold).test_probs.is_file():
            raise UserError(f"{self.role}: {member.name}'s fold {fold} is not done; finish it first (bash run.sh "
                            f"{member.models.name})")
        if done["fingerprint"] != member.trained:
            raise UserError(f"{self.role}: {member.models.fold(fold).path} was trained with another config than "
                            f"{member.models.config} records; finish {member.models.name} again (bash run.sh "
                            f"{member.models.name})")

    def fold_test_probs(self, fold: int, test_ids: pd.Series, classes: list[str]) -> np.ndarray:
        """The teacher's fold k probabilities of the test images (in `test_ids` order), from the members' fold k
        test_probs.csv, combined as the ensemble combines them."""
        probs = []
        for member in self.members:
            self._done(member, fold)
            path = member.own.fold(fold).test_probs
            frame = pd.read_csv(path, dtype={"id": str})
            if list(frame.columns[1:]) != list(classes):
                raise UserError(f"{self.role}: {path} holds other artists than this data; rerun {member.name} here")
            rows = frame.set_index("id").reindex(test_ids.astype(str))
            if rows.isna().any().any():
                raise UserError(f"{self.role}: {path} lacks test images of this data (e.g. "
                                f"{rows.index[rows.isna().any(axis=1)][0]}); rerun {member.name} on it")
            probs.append(rows[classes].to_numpy(np.float64))
        return combine(np.stack(probs), self.weights(fold), self.method)

    def fold_predictions(self, fold: int, paths: list[str], test: bool, boxes: Optional[np.ndarray],
                         classes: list[str], device: torch.device, outputs: Path) -> np.ndarray:
        """The teacher's fold k probabilities of these images (crops when `boxes`), each member predicting with its
        fold k best.pt (and its TTA), combined as the ensemble combines them."""
        probs = []
        for member in self.members:
            self._done(member, fold)
            predictor = Predictor.for_checkpoints(member.cfg, len(classes), device, tta=member.tta,
                                                  cache=cache_for(member.cfg, outputs))
            predictor.load(member.models.fold(fold).best, classes)
            probs.append(predictor.predict(paths, test=test, boxes=boxes, desc=f"{member.name} fold {fold} teaches"))
        return combine(np.stack(probs).astype(np.float64), self.weights(fold), self.method)


def read_teacher(outputs: Path, name: str, role: str) -> Teacher:
    """The finished run `name` under `outputs` as a teacher; `role` is the config key that names it."""
    saved = read_saved(outputs / name, required=False)
    if saved is None:
        raise UserError(f"{role}: {ExperimentDir(outputs / name).config} not found; run the teacher first (bash "
                        f"run.sh {name}, or bash run.sh ensemble {name}), or point --outputs at the folder holding it")
    if saved.kind != "ensemble":
        member = _member(outputs, saved, role)
        return Teacher(name, role, (member,), "soft", None, member.identity)
    members = tuple(_member(outputs, read_saved(outputs / member), role) for member in saved.members)
    identity = _digest({"members": [m.identity for m in members], "method": saved.method,
                        "weights": saved.raw.get("weights"), "seed": saved.raw.get("seed", 0)})
    return Teacher(name, role, members, saved.method, saved, identity)
