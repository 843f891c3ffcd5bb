"""Each technique of the ladder against its definition."""
from __future__ import annotations

import math
from typing import get_args

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.core.config import resolve_config
from src.core.paths import CONFIG_DIR
from src.core.schema import AugmentConfig, ExperimentConfig, SchedulerConfig
from src.data.competition import style_images_for_fold
from src.data.geometry import CropGeometry, resolve_for_data
from src.training.losses import FocalLoss, build_loss
from src.training.optim import SAM
from src.training.schedules import build_scheduler, warm_restart_lr
from src.data.sampler import build_sampler
from src.training.objective import Objective, build_cutmix, build_objective
from src.data.transforms import SINGLE_AUGMENTATIONS, build_eval_transform, build_train_transform, reseed

PEAK, FLOOR, GAMMA = 1e-3, 5e-6, 0.7


def cosine(top: float, progress: float) -> float:
    return FLOOR + (top - FLOOR) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("step, expected", [
    (0, FLOOR),                                   # warm-up starts at the floor
    (5, FLOOR + (PEAK - FLOOR) * 0.5),            # half-way up the warm-up
    (10, PEAK),                                   # warm-up done: the peak
    (55, cosine(PEAK, 0.5)),                      # half-way down the first cosine
    (99, cosine(PEAK, 89 / 90)),                  # last iteration of cycle 0
    (100, FLOOR),                                 # restart: warm-up again from the floor
    (105, FLOOR + (PEAK * GAMMA - FLOOR) * 0.5),  # ... towards the decayed peak
    (110, PEAK * GAMMA),
    (210, PEAK * GAMMA ** 2),                     # cycle 2 peaks at gamma^2
    (255, cosine(PEAK * GAMMA ** 2, 0.5)),
])
def test_warm_restart_schedule_matches_closed_form(step, expected):
    got = warm_restart_lr(step, cycle_steps=100, cycle_mult=1, warmup_steps=10, peak=PEAK, gamma=GAMMA, floor=FLOOR)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_warm_restart_cycles_grow_with_cycle_mult():
    lr = lambda step: warm_restart_lr(step, 100, 2, 10, PEAK, GAMMA, FLOOR)  # noqa: E731
    assert lr(100) == pytest.approx(FLOOR) and lr(110) == pytest.approx(PEAK * GAMMA)
    assert lr(300) == pytest.approx(FLOOR) and lr(310) == pytest.approx(PEAK * GAMMA ** 2)
    assert lr(205) == pytest.approx(cosine(PEAK * GAMMA, 95 / 190))


def test_scheduler_steps_per_iteration_through_the_optimizer():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=PEAK)
    cfg = SchedulerConfig(name="cosine_warm_restarts", cycle_epochs=2, warmup_steps=10, gamma=GAMMA, min_lr=FLOOR)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=50, epochs=5)
    seen = []
    for _ in range(250):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [warm_restart_lr(s, 100, 1, 10, PEAK, GAMMA, FLOOR) for s in range(250)]
    np.testing.assert_allclose(seen, expected, rtol=1e-9)


def test_cutmix_target_weights_equal_the_pasted_area():
    cfg, _ = resolve_config("exp06", overrides=["train.cutmix_prob=1.0", "train.batch_size=4"])
    objective = build_objective(cfg, n_classes=4)
    torch.manual_seed(0)
    np.random.seed(0)
    for _ in range(20):
        images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 32, 48).clone()
        mixed, targets = objective.mix(images, objective.targets(torch.arange(4), torch.device("cpu")))
        for i in range(4):
            kept = (mixed[i] == i).float().mean().item()
            assert targets.target[i, i].item() == pytest.approx(kept, abs=1e-6)
            assert targets.target[i, 3 - i].item() == pytest.approx(1 - kept, abs=1e-6)


def test_cutmix_needs_an_even_batch():
    from src.core.errors import UserError

    cfg, _ = resolve_config("exp06", overrides=["train.batch_size=15"])
    with pytest.raises(UserError, match="even"):
        build_cutmix(cfg)


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_downweights_confident_examples():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    assert FocalLoss(0.0)(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    soft = torch.softmax(torch.randn(16, 5), dim=1)
    assert FocalLoss(0.0)(logits, soft).item() == pytest.approx(F.cross_entropy(logits, soft).item(), rel=1e-6)
    confident, unsure = torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    target = torch.tensor([0])
    ratio = lambda x: (FocalLoss(2.0)(x, target) / F.cross_entropy(x, target)).item()  # noqa: E731
    assert ratio(confident) < 0.01 < ratio(unsure) < 1
    assert isinstance(build_loss(resolve_config("exp07")[0].loss), FocalLoss)


def explicit_focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float, smoothing: float = 0.0) -> float:
    """mean over rows of sum_c t_c (1 - exp(-l_c))^gamma l_c with l_c = (1 - eps)(-log p_c) + eps mean_k(-log p_k),
    the label-smoothed cross entropy of class c, computed in float64 from the definition."""
    p = np.exp(logits.double().numpy())
    p /= p.sum(axis=1, keepdims=True)
    smoothed_ce = (1 - smoothing) * -np.log(p) + smoothing * -np.log(p).mean(axis=1, keepdims=True)
    weight = (1 - np.exp(-smoothed_ce)) ** gamma
    return float(np.mean((targets.double().numpy() * weight * smoothed_ce).sum(axis=1)))


def test_focal_loss_matches_its_formula_with_hard_smoothed_and_cutmix_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5) * 2, torch.randint(0, 5, (16,))
    one_hot = F.one_hot(labels, 5).double()
    # hard labels: -(1 - p_t)^2 log p_t (without smoothing exp(-l_t) is p_t)
    p = torch.softmax(logits.double(), dim=1)[torch.arange(16), labels]
    lin = float(torch.mean(-(1 - p) ** 2 * torch.log(p)))
    assert FocalLoss(2.0)(logits, labels).item() == pytest.approx(lin, rel=1e-6)
    assert explicit_focal(logits, one_hot, 2.0) == pytest.approx(lin, rel=1e-9)
    # label smoothing 0.1: the focal factor of the smoothed cross entropy
    assert FocalLoss(2.0, label_smoothing=0.1)(logits, labels).item() == \
        pytest.approx(explicit_focal(logits, one_hot, 2.0, smoothing=0.1), rel=1e-6)
    # CutMix's soft targets: lambda of one artist and 1 - lambda of another
    lam = torch.rand(16, 1).double()
    mixed = lam * one_hot + (1 - lam) * F.one_hot(labels.roll(1), 5).double()
    assert FocalLoss(2.0)(logits, mixed.float()).item() == pytest.approx(explicit_focal(logits, mixed, 2.0), rel=1e-5)
    assert FocalLoss(2.0, label_smoothing=0.1)(logits, mixed.float()).item() == \
        pytest.approx(explicit_focal(logits, mixed, 2.0, smoothing=0.1), rel=1e-5)
    assert isinstance(build_loss(resolve_config("exp18")[0].loss), FocalLoss)
    assert build_loss(resolve_config("exp18")[0].loss).label_smoothing == 0.1


def test_focal_loss_at_gamma_zero_is_torchs_label_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 50) * 3, torch.randint(0, 50, (16,))
    soft = torch.softmax(torch.randn(16, 50), dim=1)
    for target in (labels, soft):
        expected = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target).item()
        assert FocalLoss(0.0, label_smoothing=0.1)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_keeps_the_optimum_of_label_smoothing():
    """50 artists, smoothing 0.1: the smoothed cross entropy is lowest at p_true = 1 - 0.1 + 0.1/50 = 0.902 (the
    other artists share the rest evenly); the focal loss at gamma 2 must be lowest there too, not at 0.69 as when
    the smoothed off-class targets are weighted by their own (1 - p)^gamma."""
    classes, true = 50, torch.linspace(0.5, 0.995, 991, dtype=torch.float64)
    rest = ((1 - true) / (classes - 1)).unsqueeze(1).expand(-1, classes - 1)
    logits = torch.log(torch.cat([true.unsqueeze(1), rest], dim=1))  # softmax gives back these probabilities
    labels = torch.zeros(len(true), dtype=torch.long)

    def best_p(loss: nn.Module) -> float:
        per_row = torch.stack([loss(logits[i:i + 1], labels[i:i + 1]) for i in range(len(true))])
        return float(true[per_row.argmin()])

    assert best_p(nn.CrossEntropyLoss(label_smoothing=0.1)) == pytest.approx(0.902, abs=1e-3)
    assert best_p(FocalLoss(2.0, label_smoothing=0.1)) == pytest.approx(0.902, abs=1e-3)


@pytest.mark.parametrize("scheme", ["inverse_count", "inverse_log_count"])
def test_sampler_draws_classes_in_the_configured_proportions(scheme):
    counts = np.array([400, 100, 25])
    labels = np.repeat(np.arange(3), counts)
    per_class = {"inverse_count": np.ones(3), "inverse_log_count": counts / np.log(counts)}[scheme]
    expected = per_class / per_class.sum()
    sampler = build_sampler(labels, scheme, seed=0)
    drawn = np.concatenate([labels[list(sampler)] for _ in range(40)])
    observed = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(observed, expected, atol=0.01)
    assert build_sampler(labels, "none", seed=0) is None


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.forwards = 0
        self.backwards = 0
        self.linear.weight.register_hook(self._count_backward)

    def _count_backward(self, grad):
        self.backwards += 1
        return grad

    def forward(self, x):
        self.forwards += 1
        return self.linear(x)


def _sam_run(rho: float | None, steps: int = 3):
    torch.manual_seed(0)
    net = CountingNet()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    optimizer = SAM(net.parameters(), torch.optim.SGD, rho=rho, lr=0.1) if rho is not None \
        else torch.optim.SGD(net.parameters(), lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if rho is None:
            closure()
            optimizer.step()
        else:
            optimizer.step(closure)
    return net


def test_one_sam_step_descends_from_the_ascended_point_and_restores_the_weights_first():
    """w1 = w0 - lr * grad L(w0 + rho * g / ||g||) with g = grad L(w0), over all parameters at once: a wrong ascent
    (sign, scale, per-parameter norm) or a base step taken from the ascended weights gives another w1."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    lr, rho = 0.1, 0.5
    w0 = [p.detach().clone().requires_grad_() for p in net.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(F.linear(x, *w0), y), w0)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    ascended = [(w + rho * g / norm).detach().requires_grad_() for w, g in zip(w0, grads)]
    ascended_grads = torch.autograd.grad(F.cross_entropy(F.linear(x, *ascended), y), ascended)
    expected = [w.detach() - lr * g for w, g in zip(w0, ascended_grads)]

    optimizer = SAM(net.parameters(), torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(F.cross_entropy(F.linear(x, *w0), y).item())  # the loss at w0
    for got, want in zip(net.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


def test_sam_takes_two_forward_backward_passes_per_step():
    net = _sam_run(rho=0.05, steps=3)
    assert (net.forwards, net.backwards) == (6, 6)


def test_sam_equals_its_base_optimiser_at_rho_zero_and_differs_otherwise():
    plain, sam0, sam = _sam_run(None), _sam_run(0.0), _sam_run(0.5)
    assert torch.allclose(plain.linear.weight, sam0.linear.weight, atol=1e-7)
    assert not torch.allclose(plain.linear.weight, sam.linear.weight, atol=1e-4)


def test_sam_updates_batchnorm_statistics_once_a_step_at_the_real_weights():
    """The trainer's SAM step (exp10: SAM around AdamW) runs two forward passes; only the first, at the weights being
    trained, may move BatchNorm's running statistics. Each step must leave them as one training-mode forward at the
    step's starting weights does."""
    import copy

    from src.training.optim import build_optimizer
    from src.training.loop import Training, train_step

    cfg, _ = resolve_config("exp10", "demo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), torch.device("cpu"))
    assert isinstance(optimizer, SAM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = Training(cfg, torch.device("cpu"), model, model, model, (0.5,) * 3, (0.5,) * 3, 0, [], optimizer, scheduler,
                   torch.amp.GradScaler("cpu", enabled=False),
                   Objective(nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), 3))
    for _ in range(3):
        images, labels = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
        reference = copy.deepcopy(model).train()
        with torch.no_grad():
            reference(images)
        train_step(run, images, labels)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(model[2], name), getattr(reference[2], name))
    assert int(model[2].num_batches_tracked) == 3


def test_style_images_never_train_the_fold_that_validates_their_sources():
    style = pd.DataFrame({"id": ["g1", "g2", "g3", "g4"], "style_source_id": ["1", "2", "3", "4"],
                          "content_source_id": ["5", "6", "2", "7"]})
    kept = style_images_for_fold(style, val_ids={"2", "7"})
    assert kept["id"].tolist() == ["g1"]  # g2: style source validated, g3: content source, g4: content source
    assert style_images_for_fold(style, val_ids=set())["id"].tolist() == ["g1", "g2", "g3", "g4"]


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
@pytest.mark.parametrize("profile", [None, "demo"])
def test_every_augmentation_pipeline_builds_strictly_and_yields_the_input_size(name, profile):
    cfg: ExperimentConfig = resolve_for_data(resolve_config(name, profile)[0], CropGeometry(0.25, 0.2, 0.3, 1, 1))
    size = cfg.input.img_size
    rng = np.random.default_rng(0)
    pipelines = [build_train_transform(cfg, seed=0), build_eval_transform(cfg), build_eval_transform(cfg, test=True)]
    for pipeline in pipelines:
        assert pipeline.strict
        for shape in ((150, 100, 3), (90, 260, 3)):
            out = pipeline(image=rng.integers(0, 255, shape, dtype=np.uint8))["image"]
            assert tuple(out.shape) == (3, size, size)


def test_augmentation_study_has_one_config_per_preset_and_each_preset_changes_images():
    names = [n for n in get_args(AugmentConfig.model_fields["single"].annotation) if n != "none"]
    assert sorted(SINGLE_AUGMENTATIONS) == sorted(names)
    assert sorted(p.stem for p in CONFIG_DIR.glob("aug_*.yaml")) == sorted(f"aug_{n}" for n in names)
    image = np.random.default_rng(0).integers(30, 220, (64, 48, 3), dtype=np.uint8)
    for name in names:
        cfg = resolve_config(f"aug_{name}")[0]
        assert cfg.augment.single == name and cfg.parent == "exp00"
        preset = SINGLE_AUGMENTATIONS[name]()
        assert preset.p == 0.5
        preset.p = 1.0
        out = A.Compose([preset], seed=0, strict=True)(image=image)["image"]
        assert out.shape == image.shape and not np.array_equal(out, image), name
    grey = A.Compose([SINGLE_AUGMENTATIONS["grayscale"]()], seed=0, strict=True)
    grey.transforms[0].p = 1.0
    out = grey(image=image)["image"]
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_every_transform_of_a_training_pipeline_draws_from_one_shared_stream():
    """Compose(seed=...) seeds each transform's own generator alike (albumentations 2.0.8), so two flips at p=0.5
    would always fire together; reseed() shares one stream, and the four outcomes come out a quarter each."""
    cfg, _ = resolve_config("exp02", "demo")
    pipeline = build_train_transform(cfg, seed=0)
    assert all(t.py_random is pipeline.py_random and t.random_generator is pipeline.random_generator
               for t in pipeline.transforms)
    flips = A.Compose([A.HorizontalFlip(p=0.5, strict=True), A.VerticalFlip(p=0.5, strict=True)], strict=True)
    image = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)
    outcomes = []
    for seed in range(400):
        reseed(flips, seed)
        outcomes.append(flips(image=image)["image"].tobytes())
    shares = np.unique(outcomes, return_counts=True)[1] / len(outcomes)
    assert len(shares) == 4 and np.all(np.abs(shares - 0.25) < 0.06), shares


def test_strict_checking_rejects_removed_arguments():
    import albumentations as A

    with pytest.raises(ValueError, match="always_apply"):
        A.HorizontalFlip(always_apply=True, strict=True)
