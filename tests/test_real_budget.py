"""Every rung as a GPU user runs it (no profile: its own backbone size, epochs, patience and batch, on the real data's
5,911 paintings of every aspect ratio) does what its description says: its schedule reaches its floor or restarts
where declared, and its crops cover the test crops' share of a painting and are as distorted as they are."""
from __future__ import annotations


import albumentations as A
import numpy as np
import pytest
import torch
from torch import nn

from src.core.config import resolve_config
from src.core.paths import CONFIG_DIR
from src.data.geometry import ASPECT_JITTER, CropGeometry, resolve_for_data, validation_crops
from src.training.schedules import build_scheduler, early_stop_note, warm_restart_lr, warmup_steps
from src.data.transforms import build_eval_transform, train_crop

RUNGS = sorted(p.stem for p in CONFIG_DIR.glob("exp*.yaml"))
PAINTINGS = 5911
TRAIN_SHARE = 4 / 5  # 5 folds: 4 train
# The 2nd place's estimate of the test crops, about 23% of a painting's area (quartiles as the demo data measures).
REAL_GEOMETRY = CropGeometry(0.23, 0.20, 0.26, PAINTINGS, 12670)
ASPECTS = (1.0, 1.5, 2.0, 0.5)  # width / height: landscape and portrait up to 2:1


def real(name: str):
    cfg, _ = resolve_config(name)  # no profile: what a GPU user runs
    return resolve_for_data(cfg, REAL_GEOMETRY)


def steps_per_epoch(cfg) -> int:
    return int(PAINTINGS * TRAIN_SHARE) // cfg.train.batch_size  # the loader drops the last incomplete batch


@pytest.mark.parametrize("name", RUNGS)
def test_the_schedule_runs_to_its_end_or_restarts_where_declared_at_the_real_budget(name):
    cfg = real(name)
    steps, epochs = steps_per_epoch(cfg), cfg.train.epochs
    peak, floor = cfg.optimizer.lr, cfg.scheduler.min_lr
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=steps, epochs=epochs)
    lr = lambda step: schedule.lr_lambdas[0](step) * peak  # noqa: E731
    assert early_stop_note(cfg.scheduler, epochs, cfg.train.patience) is None, "early stopping can cut it short"
    if cfg.scheduler.name == "constant":
        assert {lr(step) for step in (0, steps, 10 * steps, epochs * steps - 1)} == {peak}
    elif cfg.scheduler.name == "cosine":  # one cycle over the whole budget: at the floor on the last step
        last = epochs * steps - 1
        assert epochs <= 100 and cfg.train.patience == 0
        warmup = warmup_steps(cfg.scheduler, steps, epochs * steps)
        if cfg.scheduler.warmup_epochs is not None:  # stated in epochs: it follows the rung's batch size
            assert warmup == round(cfg.scheduler.warmup_epochs * steps)
        assert lr(warmup - 1) < peak and lr(warmup) == pytest.approx(peak)
        assert lr(last) - floor < 1e-4 * (peak - floor)
        middle = (warmup + last) // 2  # half-way down the cosine after the warm-up
        assert lr(middle) == pytest.approx(floor + (peak - floor) / 2, rel=0.01)
    else:  # warm restarts every cycle_epochs (x cycle_mult): down to the floor, then warm-up again
        cycle = cfg.scheduler.cycle_epochs * steps
        for k in range(1, 4):
            restart = round(cycle * k)
            assert lr(restart - 1) - floor < 1e-3 * (peak - floor), f"cycle {k} ends at its floor"
            assert lr(restart) == pytest.approx(floor)
            top = peak * cfg.scheduler.gamma ** k
            assert lr(restart + cfg.scheduler.warmup_steps) == pytest.approx(top)
            assert lr(restart) == warm_restart_lr(restart, cycle, 1, cfg.scheduler.warmup_steps, peak,
                                                  cfg.scheduler.gamma, floor)


def test_early_stopping_that_could_cut_a_cosine_short_is_announced():
    cfg = real("exp20")
    note = early_stop_note(cfg.scheduler, cfg.train.epochs, 10)
    assert note.startswith("early stopping (train.patience 10) can end this run from epoch 11 on, but the cosine "
                           f"schedule reaches its floor only at epoch {cfg.train.epochs}")
    assert early_stop_note(cfg.scheduler, 1000, 0) is None
    warm = real("exp07").scheduler
    assert early_stop_note(warm, 1000, 10) is None  # every 5-epoch cycle anneals
    assert "fitted warm-restart" in early_stop_note(warm.model_copy(update={"fit_cycles": True}), 1000, 10)


def coordinate_painting(aspect: float, short: int = 1024) -> np.ndarray:
    """A painting whose red channel is the x coordinate and green the y coordinate, both scaled to 0..255."""
    width, height = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    x = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, axis=1)
    return np.stack([x, y, np.zeros_like(x)], axis=-1).round().astype(np.uint8)


def covered(image: np.ndarray, pipeline: A.Compose) -> tuple[float, float]:
    """(share of the painting's area, aspect of the covered part in the painting's pixels) of one output (an image,
    or a tensor whose normalisation kept the pixel values)."""
    out = pipeline(image=image)["image"]
    out = (out.permute(1, 2, 0).numpy() if isinstance(out, torch.Tensor) else out).astype(np.float64)
    assert out.shape[0] == out.shape[1], "the model's input is square"
    inner = out[1:-1, 1:-1]  # interpolation blurs the border pixels
    (x0, x1), (y0, y1) = ((inner[..., c].min() / 255, inner[..., c].max() / 255) for c in (0, 1))
    height, width = image.shape[:2]
    return (x1 - x0) * (y1 - y0), (x1 - x0) * width / ((y1 - y0) * height)


CROPPING = [name for name in RUNGS if real(name).augment.crop != "none"]


@pytest.mark.parametrize("name", CROPPING)
@pytest.mark.parametrize("aspect", ASPECTS)
def test_training_crops_cover_the_test_share_and_distort_like_a_test_crop_at_every_aspect(name, aspect):
    """A test crop keeps its painting's aspect and is squashed to the square input: the training crop of a rung that
    imitates it (random, mimic) must cover the declared share and have that aspect too, at 1:1 as at 2:1 or 1:2.
    RandomResizedCrop (rrc) declares a range of area shares."""
    cfg = real(name)
    augment, size = cfg.augment, cfg.input.img_size
    pipeline = A.Compose(train_crop(augment, size), strict=True, seed=0)
    image = coordinate_painting(aspect)
    draws = [covered(image, pipeline) for _ in range(3)]
    if augment.crop == "rrc":
        low, high = augment.rrc_scale
        assert all(low - 0.02 <= share <= high + 0.02 for share, _ in draws), draws
        return
    scale = augment.resize_scale if augment.crop == "random" else augment.mimic_scale
    for share, crop_aspect in draws:
        assert share == pytest.approx(1 / scale ** 2, abs=0.02), (aspect, share)
        assert crop_aspect == pytest.approx(aspect, rel=0.05)
    if augment.crop == "mimic":  # auto: the measured share of a painting; else the scale the config states (exp16)
        stated = resolve_config(name)[0].augment.mimic_scale
        if stated == "auto":
            assert 1 / augment.mimic_scale ** 2 == pytest.approx(REAL_GEOMETRY.area_share, abs=0.01)
        else:
            assert augment.mimic_scale == stated


@pytest.mark.parametrize("aspect", ASPECTS)
def test_the_centre_crop_of_whole_painting_validation_under_mimic_follows_the_same_rule(aspect):
    cfg = real("exp21")
    cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"mode": "whole"})})
    pipeline = build_eval_transform(cfg)  # uint8 pixel values
    share, crop_aspect = covered(coordinate_painting(aspect), pipeline)
    assert share == pytest.approx(1 / cfg.augment.mimic_scale ** 2, abs=0.02)
    assert crop_aspect == pytest.approx(aspect, rel=0.05)


def test_validation_crops_cover_the_measured_share_with_the_paintings_aspect():
    """Relative boxes, so the same at every aspect: the width share is the height share times exp(U(-2a, 2a)) with
    a = ASPECT_JITTER (the width share is moved by exp(U(-a, a)) and the height share by the inverse), so a crop
    keeps its painting's aspect within that factor, like a test crop."""
    low, high = REAL_GEOMETRY.area_share_low, REAL_GEOMETRY.area_share_high
    boxes = validation_crops([f"p{i}" for i in range(200)], 4, (low, high), seed=0)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert ((width * height >= low - 1e-9) & (width * height <= high + 1e-9)).all()
    assert np.abs(np.log(width / height)).max() <= 2 * ASPECT_JITTER + 1e-9
    assert boxes.min() >= 0 and boxes.max() <= 1


EMA_RUNGS = [name for name in RUNGS if real(name).train.ema]


def ema_after(decays: np.ndarray, weights: np.ndarray) -> float:
    """The closed form of the average after len(weights) steps: sum_t w_t (1 - d_t) prod_{s > t} d_s."""
    later = np.concatenate([np.cumprod(decays[::-1])[::-1][1:], [1.0]])  # prod_{s > t} d_s
    return float(np.sum(weights * (1 - decays) * later))


@pytest.mark.parametrize("name", EMA_RUNGS)
def test_the_ema_averages_what_its_config_says_at_the_real_step_count(name):
    """At the rung's own steps an epoch and epochs: the decay is the configured one (train.ema_decay, or
    1 - 1 / (train.ema_epochs x steps an epoch)) long before the last step, the warm-up is the plain mean of the steps
    so far, and the average after every step equals its closed form."""
    from src.training.ema import build_ema, ema_horizon_note

    cfg = real(name)
    steps = steps_per_epoch(cfg)
    total = cfg.train.epochs * steps
    target = cfg.train.ema_decay if cfg.train.ema_decay else 1 - 1 / (cfg.train.ema_epochs * steps)
    weight = nn.Parameter(torch.zeros(1))
    model = nn.Module()
    model.weight = weight
    ema = build_ema(model, cfg.train, steps)
    average = lambda: float(ema.module.weight.detach())  # noqa: E731
    assert ema.decay == pytest.approx(target)
    horizon = 1 / (1 - target)
    assert horizon <= total / 3, "the average spans at most a third of the run"
    assert ema_horizon_note(ema, total) is None
    values = np.sin(np.arange(1, total + 1) / 97.0) + np.arange(total) / total  # weights that drift and wander
    decays = np.array([min(target, 1 - 1 / t) for t in range(1, total + 1)])
    half = int(horizon) // 2  # inside the warm-up: the plain mean of the steps so far
    checked = {1, 2, int(horizon) + 5, total}
    for step in range(1, total + 1):
        with torch.no_grad():
            weight.fill_(values[step - 1])
        ema.update(model, step=step)
        if step in checked:
            expected = ema_after(decays[:step], values[:step])
            assert average() == pytest.approx(expected, rel=1e-4, abs=1e-5), f"after step {step}"
        if step == half:
            assert average() == pytest.approx(values[:half].mean(), rel=1e-4)
    assert ema.get_decay(total) == pytest.approx(target)
