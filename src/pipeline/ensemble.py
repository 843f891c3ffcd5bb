"""Ensembles of finished experiments, from their OOF and test probabilities (no retraining).

Soft voting is the weighted mean of the members' probabilities. Hard voting takes the majority of the
members' predictions, ties broken by the summed probability. Weights may be fitted on the OOF; the fitted
ensemble is scored honestly: the weights for fold k are fitted on the other folds only.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core.errors import UserError, quoted
from ..core.layout import ExperimentDir, check_free_for
from ..core.names import check_name, name_problem
from ..core.paths import ENSEMBLE_DIR
from ..core.schema import SEED_RANGE
from ..inference.voting import combine
from .score import describe_validation, fast_macro_f1, read_oof, read_run_config, validation_of

WEIGHT_CANDIDATES = 400


class EnsembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    members: list[str] = Field(..., min_length=2)
    method: Literal["soft", "hard"] = "soft"
    weights: Union[None, Literal["fit"], list[float]] = Field(
        None, description="null: equal; a list: one weight per member; fit: fitted on the OOF (nested by fold)")
    seed: int = Field(0, **SEED_RANGE)

    @field_validator("members")
    @classmethod
    def _plain_names(cls, members):
        for member in members:
            if name_problem(member):
                raise ValueError(f"member {quoted(member, 60)}: {name_problem(member)}")
        return members


def load_ensemble_config(name: str, config_dir: Path | None = None) -> EnsembleConfig:
    config_dir = config_dir or ENSEMBLE_DIR
    path = config_dir / f"{check_name(name, 'ensemble')}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in config_dir.glob("*.yaml"))
        raise UserError(f"no ensemble '{name}': {path} does not exist (known: {', '.join(known)})")
    try:
        cfg = EnsembleConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{path}: '{where}': {err['msg'].removeprefix('Value error, ')}; fix the ensemble config") \
            from None
    if isinstance(cfg.weights, list) and len(cfg.weights) != len(cfg.members):
        raise UserError(f"{path}: {len(cfg.weights)} weights for {len(cfg.members)} members")
    return cfg


def fit_weights(probs: np.ndarray, labels: np.ndarray, method: str, seed: int) -> np.ndarray:
    """Weights maximising macro F1 on these rows: equal weights, each member alone, and seeded Dirichlet
    draws are tried; the best wins (the first of equals, so equal weights win ties)."""
    n_members, _, n_classes = probs.shape
    rng = np.random.default_rng(seed)
    candidates = [np.ones(n_members), *np.eye(n_members), *rng.dirichlet(np.ones(n_members), WEIGHT_CANDIDATES)]
    best, best_f1 = candidates[0], -1.0
    for weights in candidates:
        f1 = fast_macro_f1(labels, combine(probs, weights, method).argmax(axis=1), n_classes)
        if f1 > best_f1:
            best, best_f1 = weights, f1
    return best / best.sum()


def _member_probs(outputs: Path, members: list[str]
                  ) -> tuple[pd.DataFrame, list[str], np.ndarray, np.ndarray, pd.DataFrame]:
    """The members' OOF and test probabilities, aligned on the first member's validation rows (id, crop). The members
    must have validated on the same rows (same validation mode and crops), or their OOF cannot be combined."""
    base, classes = read_oof(outputs / members[0])
    keys = pd.MultiIndex.from_frame(base[["id", "crop"]])
    validation = validation_of(read_run_config(outputs / members[0]))
    oof_probs, test_probs, test_ids = [], [], None
    for member in members:
        oof, member_classes = read_oof(outputs / member)
        member_validation = validation_of(read_run_config(outputs / member))
        if member_validation != validation:
            raise UserError(f"ensemble member {member} was validated on {describe_validation(member_validation)}, "
                            f"{members[0]} on {describe_validation(validation)}; rerun one of them with the other's "
                            "validation section, or their OOF cannot be combined")
        if member_classes != classes or sorted(pd.MultiIndex.from_frame(oof[["id", "crop"]])) != sorted(keys):
            raise UserError(f"ensemble member {member} was trained on other images or artists than {members[0]}")
        oof = oof.set_index(["id", "crop"]).reindex(keys)
        if (oof["fold"].to_numpy() != base["fold"].to_numpy()).any():
            raise UserError(f"ensemble member {member} used other folds than {members[0]}; its OOF cannot be mixed")
        oof_probs.append(oof[classes].to_numpy())
        test_path = ExperimentDir(outputs / member).test_probs
        if not test_path.is_file():
            raise UserError(f"{test_path} not found; finish {member} first")
        test = pd.read_csv(test_path, dtype={"id": str})
        test_ids = test["id"] if test_ids is None else test_ids
        test_probs.append(test.set_index("id").reindex(test_ids)[classes].to_numpy())
    test_frame = pd.DataFrame({"id": test_ids.to_numpy()})
    return base, classes, np.stack(oof_probs), np.stack(test_probs), test_frame


def build_ensemble(cfg: EnsembleConfig, outputs: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """OOF and test probability tables of the ensemble, and what was fitted (for the saved config)."""
    base, classes, oof_probs, test_probs, test_frame = _member_probs(outputs, cfg.members)
    labels = base["artist"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = base["fold"].to_numpy()
    fitted: dict = {}
    if cfg.weights == "fit":
        oof_scores = np.empty(oof_probs.shape[1:])
        per_fold = {}
        for fold in np.unique(folds):
            held_out = folds == fold
            weights = fit_weights(oof_probs[:, ~held_out], labels[~held_out], cfg.method, cfg.seed)
            oof_scores[held_out] = combine(oof_probs[:, held_out], weights, cfg.method)
            per_fold[int(fold)] = weights.round(4).tolist()
        test_weights = fit_weights(oof_probs, labels, cfg.method, cfg.seed)
        # the test weights unrounded: `predict` combines the members' test probabilities with them again
        fitted = {"weights_per_fold": per_fold, "test_weights": test_weights.tolist()}
    else:
        test_weights = np.ones(len(cfg.members)) if cfg.weights is None else np.asarray(cfg.weights)
        oof_scores = combine(oof_probs, test_weights, cfg.method)
    oof = base[["id", "crop", "fold", "artist"]].copy()
    oof["pred"] = np.asarray(classes)[oof_scores.argmax(axis=1)]
    oof = pd.concat([oof.reset_index(drop=True), pd.DataFrame(oof_scores, columns=classes)], axis=1)
    test = pd.concat([test_frame, pd.DataFrame(combine(test_probs, test_weights, cfg.method), columns=classes)],
                     axis=1)
    return oof, test, fitted


def run_ensemble(name: str, data_arg: Optional[str], outputs: Path, submissions: Path,
                 log: Callable[[str], None] = print) -> dict[str, float]:
    """`bash run.sh ensemble NAME`: vote over the finished members of ensemble/NAME.yaml and publish the result
    like an experiment (OUTPUTS/NAME with oof.csv, test_probs.csv and its config.yaml; the submission)."""
    from ..core.config import run_info
    from ..core.files import write_yaml
    from ..data.competition import load_competition_data
    from .publish import publish
    from .resolve import resolve_data_root

    started = time.time()
    cfg = load_ensemble_config(name)
    experiment = ExperimentDir(outputs / name)
    check_free_for(experiment.path, "ensemble")
    data = load_competition_data(resolve_data_root(data_arg), log=log)
    oof, test_probs, fitted = build_ensemble(cfg, outputs)
    if oof["artist"].tolist() != data.train.set_index("id")["artist"].reindex(oof["id"]).tolist():
        raise UserError(f"ensemble {name}: its members were trained on other labels than {data.root}; "
                        "pass the members' data root with --data")
    write_yaml({"name": name, "parent": cfg.members[0], **cfg.model_dump(mode="json"), "fitted": fitted,
                "validation": read_run_config(outputs / cfg.members[0]).get("validation"),
                "run": {**run_info(), "data_root": str(data.root), "data_fingerprint": data.fingerprint()}},
               experiment.config)
    if fitted:
        log(f"{name}: fitted weights per fold {fitted['weights_per_fold']}, for test "
            f"{[round(weight, 4) for weight in fitted['test_weights']]}")
    return publish(name, experiment.path, oof, test_probs, data, submissions, started, log)


def command_ensemble(args: argparse.Namespace) -> None:
    from .resolve import log

    run_ensemble(args.name, args.data, Path(args.outputs), Path(args.submissions), log)
