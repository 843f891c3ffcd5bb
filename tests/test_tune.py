"""Tuning: a tiny search space on the demo data, TPE trials that are ordinary experiment runs on the shared folds,
per-epoch median pruning (made certain by scripted validation scores), a study that a rerun resumes, the trials
table and picture, and the best delta as a config that resolves; search-space mistakes stop with one line."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from src.training import fold as train
from src.core.config import resolve_config
from src.core.paths import CONFIG_DIR
from src.core.errors import UserError
from src.tools.tune import load_space, run_tune

from .conftest import TINY_RUN, assert_picture, run_cli
from .test_tracking import assert_tensorboard_matches_history

SPACE = """params:
  optimizer.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  model.head_dropout: {type: categorical, choices: [0.0, 0.2]}
seed: 3
pruner_startup_trials: 1
prune_from_epoch: 1
"""
# Validation macro F1 of each epoch, trial after trial: trial 0 ends at 0.6, trial 1 at 0.8 (the best), trial 2
# opens at 0.1, below the median (0.6) of the earlier trials' first epochs, and is pruned there.
SCRIPTED = [0.5, 0.6, 0.7, 0.8, 0.1]


@pytest.mark.slow
def test_tune_runs_trials_prunes_resumes_and_writes_the_best_config(tiny_root, tmp_path, monkeypatch, capsys):
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
            "--outputs", outputs, "--best-config", configs / "exp00_tiny_tuned.yaml", *TINY_RUN, "train.epochs=2"]
    assert run_cli(*args) == 0
    assert len(calls) == 5, "two epochs for trials 0 and 1, one for the pruned trial 2"

    study = optuna.load_study(study_name="exp00-tiny", storage=f"sqlite:///{outputs / 'tune' / 'exp00-tiny.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [t.intermediate_values for t in study.trials] == [{1: 0.5, 2: 0.6}, {1: 0.7, 2: 0.8}, {1: 0.1}]
    assert [t.value for t in study.trials[:2]] == [0.6, 0.8]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3, "TPE proposed three different points"

    trial_dirs = sorted((outputs / "tune" / "exp00-tiny").glob("exp00-tiny-t*"))
    assert [d.name for d in trial_dirs] == ["exp00-tiny-t000", "exp00-tiny-t001", "exp00-tiny-t002"]
    assert [len(pd.read_csv(d / "fold0" / "history.csv")) for d in trial_dirs] == [2, 2, 1]
    assert [(d / "fold0" / "done.json").is_file() for d in trial_dirs] == [True, True, False]
    for trial, folder in zip(study.trials, trial_dirs):
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])
        assert saved["model"]["head_dropout"] == trial.params["model.head_dropout"]
        assert saved["train"]["folds"] == [0] and saved["train"]["epochs"] == 2
    assert_tensorboard_matches_history(trial_dirs[0] / "fold0", trial_dirs[0] / "tb" / "fold0")
    assert len(list((outputs / "folds").glob("*.csv"))) == 1, "every trial used the shared folds"

    table = pd.read_csv(outputs / "tune" / "exp00-tiny" / "trials.csv")
    assert table["state"].tolist() == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert table["epochs_reported"].tolist() == [2, 2, 1]
    assert "| 1 | COMPLETE | 0.8 |" in (outputs / "tune" / "exp00-tiny" / "trials.md").read_text()
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
    assert len(calls) == 5 and len(optuna.load_study(study_name="exp00-tiny", storage=storage).trials) == 3


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
    with pytest.raises(UserError, match=r"^tune needs the package optuna; run: pip install optuna==5.0.0$"):
        run_tune("exp00", Path("configs/tune/basic.yaml"), 1, [0], None, None, tmp_path, [], None, "")
