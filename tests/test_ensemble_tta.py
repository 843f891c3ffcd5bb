"""Voting on hand-made cases, TTA against flip-(in)variant models, and both commands end to end."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.core.paths import CONFIG_DIR
from src.data.competition import load_competition_data
from src.core.paths import ENSEMBLE_DIR
from src.inference.voting import hard_vote, soft_vote
from src.pipeline.ensemble import fit_weights, load_ensemble_config
from src.core.errors import UserError
from src.core.layout import read_saved
from src.data.geometry import validation_set
from src.tools.gpucheck import fresh_predictor
from src.data.device_input import InputStage
from src.data.loader import ImageDataset
from src.model.networks import normalisation
from src.model.prepare import prepare_model
from src.data.transforms import build_eval_transform
from src.inference.tta import with_tta

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


def test_hard_vote_with_unequal_weights_stores_vote_shares_and_breaks_ties_by_summed_probability():
    """Weights 2, 1, 1: member 0's vote for A weighs as much as members 1 and 2 voting B, so image 0 is a tie that
    the summed probability settles (B: 0.45 + 0.9 + 0.8 beats A); on image 1 B has all three votes."""
    probs = np.array([
        [[0.55, 0.45, 0.0], [0.2, 0.8, 0.0]],
        [[0.1, 0.9, 0.0], [0.4, 0.6, 0.0]],
        [[0.2, 0.8, 0.0], [0.3, 0.7, 0.0]],
    ])
    scores = hard_vote(probs, np.array([2.0, 1.0, 1.0]))
    assert scores[0].argmax() == 1 and scores[1].argmax() == 1
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    np.testing.assert_allclose(scores[0, :2], [0.5, 0.5], atol=1e-3)  # the vote shares, 2 of 4 each
    np.testing.assert_allclose(scores[1, :2], [0.0, 1.0], atol=1e-3)
    flipped = probs.copy()
    flipped[0, 0], flipped[1, 0], flipped[2, 0] = [0.99, 0.01, 0.0], [0.45, 0.55, 0.0], [0.48, 0.52, 0.0]
    assert hard_vote(flipped, np.array([2.0, 1.0, 1.0]))[0].argmax() == 0  # now A's summed probability is higher


def test_fitted_weights_are_fitted_without_the_fold_they_score(tmp_path, monkeypatch):
    """Observing fit_weights: fold k's weights are fitted on exactly the other folds' rows, the test weights on all
    rows, and the saved ensemble config holds both."""
    from src.pipeline import ensemble

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    ids = [str(i) for i in range(30)]
    folds = np.repeat(np.arange(3), 10)
    labels = rng.integers(0, 3, 30)
    for member in ("m1", "m2"):
        probs = rng.dirichlet(np.ones(3), 30)
        oof = pd.DataFrame({"id": ids, "crop": -1, "fold": folds, "artist": np.array(classes)[labels],
                            "pred": np.array(classes)[probs.argmax(1)]})
        (tmp_path / member).mkdir()
        pd.concat([oof, pd.DataFrame(probs, columns=classes)], axis=1).to_csv(tmp_path / member / "oof.csv",
                                                                              index=False)
        pd.DataFrame({"id": ["t0", "t1"], **{c: [1 / 3, 1 / 3] for c in classes}}).to_csv(
            tmp_path / member / "test_probs.csv", index=False)
    calls = []

    def recording(probs, fitted_labels, method, seed):
        calls.append((probs.shape[1], fitted_labels.copy()))
        return fit_weights(probs, fitted_labels, method, seed)

    monkeypatch.setattr(ensemble, "fit_weights", recording)
    cfg = ensemble.EnsembleConfig(members=["m1", "m2"], weights="fit")
    _, _, fitted = ensemble.build_ensemble(cfg, tmp_path)
    assert [rows for rows, _ in calls] == [20, 20, 20, 30]
    for fold, (_, fitted_labels) in enumerate(calls[:3]):
        np.testing.assert_array_equal(fitted_labels, labels[folds != fold])
    np.testing.assert_array_equal(calls[3][1], labels)
    assert sorted(fitted["weights_per_fold"]) == [0, 1, 2] and len(fitted["test_weights"]) == 2


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


def views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The TTA views built by hand: flips = identity, horizontal, vertical, both; d4 = the four rotations of the
    image and of its mirror image."""
    if mode == "flips":
        return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    return [torch.rot90(image, k, dims=(-2, -1)) for image in (x, x.flip(-1)) for k in range(4)]


@pytest.mark.parametrize("mode", ["flips", "d4"])
def test_flips_and_d4_tta_average_the_hand_made_views_after_softmax(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    x = torch.rand(2, 3, 8, 8)
    model(x)
    expected = torch.stack([torch.softmax(model(view), 1) for view in views(x, mode)]).mean(0)
    torch.testing.assert_close(torch.softmax(with_tta(model, mode)(x), 1), expected)
    logits_mean = torch.softmax(torch.stack([model(view) for view in views(x, mode)]).mean(0), 1)
    assert not torch.allclose(expected, logits_mean, atol=1e-4)  # probabilities, not logits, are averaged


def test_rotating_tta_refuses_non_square_inputs():
    with pytest.raises(UserError, match="swaps height and width"):
        with_tta(Symmetric(), "d4")(torch.rand(2, 3, 8, 12))
    assert with_tta(Symmetric(), "flips")(torch.rand(2, 3, 8, 12)).shape == (2, 2)


@pytest.mark.slow
def test_tta_and_ensemble_commands_end_to_end(finished_run, tmp_path, monkeypatch):
    from src.inference import predictor
    from src.pipeline import ensemble

    args = ["--data", finished_run["root"], "--outputs", finished_run["outputs"], "--submissions",
            finished_run["submissions"]]
    prepared = []
    monkeypatch.setattr(predictor, "prepare_model", lambda model, cfg, *rest: prepared.append(cfg.speed) or
                        prepare_model(model, cfg, *rest))
    assert run_cli("tta", "exp00", "--mode", "hflip", *args) == 0
    assert len(prepared) == 1, "the fold models go through the training's speed switches, prepared once"
    tta_dir = finished_run["outputs"] / "exp00-tta-hflip"
    oof = pd.read_csv(tta_dir / "oof.csv", dtype={"id": str})
    base = pd.read_csv(finished_run["exp"] / "oof.csv", dtype={"id": str})
    assert oof[["id", "crop", "fold"]].equals(base[["id", "crop", "fold"]])
    # fold 0's rows: fold 0's best.pt on each validation crop and its mirror image, probabilities averaged
    data = load_competition_data(finished_run["root"], log=lambda _: None)
    cfg = read_saved(finished_run["exp"]).experiment
    validation = validation_set(cfg, data.train[data.train["id"].isin(base.loc[base["fold"] == 0, "id"])])
    model = fresh_predictor(cfg, len(data.classes), torch.device("cpu"), finished_run["exp"] / "fold0" / "best.pt",
                            data.classes).network.eval()
    mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
    dataset = ImageDataset(validation.paths, None, build_eval_transform(cfg, test=True), boxes=validation.boxes)
    with torch.no_grad():
        images = InputStage(mean, std)(torch.stack([dataset[i][0] for i in range(len(dataset))]), 0)
        expected = (torch.softmax(model(images), 1) + torch.softmax(model(images.flip(-1)), 1)) / 2
    got = oof.set_index(["id", "crop"]).loc[list(zip(validation.ids, validation.crops)), data.classes]
    np.testing.assert_allclose(got.to_numpy(), expected.numpy(), atol=1e-5)
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
