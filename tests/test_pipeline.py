"""End to end: `run exp00` on tiny demo data writes every promised file, with honest contents."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from src.data.competition import load_competition_data
from src.core.layout import read_saved
from src.data.geometry import validation_set
from src.tools.gpucheck import fresh_predictor, predict_validation
from src.inference.probabilities import read_probs
from src.core.metrics import scores
from src.pipeline.submission import validate_submission

from .conftest import TINY_RUN, resolved, run_cli

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every test here trains, or reads a run trained for the session


def test_every_fold_writes_its_files_and_keeps_only_the_predicting_weights(finished_run):
    """A done fold drops last.pt (optimiser state for resuming) unless train.keep_checkpoints is on."""
    for fold in range(5):
        fold_dir = finished_run["exp"] / f"fold{fold}"
        for name in ("best.pt", "history.csv", "val_probs.csv", "test_probs.csv", "done.json"):
            assert (fold_dir / name).is_file(), f"{fold_dir / name} missing"
        assert not (fold_dir / "last.pt").exists()
        best = torch.load(fold_dir / "best.pt", weights_only=True)
        assert set(best) == {"model", "epoch", "val_macro_f1", "classes", "backbone"}
        history = pd.read_csv(fold_dir / "history.csv")
        assert list(history.columns) == ["epoch", "lr", "train_loss", "val_loss", "val_macro_f1", "val_accuracy",
                                         "val_macro_f1_paintings", "seconds", "train_images_per_s", "data_wait_share"]
        assert history["epoch"].tolist() == [1]


def test_oof_covers_every_train_id_once_with_probabilities(finished_run):
    data = load_competition_data(finished_run["root"])
    oof = pd.read_csv(finished_run["exp"] / "oof.csv", dtype={"id": str})
    assert list(oof.columns[:5]) == ["id", "crop", "fold", "artist", "pred"]
    assert list(oof.columns[5:]) == data.classes
    assert oof["id"].tolist() == [i for i in data.train["id"] for _ in range(4)]  # 4 validation crops each
    assert oof["crop"].tolist() == [0, 1, 2, 3] * len(data.train)
    assert (oof.groupby("id")["fold"].nunique() == 1).all()
    np.testing.assert_allclose(oof[data.classes].sum(axis=1), 1.0, atol=1e-4)
    assert (oof["pred"] == oof[data.classes].idxmax(axis=1)).all()
    assert set(oof["fold"]) == set(range(5))


def test_test_probs_are_the_mean_of_the_fold_models(finished_run):
    data = load_competition_data(finished_run["root"])
    test_probs = pd.read_csv(finished_run["exp"] / "test_probs.csv", dtype={"id": str})
    folds = [pd.read_csv(finished_run["exp"] / f"fold{k}" / "test_probs.csv", dtype={"id": str})
             for k in range(5)]
    expected = np.mean([f[data.classes].to_numpy() for f in folds], axis=0)
    np.testing.assert_allclose(test_probs[data.classes].to_numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(test_probs[data.classes].sum(axis=1), 1.0, atol=1e-4)


def test_submission_follows_sample_submission(finished_run):
    data = load_competition_data(finished_run["root"])
    submission = pd.read_csv(finished_run["submissions"] / "exp00.csv", dtype=str, keep_default_na=False)
    assert submission["id"].tolist() == data.sample_submission["id"].tolist()
    validate_submission(submission, data.sample_submission, data.classes)


def test_resolved_config_records_provenance(finished_run):
    saved = yaml.safe_load((finished_run["exp"] / "config.yaml").read_text())
    assert saved["name"] == "exp00" and saved["model"]["backbone"] == "tf_efficientnet_lite0"
    assert saved["input"]["img_size"] == 48
    assert saved["run"]["profile"] == "demo"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert saved["run"]["git_commit"] == head and len(head) == 40
    assert saved["run"]["packages"]["torch"].startswith("2.")
    assert saved["run"]["packages"]["timm"].startswith("1.0")


def test_rerun_skips_finished_folds_and_prints_scores(finished_run, capsys):
    before = (finished_run["exp"] / "fold0" / "best.pt").stat().st_mtime_ns
    code = run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", finished_run["outputs"],
                   "--submissions", finished_run["submissions"], *TINY_RUN)
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("already complete, skipped") == 5
    assert (finished_run["exp"] / "fold0" / "best.pt").stat().st_mtime_ns == before
    last = out.strip().splitlines()[-1]
    assert "CV macro F1" in last and "demo test macro F1" in last


def test_changed_config_refuses_to_mix_with_finished_folds(finished_run, capsys):
    config = (finished_run["exp"] / "config.yaml").read_text()
    code = run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", finished_run["outputs"],
                   "--submissions", finished_run["submissions"], *TINY_RUN, "optimizer.lr=0.01")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "--restart" in err[0] and "fold0" in err[0]
    assert (finished_run["exp"] / "config.yaml").read_text() == config  # the refused run changed nothing


def test_restart_trains_again_exactly_the_folds_it_names_and_refuses_to_mix_configs(finished_run, tmp_path, capsys):
    """--restart removes the folds the run trains (train.folds) and what was published from them, nothing else; a
    restart of some folds with another config would mix configs, so it is refused with nothing removed."""
    outputs = Path(shutil.copytree(finished_run["outputs"], tmp_path / "outputs"))
    submissions = Path(shutil.copytree(finished_run["submissions"], tmp_path / "submissions"))
    files = {path: path.read_bytes() for path in (outputs / "exp00").rglob("*") if path.is_file()}
    args = ["run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions", submissions,
            *TINY_RUN]
    assert run_cli(*args, "optimizer.lr=0.01", "train.folds=[0]", "--restart") == 2
    err = capsys.readouterr().err
    assert "fold1 holds a fold trained with another config or data, and --restart trains only folds [0] again" in err
    assert all(path.read_bytes() == data for path, data in files.items()), "the refused restart removed nothing"

    assert run_cli(*args, "train.folds=[1]", "--restart") == 0
    out = capsys.readouterr().out
    assert f"--restart: removed fold1, tb/fold1, tb/experiment, oof.csv, test_probs.csv, {submissions / 'exp00.csv'} " \
           f"from {outputs / 'exp00'}, to train folds [1] again" in out
    assert out.count("already complete, skipped") == 0 and "exp00 fold 1 epoch 1/1" in out
    changed = {path for path, data in files.items() if not path.is_file() or path.read_bytes() != data}
    relative = {str(path.relative_to(outputs / "exp00")) for path in changed}
    assert all(name.startswith(("fold1/", "tb/fold1/", "tb/experiment/", ".locks/")) or name in
               ("config.yaml", "oof.csv", "test_probs.csv") for name in relative), relative
    assert "CV macro F1" in out.strip().splitlines()[-1], "all five folds done again: published"


def test_best_epoch_and_early_stopping_follow_the_validation_score(tiny_root, tmp_path, monkeypatch):
    """Validation macro F1 scripted to 0.5, 0.7, 0.6, 0.65 in every fold, patience 2 of 6 epochs: each fold stops
    after epoch 4; best.pt holds epoch 2's weights, val_probs.csv epoch 2's probabilities, and the OOF is made of
    them."""
    from src.training import fold as train

    script, recorded = [0.5, 0.7, 0.6, 0.65], []

    def scripted(labels, probs):
        recorded.append(probs.copy())
        return {**scores(labels, probs), "macro_f1": script[(len(recorded) - 1) % len(script)]}

    monkeypatch.setattr(train, "scores", scripted)
    outputs = tmp_path / "outputs"
    assert run_cli("run", "exp00", "--data", tiny_root, "--outputs", outputs, "--submissions", tmp_path / "s",
                   *TINY_RUN, "data.n_folds=2", "train.epochs=6", "train.patience=2") == 0
    assert len(recorded) == 8  # 4 epochs in each of the 2 folds
    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg = resolved(read_saved(outputs / "exp00").experiment, data)
    oof = read_probs(outputs / "exp00" / "oof.csv")
    for fold in (0, 1):
        fold_dir = outputs / "exp00" / f"fold{fold}"
        assert pd.read_csv(fold_dir / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
        assert torch.load(fold_dir / "best.pt", weights_only=True)["epoch"] == 2
        epoch2 = recorded[4 * fold + 1]
        # The CSVs hold decimal text: pandas/numpy versions differ in whether float32 is written in its
        # shortest form, so compare at float32's resolution (the epochs differ by far more).
        np.testing.assert_allclose(read_probs(fold_dir / "val_probs.csv")[data.classes].to_numpy(), epoch2,
                                   rtol=0, atol=1e-7)
        np.testing.assert_allclose(oof.loc[oof["fold"] == fold, data.classes].to_numpy(), epoch2, rtol=0, atol=1e-7)
        validation = validation_set(cfg, data.train[data.train["id"].isin(oof.loc[oof["fold"] == fold, "id"])])
        predictor = fresh_predictor(cfg, len(data.classes), torch.device("cpu"), fold_dir / "best.pt", data.classes)
        np.testing.assert_allclose(predict_validation(predictor, validation), epoch2, atol=1e-6)
