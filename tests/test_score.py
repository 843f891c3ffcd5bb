"""The ablation table: metrics equal scikit-learn's, and the paired bootstrap separates noise from change."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from src.core.errors import UserError
from src.pipeline.score import (ablation_table, class_report, fast_macro_f1, paired_bootstrap, rank_agreement,
                                resampled_rank_interval, write_ablation)

from .conftest import assert_picture, run_cli

CLASSES = ["Alfred Sisley", "Albrecht Du rer", "Titian", "Claude Monet"]


def fake_experiment(outputs, name, parent, probs, labels, folds, validation=None):
    out = outputs / name
    out.mkdir(parents=True)
    oof = pd.DataFrame({"id": [str(i) for i in range(len(labels))], "fold": folds,
                        "artist": np.asarray(CLASSES)[labels], "pred": np.asarray(CLASSES)[probs.argmax(1)]})
    pd.concat([oof, pd.DataFrame(probs, columns=CLASSES)], axis=1).to_csv(out / "oof.csv", index=False)
    (out / "config.yaml").write_text(yaml.safe_dump({"name": name, "parent": parent, "validation": validation}))


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    good = np.eye(4)[labels] * 2 + rng.random((400, 4)) * 1.5   # mostly right
    good /= good.sum(1, keepdims=True)
    return labels, good, np.arange(400) % 5


def test_fast_macro_f1_equals_scikit_learn():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y, p = rng.integers(0, 6, 50), rng.integers(0, 7, 50)
        assert fast_macro_f1(y, p, 7) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_table_scores_equal_scikit_learn(tmp_path, arrays):
    labels, probs, folds = arrays
    fake_experiment(tmp_path, "a", None, probs, labels, folds)
    row = ablation_table(tmp_path, ["a"]).iloc[0]
    pred = probs.argmax(1)
    assert row["oof_macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert row["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    per_fold = [f1_score(labels[folds == k], pred[folds == k], average="macro") for k in range(5)]
    assert row["fold_f1_mean"] == pytest.approx(np.mean(per_fold))
    assert row["fold_f1_std"] == pytest.approx(np.std(per_fold, ddof=1))
    top3 = np.mean([label in np.argsort(-p)[:3] for label, p in zip(labels, probs)])
    assert row["top3_accuracy"] == pytest.approx(top3)


def test_bootstrap_of_an_experiment_against_itself_is_zero(arrays):
    labels, probs, _ = arrays
    pred = probs.argmax(1)
    assert paired_bootstrap(labels, pred, pred, 4) == (0.0, 0.0)


def test_bootstrap_against_a_shuffled_copy_excludes_zero(arrays):
    labels, probs, _ = arrays
    pred = probs.argmax(1)
    shuffled = np.random.default_rng(3).permutation(pred)
    low, high = paired_bootstrap(labels, pred, shuffled, 4)
    assert low > 0 and high > low


@pytest.mark.slow
def test_delta_against_the_parent_and_files(tmp_path, arrays):
    labels, probs, folds = arrays
    fake_experiment(tmp_path, "base", None, probs, labels, folds)
    worse = probs.copy()
    worse[:100] = worse[:100, ::-1]
    fake_experiment(tmp_path, "child", "base", worse, labels, folds)
    table = write_ablation(tmp_path, ["base", "child"])
    child = table.set_index("experiment").loc["child"]
    expected = f1_score(labels, worse.argmax(1), average="macro") - f1_score(labels, probs.argmax(1), average="macro")
    assert child["delta_vs_parent"] == pytest.approx(expected)
    assert child["delta_ci_low"] <= expected <= child["delta_ci_high"] < 0
    assert (tmp_path / "ablation.csv").is_file() and "| child | base |" in (tmp_path / "ablation.md").read_text()
    report, *pngs = class_report(tmp_path / "child")  # no fold histories: no training curves
    assert len(pd.read_csv(report)) == 4 and [png.name for png in pngs] == ["per_class_f1.png", "confusion_matrix.png"]
    for png in pngs:
        assert_picture(png)


CROPS = {"mode": "crops", "crops_per_image": 4, "crop_area": [0.2, 0.3], "seed": 0}


def test_a_child_validated_otherwise_than_its_parent_gets_no_delta(tmp_path, arrays):
    labels, probs, folds = arrays
    fake_experiment(tmp_path, "whole", None, probs, labels, folds)
    fake_experiment(tmp_path, "cropped", "whole", probs, labels, folds, validation=CROPS)
    fake_experiment(tmp_path, "cropped2", "cropped", probs, labels, folds, validation=CROPS)
    table = ablation_table(tmp_path, ["whole", "cropped", "cropped2"]).set_index("experiment")
    assert table.loc["whole", "validation"] == "whole paintings"
    assert table.loc["cropped", "validation"] == "4 crops of 20%-30%"
    assert np.isnan(table.loc["cropped", "delta_vs_parent"]) and table.loc["cropped2", "delta_vs_parent"] == 0


def test_the_table_says_how_well_the_oof_ranks_the_experiments_on_the_test(tmp_path, arrays):
    """Spearman's rank correlation over the experiments with a test score: OOF order a < b < c against test order
    c < a < b gives ranks (1, 2, 3) and (2, 3, 1): 1 - 6 * (1 + 1 + 4) / (3 * 8) = -0.5."""
    table = pd.DataFrame({"validation": ["whole paintings"] * 3, "oof_macro_f1": [0.5, 0.6, 0.7],
                          "test_macro_f1": [0.4, 0.45, 0.3]})
    assert rank_agreement(table) == ("Spearman rank correlation of OOF and test macro F1 over the 3 experiments "
                                     "validated on whole paintings: -0.50")
    assert rank_agreement(table.head(2)) == ""


def test_the_rank_interval_follows_the_test_noise():
    """Three experiments right on 10, 50 and 90 of 100 test images: every resample keeps their order, so the
    interval is +1 to +1. When the last two differ by one image each (image 49 for one, 60 for the other), a
    resample that draws image 49 more often than 60 swaps them (Spearman +0.5), one that draws them equally often
    ties them (+0.87): the interval then runs from +0.5 to +1. Independent resamples per experiment would swap
    even experiments right on nested sets of images."""
    truth = np.arange(100) % 4

    def right_on(images):
        pred = (truth + 1) % 4
        pred[list(images)] = truth[list(images)]
        return truth, pred

    oof = np.array([0.5, 0.6, 0.7])
    a, b, c = right_on(range(10)), right_on(range(50)), right_on(range(90))
    assert resampled_rank_interval(oof, [a, b, c], samples=200) == (1.0, 1.0)
    assert resampled_rank_interval(oof, [a, b, right_on([*range(49), 60])], samples=200) == (0.5, 1.0)
    # the same resample for every experiment: right on a superset of b's images, c never falls below b
    low, high = resampled_rank_interval(oof, [a, b, right_on(range(51))], samples=200)
    assert low == pytest.approx(np.sqrt(3) / 2) and high == 1.0
    table = pd.DataFrame({"experiment": ["a", "b", "c"], "validation": ["whole paintings"] * 3,
                          "oof_macro_f1": oof, "test_macro_f1": [0.1, 0.5, 0.9]})
    table.attrs["test_predictions"] = {"a": a, "b": b, "c": c}
    assert rank_agreement(table).endswith("whole paintings: +1.00 (95% interval over resamples of the 100 test "
                                          "images: +1.00 to +1.00)")


def test_missing_oof_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="oof.csv not found"):
        ablation_table(tmp_path, ["nothere"])


@pytest.mark.slow
def test_score_command_on_a_finished_run(finished_run, capsys):
    code = run_cli("score", "--outputs", finished_run["outputs"], "--detail", "exp00")
    out = capsys.readouterr().out
    assert code == 0 and "| exp00 |" in out
    for name in ("confusion_matrix.png", "per_class_f1.png", "training_curves.png"):
        assert_picture(finished_run["exp"] / name)
