"""Validation that looks like the test: the test geometry measured from the image sizes, seeded validation crops,
the painting-level aggregate, and the recipe options (RandomResizedCrop, EMA, a schedule fitted to the budget)."""
from __future__ import annotations

import math
import re

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.data.device_input import InputStage
from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.data.geometry import crop_image, measure_test_geometry, resolve_for_data, validation_crops, validation_set
from src.core.metrics import painting_means, painting_scores, scores
from src.training.schedules import build_scheduler, fitted_cycle_steps, schedule_note, warm_restart_lr
from src.pipeline.score import paired_bootstrap
from src.training.ema import build_ema
from src.training.loop import Training, train_one_epoch
from src.training.objective import Objective
from src.data.transforms import build_train_transform

from .conftest import run_cli

# --- the test geometry ------------------------------------------------------------------------------------------

def test_the_crop_share_is_recovered_from_sizes_alone():
    """Paintings of log-normal sizes; each test image a crop of a painting not in train, covering a share drawn
    log-uniformly from [0.2, 0.3]: the estimate lands on that share and its spread."""
    rng = np.random.default_rng(0)

    def paintings(n):
        area = np.exp(rng.normal(np.log(1e6), 0.5, n))
        aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6), n))
        return np.sqrt(area * aspect), np.sqrt(area / aspect)

    width, height = paintings(20_000)
    train = pd.DataFrame({"width": width, "height": height})
    width, height = paintings(20_000)
    share = np.exp(rng.uniform(np.log(0.2), np.log(0.3), 20_000))
    test = pd.DataFrame({"width": width * np.sqrt(share), "height": height * np.sqrt(share)})
    geometry = measure_test_geometry(train, test)
    assert geometry.area_share == pytest.approx(np.exp(np.log(share).mean()), rel=0.02)
    assert geometry.area_share_low == pytest.approx(np.quantile(share, 0.25), rel=0.06)
    assert geometry.area_share_high == pytest.approx(np.quantile(share, 0.75), rel=0.06)
    assert geometry.mimic_scale == pytest.approx(1 / math.sqrt(geometry.area_share))
    whole = measure_test_geometry(train, train)
    assert (whole.area_share_low, whole.area_share, whole.area_share_high) == (1.0, 1.0, 1.0)


def test_on_the_demo_data_the_geometry_recovers_the_generators_crops(tiny_root):
    data = load_competition_data(tiny_root, log=lambda _: None)
    crops = pd.read_csv(tiny_root / "test_crops.csv")
    true_share = (crops["width"] * crops["height"] / (crops["painting_width"] * crops["painting_height"])).median()
    geometry = measure_test_geometry(data.train, data.test)
    assert geometry.area_share == pytest.approx(true_share, rel=0.15)  # 26 crops: the estimate is rough
    cfg = resolve_for_data(resolve_config("exp00", "demo", ["augment.mimic_scale=auto"])[0], geometry)
    assert cfg.augment.mimic_scale == pytest.approx(1 / math.sqrt(geometry.area_share), abs=1e-3)
    assert cfg.validation.crop_area == pytest.approx((geometry.area_share_low, geometry.area_share_high), abs=1e-3)


@pytest.mark.slow
def test_eda_prints_the_test_geometry(tiny_root, tmp_path, capsys):
    assert run_cli("eda", "--data", tiny_root, "--outputs", tmp_path) == 0
    assert "eda: test geometry: a test image covers about" in capsys.readouterr().out


# --- validation crops -------------------------------------------------------------------------------------------

def test_validation_crops_are_seeded_by_id_and_cover_the_configured_share():
    ids = [str(i) for i in range(300)]
    boxes = validation_crops(ids, 4, (0.2, 0.3), seed=0)
    assert boxes.shape == (1200, 4)
    np.testing.assert_array_equal(boxes[40:44], validation_crops(["10"], 4, (0.2, 0.3), seed=0))
    assert not np.array_equal(boxes, validation_crops(ids, 4, (0.2, 0.3), seed=1))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 1 + 1e-12).all()
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    areas = widths * heights
    assert areas.min() >= 0.2 - 1e-9 and areas.max() <= 0.3 + 1e-9
    assert np.median(np.log(areas)) == pytest.approx(np.log(np.sqrt(0.2 * 0.3)), abs=0.03)  # log-uniform
    assert np.ptp(np.log(widths / heights)) > 0.4  # the aspect varies around the painting's


def test_crop_image_cuts_the_relative_box():
    image = np.arange(20 * 40 * 3, dtype=np.uint16).reshape(20, 40, 3)
    np.testing.assert_array_equal(crop_image(image, (0.25, 0.5, 0.75, 1.0)), image[10:20, 10:30])
    assert crop_image(image, (0.5, 0.5, 0.5, 0.5)).shape == (1, 1, 3)


def test_a_validation_set_has_k_crops_per_painting_or_the_whole_paintings(tiny_root):
    data = load_competition_data(tiny_root, log=lambda _: None)
    rows = data.train.head(5)
    crops = validation_set(resolve_config("exp00", overrides=["validation.crop_area=[0.2,0.3]"])[0], rows)
    assert crops.ids.tolist() == [i for i in rows["id"] for _ in range(4)] and crops.crops.tolist() == [0, 1, 2, 3] * 5
    assert crops.labels.tolist() == np.repeat(rows["label"], 4).tolist() and crops.boxes.shape == (20, 4)
    whole = validation_set(resolve_config("exp00", overrides=["validation.mode=whole"])[0], rows)
    assert whole.boxes is None and whole.crops.tolist() == [-1] * 5 and whole.describe() == "5 whole paintings"


def test_the_painting_level_score_averages_each_paintings_crops():
    ids = np.array(["a", "a", "b", "b", "c"])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.45, 0.55], [0.7, 0.3]])
    unique, means = painting_means(ids, probs)
    assert unique.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(means, [[0.55, 0.45], [0.425, 0.575], [0.7, 0.3]])
    labels = np.array([0, 0, 1, 1, 1])
    assert painting_scores(ids, labels, probs) == scores(np.array([0, 1, 1]), means)


@pytest.mark.slow
def test_a_fold_validates_on_crops_and_keeps_the_painting_level_beside(finished_run):
    """exp00's demo run: val_probs.csv holds 4 crops of every validation painting; the best epoch's crop-level
    and painting-level scores in history.csv are those of val_probs.csv."""
    data = load_competition_data(finished_run["root"], log=lambda _: None)
    history = pd.read_csv(finished_run["exp"] / "fold0" / "history.csv")
    val = pd.read_csv(finished_run["exp"] / "fold0" / "val_probs.csv", dtype={"id": str})
    assert (val.groupby("id")["crop"].apply(list) == [[0, 1, 2, 3]] * val["id"].nunique()).all()
    labels = data.train.set_index("id").loc[val["id"], "label"].to_numpy()
    best = history.loc[history["val_macro_f1"].idxmax()]
    assert scores(labels, val[data.classes].to_numpy())["macro_f1"] == pytest.approx(best["val_macro_f1"])
    assert painting_scores(val["id"].to_numpy(), labels, val[data.classes].to_numpy())["macro_f1"] == \
        pytest.approx(best["val_macro_f1_paintings"])


def test_the_bootstrap_resamples_whole_paintings_when_rows_are_crops():
    """Four identical crops per painting: resampling crops would pretend 4x the evidence and narrow the interval;
    resampling paintings gives the interval of the paintings alone."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    a = np.where(rng.random(60) < 0.7, y, (y + 1) % 3)
    b = np.where(rng.random(60) < 0.6, y, (y + 2) % 3)
    paintings = paired_bootstrap(y, a, b, 3, seed=1)
    repeated = [np.repeat(v, 4) for v in (y, a, b)]
    clustered = paired_bootstrap(*repeated, 3, groups=np.repeat(np.arange(60), 4), seed=1)
    naive = paired_bootstrap(*repeated, 3, seed=1)
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(clustered) == pytest.approx(width(paintings), rel=0.15)
    assert width(naive) < 0.7 * width(clustered)


# --- the recipe options -----------------------------------------------------------------------------------------

def test_random_resized_crop_is_albumentations_with_the_configured_scale_and_ratio():
    cfg, _ = resolve_config("exp00", overrides=["augment.crop=rrc", "augment.rrc_scale=[0.3,0.9]",
                                                "augment.hflip=true", "input.img_size=32"])
    pipeline = build_train_transform(cfg, seed=0)
    crop = pipeline.transforms[0]
    assert isinstance(crop, A.RandomResizedCrop) and crop.scale == (0.3, 0.9) and crop.ratio == pytest.approx(
        (3 / 4, 4 / 3))
    assert isinstance(pipeline.transforms[1], A.HorizontalFlip)
    assert pipeline(image=np.zeros((90, 60, 3), np.uint8))["image"].shape == (3, 32, 32)


def tiny_training(cfg, batches) -> Training:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    average = build_ema(model, cfg.train, steps_per_epoch=len(batches))
    return Training(cfg, torch.device("cpu"), model, model, model, (0.5,) * 3, (0.5,) * 3, 0, batches, optimizer,
                    scheduler, torch.amp.GradScaler("cpu", enabled=False),
                    Objective(nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), 3), average,
                    average.module, InputStage((0.5,) * 3, (0.5,) * 3))


@pytest.mark.slow
def test_the_ema_follows_its_recurrence_with_warm_up(monkeypatch):
    """After every optimiser step of the trainer the average becomes d_t * average + (1 - d_t) * weights, with the
    warm-up d_t = min(decay, 1 - 1/t) (0 at the first step, so it starts at the first step's weights)."""
    cfg, _ = resolve_config("exp00", "demo", ["train.ema_decay=0.9"])
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8, generator=generator),
                torch.randint(0, 3, (4,), generator=generator)) for _ in range(15)]  # the decay 0.9: step 10 on
    run = tiny_training(cfg, batches)
    weights = []
    monkeypatch.setattr(run.scheduler, "step", lambda *a, wrapped=run.scheduler.step: (
        weights.append(run.model[1].weight.detach().clone()), wrapped())[1])
    train_one_epoch(run, 1, desc="ema")
    expected = weights[0]
    for t, w in enumerate(weights[1:], start=2):
        decay = min(0.9, 1 - 1 / t)
        expected = decay * expected + (1 - decay) * w
    torch.testing.assert_close(run.ema.module[1].weight, expected)
    assert not torch.allclose(run.ema.module[1].weight, run.model[1].weight)
    assert run.predicting_model is run.ema_eval_model


@pytest.mark.slow
def test_an_ema_run_validates_both_and_saves_the_average_beside_the_raw_weights(tiny_root, tmp_path, capsys):
    assert run_cli("run", "exp00", "--data", tiny_root, "--outputs", tmp_path, "--submissions", tmp_path / "s",
                   "--profile", "demo", "input.img_size=32", "train.epochs=1", "train.batch_size=8",
                   "train.folds=[0]", "train.ema_decay=0.9", "train.keep_checkpoints=true") == 0
    fold = tmp_path / "exp00" / "fold0"
    best, last = (torch.load(fold / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert all(torch.equal(best["raw_model"][k], last["model"][k]) for k in last["model"])
    assert all(torch.equal(best["model"][k], last["ema"][k]) for k in last["ema"])
    assert any(not torch.equal(best["model"][k], best["raw_model"][k]) for k in best["model"])
    assert "val_macro_f1_raw" in pd.read_csv(fold / "history.csv").columns
    log = "".join(capsys.readouterr())  # the fold's log lines
    assert "EMA of the weights: decay 0.9 a step, an average over the last 10 steps" in log
    steps, decay = re.search(r"EMA decay at the last step \((\d+)\): ([\d.]+)", log).groups()
    assert float(decay) == pytest.approx(min(0.9, 1 - 1 / int(steps)), rel=1e-5)


def test_fitted_cycles_fill_the_budget_and_end_at_the_floor():
    peak, floor = 1e-3, 5e-6
    assert fitted_cycle_steps(800, 500, 1.0) == 400  # 8 epochs of 100 steps, cycles of 5 epochs -> 2 of 4
    assert fitted_cycle_steps(700, 100, 2.0) == 100  # 100 + 200 + 400 fits as it is
    assert fitted_cycle_steps(1000, 100, 2.0) == pytest.approx(1000 / 15)  # 4 cycles (67): nearer 100 than 3 (143)
    cfg = resolve_config("exp07", overrides=["train.epochs=8", "scheduler.fit_cycles=true",
                                             "scheduler.warmup_steps=10"])[0]
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=100, epochs=8)
    lr = [scheduler.lr_lambdas[0](step) * peak for step in range(800)]
    restarts = [step for step in range(1, 800) if lr[step] < lr[step - 1] and lr[step] == pytest.approx(floor)]
    assert restarts == [400]
    assert lr[-1] == pytest.approx(warm_restart_lr(799, 400, 1, 10, peak, 0.7, floor))
    assert lr[-1] - floor < 1e-4 * (peak - floor)  # the last step is at the floor
    assert schedule_note(cfg.scheduler, peak, 100, 8) is None
    unfitted = cfg.scheduler.model_copy(update={"fit_cycles": False})
    assert "ends mid-cycle at lr" in schedule_note(unfitted, peak, 100, 8)
    assert schedule_note(unfitted, peak, 100, 10) is None  # 10 epochs hold two 5-epoch cycles exactly
