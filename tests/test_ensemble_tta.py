"""Voting on hand-made cases, TTA against flip-(in)variant models, and both commands end to end."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.config import CONFIG_DIR
from src.ensemble import ENSEMBLE_DIR, fit_weights, hard_vote, load_ensemble_config, soft_vote
from src.errors import UserError
from src.train import prepare_model
from src.tta import with_tta

from .conftest import run_cli


def test_soft_vote_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(3, 10))
    weights = np.array([1.0, 2.0, 5.0])
    expected = (probs[0] * 1 + probs[1] * 2 + probs[2] * 5) / 8
    np.testing.assert_allclose(soft_vote(probs, weights), expected)


def test_hard_vote_majority_and_tie_broken_by_summed_probability():
    # image 0: votes A, A, B -> A. image 1: votes A, B (tie); summed probability favours B.
    probs = np.array([
        [[0.6, 0.4, 0.0], [0.51, 0.49, 0.0]],
        [[0.7, 0.3, 0.0], [0.1, 0.9, 0.0]],
        [[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]],
    ])
    two_members = probs[:2]
    assert hard_vote(probs, np.ones(3))[0].argmax() == 0
    tie = hard_vote(two_members, np.ones(2))[1]
    assert tie.argmax() == 1  # A: 0.51 + 0.1 = 0.61, B: 0.49 + 0.9 = 1.39
    np.testing.assert_allclose(hard_vote(probs, np.ones(3)).sum(axis=1), 1.0)
    # a vote always outweighs any probability: member 2's confident B loses to two votes for A
    assert hard_vote(np.array([[[0.34, 0.33, 0.33]], [[0.34, 0.33, 0.33]], [[0.0, 1.0, 0.0]]]),
                     np.ones(3))[0].argmax() == 0


def test_fitted_weights_prefer_the_better_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    good = np.eye(3)[labels] + rng.random((300, 3)) * 0.8
    bad = rng.random((300, 3))
    weights = fit_weights(np.stack([bad, good]), labels, "soft", seed=0)
    assert weights[1] > weights[0] and weights.sum() == pytest.approx(1.0)


class Symmetric(nn.Module):
    """Flip-invariant: depends only on the per-channel mean."""

    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], dim=1) * 3


class LeftHeavy(nn.Module):
    """Not flip-invariant: looks at the left half only."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].mean((1, 2, 3))
        return torch.stack([left, -left], dim=1) * 3


def test_hflip_tta_leaves_an_invariant_model_unchanged():
    x = torch.rand(4, 3, 8, 8)
    plain = torch.softmax(Symmetric()(x), 1)
    tta = torch.softmax(with_tta(Symmetric(), "hflip")(x), 1)
    torch.testing.assert_close(tta, plain)


def test_hflip_tta_averages_the_two_views_probabilities():
    x = torch.rand(4, 3, 8, 8)
    model = LeftHeavy()
    expected = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1)) / 2
    torch.testing.assert_close(torch.softmax(with_tta(model, "hflip")(x), 1), expected)


def test_rotating_tta_refuses_non_square_inputs():
    with pytest.raises(UserError, match="swaps height and width"):
        with_tta(Symmetric(), "d4")(torch.rand(2, 3, 8, 12))
    assert with_tta(Symmetric(), "flips")(torch.rand(2, 3, 8, 12)).shape == (2, 2)


def test_tta_and_ensemble_commands_end_to_end(finished_run, tmp_path, monkeypatch):
    from src import ensemble, experiment

    args = ["--data", finished_run["root"], "--outputs", finished_run["outputs"], "--submissions",
            finished_run["submissions"]]
    prepared = []
    monkeypatch.setattr(experiment, "prepare_model", lambda model, cfg, *rest: prepared.append(cfg.speed) or
                        prepare_model(model, cfg, *rest))
    assert run_cli("tta", "exp00", "--mode", "hflip", *args) == 0
    assert len(prepared) == 5, "each fold model goes through the training's speed switches"
    tta_dir = finished_run["outputs"] / "exp00-tta-hflip"
    oof = pd.read_csv(tta_dir / "oof.csv", dtype={"id": str})
    base = pd.read_csv(finished_run["exp"] / "oof.csv", dtype={"id": str})
    assert oof["id"].tolist() == base["id"].tolist() and (oof["fold"] == base["fold"]).all()
    assert (finished_run["submissions"] / "exp00-tta-hflip.csv").is_file()

    (tmp_path / "pair.yaml").write_text("members: [exp00, exp00-tta-hflip]\nmethod: hard\nweights: fit\n")
    monkeypatch.setattr(ensemble, "ENSEMBLE_DIR", tmp_path)
    assert run_cli("ensemble", "pair", *args) == 0
    ens = pd.read_csv(finished_run["outputs"] / "pair" / "oof.csv", dtype={"id": str})
    assert sorted(ens["id"]) == sorted(base["id"])
    submission = pd.read_csv(finished_run["submissions"] / "pair.csv")
    sample = pd.read_csv(finished_run["root"] / "sample_submission.csv")
    assert submission["id"].tolist() == sample["id"].tolist()


def test_shipped_ensembles_name_existing_experiments():
    names = sorted(p.stem for p in ENSEMBLE_DIR.glob("*.yaml"))
    assert {"ens01", "ens02", "ens03", "demo"} <= set(names)
    for name in names:
        for member in load_ensemble_config(name).members:
            assert (CONFIG_DIR / f"{member}.yaml").is_file(), (name, member)
