"""Frozen-feature baselines (same OOF and submission as fine-tuning) and few-shot prototypes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.core.errors import UserError
from src.training.frozen import FEATURE_DIR, build_classifier, cache_path, class_probabilities
from src.tools.fewshot import PrototypeClassifier, evaluate_episodes
from src.data.geometry import validation_set
from src.pipeline.submission import validate_submission

from .conftest import TINY_RUN, resolved, run_cli


@pytest.mark.slow
def test_frozen_feature_run_writes_a_valid_oof_and_submission(tiny_root, tmp_path, capsys):
    outputs, submissions = tmp_path / "outputs", tmp_path / "submissions"
    assert run_cli("run", "feat01", "--data", tiny_root, "--outputs", outputs, "--submissions", submissions,
                   *TINY_RUN) == 0
    data = load_competition_data(tiny_root)
    cfg = resolved(resolve_config("feat01", "demo", TINY_RUN[2:])[0], data)
    validation = validation_set(cfg, data.train)
    oof = pd.read_csv(outputs / "feat01" / "oof.csv", dtype={"id": str})
    assert list(zip(oof["id"], oof["crop"])) == list(zip(validation.ids, validation.crops))
    assert list(oof.columns[5:]) == data.classes
    np.testing.assert_allclose(oof[data.classes].sum(axis=1), 1.0, atol=1e-6)
    submission = pd.read_csv(submissions / "feat01.csv", dtype=str, keep_default_na=False)
    validate_submission(submission, data.sample_submission, data.classes)

    # Fold 0's OOF rows are the configured classifier, fitted on the other folds' cached features of whole
    # paintings, predicting the cached features of fold 0's validation crops.
    features = np.load(cache_path(cfg, data.train["path"].tolist(), outputs / FEATURE_DIR, test=False))["features"]
    crops = np.load(cache_path(cfg, validation.paths, outputs / FEATURE_DIR, test=True,
                               boxes=validation.boxes))["features"]
    is_val = (oof.drop_duplicates("id").set_index("id").reindex(data.train["id"])["fold"] == 0).to_numpy()
    classifier = build_classifier(cfg.frozen, seed=cfg.seed).fit(features[~is_val], data.train["label"][~is_val])
    is_val_row = np.isin(validation.ids, data.train["id"][is_val])
    expected = class_probabilities(classifier, crops[is_val_row], len(data.classes))
    np.testing.assert_allclose(oof[is_val_row][data.classes].to_numpy(), expected, atol=1e-6)

    # Another frozen-feature config reuses the cached features instead of embedding again.
    capsys.readouterr()
    assert run_cli("run", "feat02", "--data", tiny_root, "--outputs", outputs, "--submissions", submissions,
                   *TINY_RUN) == 0
    out = capsys.readouterr().out
    assert out.count("features: ") == 3 and "embedded" not in out  # train, validation crops, test
    assert (submissions / "feat02.csv").is_file()


@pytest.mark.slow
def test_tta_of_a_frozen_feature_experiment_is_refused(tiny_root, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    (outputs / "feat01").mkdir(parents=True)
    cfg = resolve_config("feat01", "demo")[0]
    (outputs / "feat01" / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert run_cli("tta", "feat01", "--data", tiny_root, "--outputs", outputs) == 2
    assert "frozen-feature" in capsys.readouterr().err


def test_prototypes_are_exact_on_orthogonal_embeddings():
    basis = np.eye(4)
    classifier = PrototypeClassifier()
    for k, name in enumerate("abc"):
        classifier.add_class(name, basis[k] * np.array([[1.0], [3.0], [0.5]]))  # one direction, three lengths
    queries = np.array([2 * basis[0], 0.8 * basis[1] + 0.6 * basis[2], basis[3] + basis[2]])
    np.testing.assert_allclose(classifier.similarities(queries),
                               [[1, 0, 0], [0, 0.8, 0.6], [0, 0, 1 / np.sqrt(2)]], atol=1e-12)
    assert classifier.predict(queries) == ["a", "b", "c"]
    classifier.add_class("d", basis[3][None, :])  # a new class from one example, nothing else changes
    assert classifier.predict(queries) == ["a", "b", "c"]
    assert classifier.predict(basis[3] + 0.1 * basis[0]) == ["d"]


def test_episodes_are_perfect_on_separated_classes_and_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 12)
    separated = np.eye(16)[labels] + 0.05 * rng.normal(size=(len(labels), 16))
    table = evaluate_episodes(separated, labels, ways=5, shots=[1, 5], queries=2, episodes=50)
    assert table["accuracy"].tolist() == [1.0, 1.0] and table["shots"].tolist() == [1, 5]
    noise_labels = np.repeat(np.arange(40), 20)  # embeddings unrelated to the labels: accuracy is chance, 1/4
    noise = rng.normal(size=(len(noise_labels), 32))
    chance = evaluate_episodes(noise, noise_labels, ways=4, shots=[1], queries=5, episodes=400).iloc[0]
    assert abs(chance["accuracy"] - 0.25) < 0.03 and chance["chance"] == 0.25
    assert chance["ci_low"] < chance["accuracy"] < chance["ci_high"] and chance["ci_high"] - chance["ci_low"] < 0.06
    with pytest.raises(UserError, match="only 0 artists have 13 images"):
        evaluate_episodes(separated, labels, ways=5, shots=[10], queries=3, episodes=5)
