"""Tuning: a tiny search space on the demo data, TPE trials that are ordinary experiment runs on the shared folds,
per-epoch median pruning only after the trial's lr warm-up (made certain by scripted validation scores), no
last.pt left by a trial that ended, a study that a rerun resumes, the trials table and picture, and the best delta
as a config that resolves; the shipped spaces fit the rungs of their family, the default space is the experiment's
family's, and search-space mistakes stop with one line."""
from __future__ import annotations

import functools
import re
import shutil
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml

from src.training import fold as train
from src.core.config import resolve_config
from src.core.distributed import SINGLE_PROCESS
from src.core.paths import CONFIG_DIR, TUNE_DIR
from src.core.errors import UserError
from src.data.loader import ImageDataset
from src.tools.tune import load_space, run_tune, space_path, warmup_of
from src.training.loop import train_loader_for

from .conftest import TINY_RUN, assert_picture, run_cli
from .test_tracking import assert_tensorboard_matches_history

SPACE = """params:
  optimizer.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  model.head_dropout: {type: categorical, choices: [0.0, 0.2]}
seed: 3
pruner_startup_trials: 1
prune_from_epoch: 1
"""
# Validation macro F1 of each epoch, trial after trial, 3 epochs each: trial 0 ends at 0.65, trial 1 at 0.85 (the
# best); trial 2 opens at 0.1, below the median (0.6) of the earlier trials' first epochs, but its lr warm-up (one
# iteration) runs in epoch 1, so it is judged from epoch 2 on, and pruned there (0.2 against a median of 0.7).
SCRIPTED = [0.5, 0.6, 0.65, 0.7, 0.8, 0.85, 0.1, 0.2]
# train.keep_checkpoints keeps a finished fold's last.pt in a plain run; a trial drops it all the same.
WARMUP = ["scheduler.name=cosine", "scheduler.warmup_steps=1", "train.epochs=3", "train.keep_checkpoints=true"]


@pytest.mark.slow
def test_tune_runs_trials_prunes_after_the_warmup_resumes_and_writes_the_best_config(tiny_root, tmp_path,
                                                                                       monkeypatch, capsys):
    calls = []

    def scripted(labels, probs):
        real = train_scores(labels, probs)
        calls.append(SCRIPTED[len(calls)])
        return {**real, "macro_f1": calls[-1]}

    train_scores = train.scores
    monkeypatch.setattr(train, "scores", scripted)
    (tmp_path / "tiny.yaml").write_text(SPACE)
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy2(CONFIG_DIR / "exp00.yaml", configs / "exp00.yaml")
    outputs = tmp_path / "outputs"
    args = ["tune", "exp00", "--space", tmp_path / "tiny.yaml", "--trials", "3", "--folds", "0", "--data", tiny_root,
            "--outputs", outputs, "--best-config", configs / "exp00_tiny_tuned.yaml", *TINY_RUN, *WARMUP]
    assert run_cli(*args) == 0
    assert len(calls) == 8, "three epochs for trials 0 and 1, two for trial 2, pruned after its warm-up"
    out = capsys.readouterr().out
    assert "exp00-tiny-t002: pruned at epoch 1" not in out
    assert "exp00-tiny-t002: pruned at epoch 2 of fold 0: val macro F1 0.2000" in out
    [(warmup, steps)] = re.findall(r"exp00-tiny-t000: pruning from epoch 2 of fold 0 \(lr warm-up (\d+) iterations, "
                                   r"[\d.]+ epochs of (\d+)\); prune_from_epoch 1", out)
    [images] = re.findall(r"exp00-tiny-t000 fold 0: (\d+) train / ", out)
    assert (int(warmup), int(steps)) == (1, int(images) // 8), "the iterations of an epoch are the loader's"

    study = optuna.load_study(study_name="exp00-tiny", storage=f"sqlite:///{outputs / 'tune' / 'exp00-tiny.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [t.intermediate_values for t in study.trials] == [{1: 0.5, 2: 0.6, 3: 0.65}, {1: 0.7, 2: 0.8, 3: 0.85},
                                                             {1: 0.1, 2: 0.2}]
    assert [t.value for t in study.trials[:2]] == [0.65, 0.85]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3, "TPE proposed three different points"

    trial_dirs = sorted((outputs / "tune" / "exp00-tiny").glob("exp00-tiny-t*"))
    assert [d.name for d in trial_dirs] == ["exp00-tiny-t000", "exp00-tiny-t001", "exp00-tiny-t002"]
    assert [len(pd.read_csv(d / "fold0" / "history.csv")) for d in trial_dirs] == [3, 3, 2]
    assert [(d / "fold0" / "done.json").is_file() for d in trial_dirs] == [True, True, False]
    assert not list((outputs / "tune").rglob("last.pt")), "no trial that ended keeps what resumes"
    assert [(d / "fold0" / "best.pt").is_file() for d in trial_dirs] == [True, True, False], \
        "a finished fold keeps what predicts, the pruned trial nothing"
    assert "exp00-tiny-t002: removed " in out
    for trial, folder in zip(study.trials, trial_dirs):
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])
        assert saved["model"]["head_dropout"] == trial.params["model.head_dropout"]
        assert saved["train"]["folds"] == [0] and saved["train"]["epochs"] == 3
    assert_tensorboard_matches_history(trial_dirs[0] / "fold0", trial_dirs[0] / "tb" / "fold0")
    assert len(list((outputs / "folds").glob("*.csv"))) == 1, "every trial used the shared folds"

    table = pd.read_csv(outputs / "tune" / "exp00-tiny" / "trials.csv")
    assert table["state"].tolist() == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert table["epochs_reported"].tolist() == [3, 3, 2]
    assert "| 1 | COMPLETE | 0.85 |" in (outputs / "tune" / "exp00-tiny" / "trials.md").read_text()
    assert_picture(outputs / "tune" / "exp00-tiny" / "trials.png")

    best = yaml.safe_load((configs / "exp00_tiny_tuned.yaml").read_text())
    assert best["parent"] == "exp00"
    assert best["optimizer"]["lr"] == pytest.approx(study.trials[1].params["optimizer.lr"])
    tuned, _ = resolve_config("exp00_tiny_tuned", config_dir=configs)
    assert tuned.model.head_dropout == study.trials[1].params["model.head_dropout"]

    capsys.readouterr()
    assert run_cli(*args) == 0, "a rerun resumes the study: three trials are already finished"
    assert "exp00-tiny: 3 of 3 trials finished" in capsys.readouterr().out
    storage = f"sqlite:///{outputs / 'tune' / 'exp00-tiny.db'}"
    assert len(calls) == 8 and len(optuna.load_study(study_name="exp00-tiny", storage=storage).trials) == 3


@pytest.mark.parametrize("images, batch, sampler", [(30, 8, "none"), (32, 8, "none"), (5, 8, "none"),
                                                   (30, 4, "inverse_log_count")])
def test_the_warmup_that_gates_pruning_is_counted_in_the_training_loaders_iterations(images, batch, sampler):
    cfg, _ = resolve_config("exp21", None, [f"train.batch_size={batch}", f"train.sampler={sampler}",
                                            "scheduler.warmup_epochs=1.5"])
    labels = [i % 3 for i in range(images)]
    loader = train_loader_for(ImageDataset([f"{i}.jpg" for i in range(images)], labels, transform=None),
                              np.array(labels), cfg, torch.device("cpu"), 0, SINGLE_PROCESS, 0, 0)
    assert warmup_of(cfg, images) == (round(1.5 * len(loader)), len(loader))
    steps_cfg, _ = resolve_config("exp21", None, [f"train.batch_size={batch}", "scheduler.warmup_steps=7"])
    assert warmup_of(steps_cfg, images) == (7, len(loader))
    assert warmup_of(resolve_config("exp00", None, [f"train.batch_size={batch}"])[0], images) == (0, len(loader)), \
        "a constant lr has no warm-up"


@pytest.mark.parametrize("experiment", [f"exp{n:02d}" for n in range(26)])
def test_the_default_space_is_the_experiments_familys_and_holds_the_rungs_own_values(experiment):
    """exp00-21 (the 2022 ladder) get cnn, exp22-25 (ViTs with layer-wise lr decay) vit, and every value a rung sets
    for a searched key lies inside the searched range: the search is around the recipe it tunes."""
    cfg, _ = resolve_config(experiment)
    lines = []
    path = space_path("auto", cfg, lines.append)
    family = "vit" if experiment >= "exp22" else "cnn"
    assert path == TUNE_DIR / f"{family}.yaml" and lines[0].startswith(f"{experiment}: search space {family} (")
    space = load_space(path, experiment, None, [])
    for key, param in space.params.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value is None:  # a warm-up the rung states in iterations (warmup_steps)
            continue
        inside = value in param.choices if param.type == "categorical" else param.low <= value <= param.high
        assert inside, f"{experiment}: {key}={value} is outside the {family} space's {param}"


@pytest.mark.parametrize("space, message", [
    ("params:\n  optimizer.lrate: {type: float, low: 0.001, high: 0.01}\n",
     "space.yaml: unknown config key 'optimizer.lrate'"),
    ("params:\n  optimizer.lr: {type: float, low: -1.0, high: 0.01}\n",
     "space.yaml: params.optimizer.lr: -1.0 is not a valid value of optimizer.lr ('optimizer.lr': Input should be "
     "greater than 0"),
    ("params:\n  train.batch_size: {type: categorical}\n",
     "space.yaml: 'params.train.batch_size': a categorical parameter needs choices (and no low/high); fix the "
     "search space"),
    ("params:\n  optimizer.lr: {type: float, low: 0.01, high: 0.001}\n", "a float parameter needs low < high"),
    ("params: {}\nsampler: tpe\n", "space.yaml: 'params': Dictionary should have at least 1 item"),
])
def test_search_space_mistakes_stop_with_one_line(tmp_path, space, message):
    (tmp_path / "space.yaml").write_text(space)
    with pytest.raises(UserError) as info:
        load_space(tmp_path / "space.yaml", "exp00", "demo", [])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tune_without_optuna_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(UserError, match=r"^tune needs the package optuna, which is not installed; "
                       r"run: pip install 'optuna>=5\.0,<6'$"):
        run_tune("exp00", TUNE_DIR / "cnn.yaml", 1, [0], None, None, tmp_path, [], None, "")
