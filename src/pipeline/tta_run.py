"""`bash run.sh tta EXP --mode hflip|flips|d4`: a finished experiment's validation folds and test set predicted again
with test-time augmentation, from each fold's best.pt, published as the experiment EXP-tta-MODE whose parent is
EXP, so the ablation table shows whether TTA helps."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from ..core.config import run_info
from ..core.errors import UserError
from ..core.files import write_csv, write_yaml
from ..core.layout import ExperimentDir, check_free_for, read_saved
from ..core.runtime import select_device
from ..data.competition import CompetitionData, load_competition_data
from ..data.folds import shared_folds
from ..data.geometry import validation_set
from ..data.image_cache import cache_for
from ..inference.predictor import Predictor
from ..inference.probabilities import probs_frame
from .publish import assemble_oof, mean_test_probs, publish
from .resolve import log, resolve_data_root


def run_tta(source: str, mode: str, data: CompetitionData, outputs: Path, submissions: Path,
            log: Callable[[str], None] = print) -> dict[str, float]:
    started = time.time()
    cfg = read_saved(outputs / source).fine_tuned("TTA")
    name = f"{source}-tta-{mode}"
    experiment, fitted = ExperimentDir(outputs / name), ExperimentDir(outputs / source)
    check_free_for(experiment.path, "tta")
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    predictor = Predictor.for_checkpoints(cfg, len(data.classes), select_device(), tta=mode,
                                          cache=cache_for(cfg, outputs))
    all_folds = list(range(cfg.data.n_folds))
    for fold in all_folds:
        checkpoint = fitted.fold(fold).best
        if not checkpoint.is_file():
            raise UserError(f"{checkpoint} not found; finish {source}'s folds first (bash run.sh {source})")
        predictor.load(checkpoint, data.classes)
        validation = validation_set(cfg, data.train[(folds["fold"] == fold).to_numpy()])
        out = experiment.fold(fold)
        val_probs = predictor.predict(validation.paths, validation.are_crops, validation.boxes,
                                      desc=f"{name} fold {fold}")
        write_csv(probs_frame(validation.ids, val_probs, data.classes, crops=validation.crops), out.val_probs)
        test_probs = predictor.predict(data.test["path"], test=True, desc=f"{name} fold {fold}")
        write_csv(probs_frame(data.test["id"], test_probs, data.classes), out.test_probs)
        log(f"{name} fold {fold}: predicted {validation.describe()} and {len(data.test)} test images")
    write_yaml({"name": name, "parent": source, "description": f"{source} with {mode} TTA", "tta": mode,
                "validation": cfg.validation.model_dump(mode="json"), "source_config": cfg.model_dump(mode="json"),
                "run": {**run_info(), "data_root": str(data.root), "data_fingerprint": data.fingerprint()}},
               experiment.config)
    oof = assemble_oof(experiment.path, data, folds, all_folds, cfg, remedy=f"pass the data root {source} was "
                       f"trained on with --data (its config.yaml names it), then rerun the tta")
    return publish(name, experiment.path, oof,
                   mean_test_probs(experiment.path, data, all_folds), data, submissions, started, log)


def command_tta(args: argparse.Namespace) -> None:
    data = load_competition_data(resolve_data_root(args.data), log=log)
    run_tta(args.experiment, args.mode, data, Path(args.outputs), Path(args.submissions), log=log)
