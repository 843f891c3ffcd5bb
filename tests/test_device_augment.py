"""The pixel augmentations on the device (speed.gpu_augment, kornia) against the CPU path (albumentations on uint8):
the same distributions of what each transform does, measured on images where it can be read off (the fill an
affine leaves on a white image, the colour shift of flat colours, the line through a ramp, the channel order, the
area of the holes), compared by two-sample tests rather than pixel by pixel; the crop positions and flips that
stay in the workers are drawn exactly as the CPU path draws them; normalisation on the device is albumentations'
Normalize to the bit."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, ks_2samp

from src.core.config import resolve_config
from src.data.device_augment import device_augmentations, extra_colour_augmentations, strong_pixel_augmentations
from src.data.device_input import InputStage, batch_seed
from src.data.transforms import build_train_transform, extra_colour_augmentations as cpu_extra_colour
from src.data.transforms import reseed, strong_augmentations, strong_flips

SAMPLES = 4000  # images per side: enough to tell U(-20, 20) from U(-14, 14), or p = 0.5 from 0.4
P_FLOOR = 1e-3  # two samples of one distribution give a lower p-value once in a thousand draws


def cpu_outputs(transform: A.BasicTransform, images: np.ndarray) -> np.ndarray:
    """Each uint8 image through the albumentations transform, image i with seed i; floats in [0, 1]."""
    pipeline = A.Compose([transform], strict=True)
    out = []
    for seed, image in enumerate(images):
        reseed(pipeline, seed)
        out.append(pipeline(image=image)["image"])
    return np.stack(out).astype(np.float32) / 255


def device_outputs(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The uint8 images as one batch through the device module (on a CPU tensor), NHWC floats in [0, 1]."""
    torch.manual_seed(0)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return module(batch).permute(0, 2, 3, 1).numpy()


def both(index: int, images: np.ndarray, extra: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CPU and device outputs of the index-th transform of the strong set after its flips (or of the extra set)."""
    cpu = cpu_extra_colour() if extra else strong_augmentations()[len(strong_flips()):]
    device = extra_colour_augmentations() if extra else strong_pixel_augmentations()
    return cpu_outputs(cpu[index], images), device_outputs(device[index], images)


def same_distribution(cpu: np.ndarray, device: np.ndarray, what: str) -> None:
    result = ks_2samp(cpu, device)
    assert result.pvalue > P_FLOOR, f"{what}: KS {result.statistic:.3f}, p {result.pvalue:.1e}"


def same_rate(cpu: np.ndarray, device: np.ndarray, what: str) -> None:
    """Two boolean samples fire equally often (chi-square on the 2 x 2 table)."""
    table = np.array([[cpu.sum(), (~cpu).sum()], [device.sum(), (~device).sum()]])
    assert chi2_contingency(table).pvalue > P_FLOOR, f"{what}: {table.tolist()}"


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Which images the transform changed (by more than rounding)."""
    return np.abs(after - before.astype(np.float32) / 255).max(axis=(1, 2, 3)) > 1.5 / 255


def flat_colours(size: int = 4, seed: int = 0) -> np.ndarray:
    """SAMPLES images of one colour each, saturated and mid-bright enough that shifts rarely clip."""
    rng = np.random.default_rng(seed)
    hsv = np.stack([rng.integers(0, 180, SAMPLES), rng.integers(90, 230, SAMPLES), rng.integers(90, 200, SAMPLES)], 1)
    rgb = cv2.cvtColor(hsv.astype(np.uint8)[:, None, :], cv2.COLOR_HSV2RGB)[:, 0, :]
    return np.broadcast_to(rgb[:, None, None, :], (SAMPLES, size, size, 3)).copy()


def hsv_means(images: np.ndarray) -> np.ndarray:
    """Mean OpenCV hue (0..179), saturation and value (0..255) of each float image."""
    as_uint8 = np.round(images * 255).astype(np.uint8)
    return cv2.cvtColor(as_uint8.reshape(-1, 1, 3), cv2.COLOR_RGB2HSV).reshape(len(images), -1, 3).mean(1)


def bar_geometry(images: np.ndarray) -> np.ndarray:
    """Centre (x, y), orientation (degrees, folded into [-90, 90)), length and width (4 x the standard deviations along
    its axes) of the white shape in each image, from its second moments."""
    weight = images[..., 0].astype(np.float64)
    ys, xs = np.mgrid[:images.shape[1], :images.shape[2]]
    total = weight.sum(axis=(1, 2))
    cx, cy = (weight * xs).sum(axis=(1, 2)) / total, (weight * ys).sum(axis=(1, 2)) / total
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    mxx, myy, mxy = ((weight * d).sum(axis=(1, 2)) / total for d in (dx * dx, dy * dy, dx * dy))
    angle = np.degrees(0.5 * np.arctan2(2 * mxy, mxx - myy))
    spread = np.sqrt(((mxx - myy) / 2) ** 2 + mxy ** 2)
    length, width = 4 * np.sqrt((mxx + myy) / 2 + spread), 4 * np.sqrt(np.maximum((mxx + myy) / 2 - spread, 0))
    return np.stack([cx, cy, angle, length, width], 1)


def test_affine_rotates_scales_and_moves_as_albumentations_does():
    """A white bar on black: its centre (translation), orientation (rotation), length and width (the scale along
    each side) after the transform, among the images it changed; and how many it changed (p = 0.5)."""
    count = SAMPLES // 4
    bars = np.zeros((count, 96, 96, 3), np.uint8)
    bars[:, 40:56, 24:72] = 255
    cpu, device = both(0, bars)
    cpu_changed, device_changed = changed(bars, cpu), changed(bars, device)
    same_rate(cpu_changed, device_changed, "share of images transformed")
    cpu, device = bar_geometry(cpu[cpu_changed]), bar_geometry(device[device_changed])
    for column, what in enumerate(("centre x", "centre y", "orientation", "length", "width")):
        same_distribution(cpu[:, column], device[:, column], what)
    assert 43 < np.abs(device[:, 2]).max() <= 45.5


def test_hue_saturation_value_shift_flat_colours_as_albumentations_does():
    images = flat_colours()
    before = hsv_means(images.astype(np.float32) / 255)
    sides = both(1, images)
    same_rate(*(changed(images, side) for side in sides), "share of images shifted")
    cpu, device = (hsv_means(side[changed(images, side)]) - before[changed(images, side)] for side in sides)
    for side in (cpu, device):
        side[:, 0] = (side[:, 0] + 90) % 180 - 90  # the hue shift, the short way round
    for column, what in enumerate(("hue shift", "saturation shift", "value shift")):
        same_distribution(cpu[:, column], device[:, column], what)
    assert 19 < np.abs(device[:, 0]).max() < 21 and 19 < np.abs(device[:, 2]).max() < 21


def test_brightness_and_contrast_draw_the_line_albumentations_draws():
    """x * alpha + beta read off a grey ramp (least squares; the ramp stays clear of clipping)."""
    ramp = np.broadcast_to(np.linspace(40, 215, 64).astype(np.uint8)[None, None, :, None], (SAMPLES, 1, 64, 3)).copy()
    x = ramp[0, 0, :, 0].astype(np.float64) / 255
    sides = both(2, ramp)
    same_rate(*(changed(ramp, side) for side in sides), "share of images adjusted")
    fits = [np.polyfit(x, side[changed(ramp, side), 0, :, 0].astype(np.float64).T, 1).T for side in sides]
    for column, what in enumerate(("contrast (slope)", "brightness (intercept)")):
        same_distribution(fits[0][:, column], fits[1][:, column], what)
    assert 0.095 < np.abs(fits[1][:, 0] - 1).max() <= 0.1 + 1e-6


def test_channel_shuffle_draws_every_order_as_often_as_albumentations():
    images = np.broadcast_to(np.array([10, 120, 230], np.uint8), (SAMPLES, 1, 1, 3)).copy()
    orders = [np.round(side[:, 0, 0] * 255).astype(int) @ np.array([1, 1000, 1000000]) for side in both(3, images)]
    keys = sorted(set(orders[0]))
    assert len(keys) == len(set(orders[1])) == 6
    table = np.array([[np.sum(order == key) for key in keys] for order in orders])
    assert chi2_contingency(table).pvalue > P_FLOOR, table


def test_coarse_dropout_cuts_holes_of_the_same_total_area():
    white = np.full((SAMPLES // 4, 100, 100, 3), 255, np.uint8)
    sides = both(4, white)
    same_rate(*(changed(white, side) for side in sides), "share of images with holes")
    cpu, device = ((side[changed(white, side), ..., 0] < 0.5).mean(axis=(1, 2)) for side in sides)
    same_distribution(cpu, device, "area of the holes")
    assert device.max() <= 8 * 0.1 * 0.1 + 1e-9


def test_the_extra_colour_set_shifts_flat_colours_as_albumentations_does():
    """Colour jitter, gamma and greyscale, each among the images it changed, and how often it changes one."""
    images = flat_colours(seed=1)
    before = hsv_means(images.astype(np.float32) / 255)
    for index, what in enumerate(("colour jitter", "gamma", "greyscale")):
        sides = both(index, images, extra=True)
        same_rate(*(changed(images, side) for side in sides), f"{what}: share of images changed")
        shifts = [hsv_means(side[changed(images, side)]) - before[changed(images, side)] for side in sides]
        for column, statistic in ((0, "hue"), (1, "saturation"), (2, "value")):
            if what != "greyscale" or column:  # grey has no hue
                same_distribution(shifts[0][:, column], shifts[1][:, column], f"{what}: {statistic} change")


def test_the_whole_device_set_matches_the_cpu_set_on_paintings(tiny_root):
    """strong + extra colour after the workers' crop and flips, on crops of the demo paintings: the distributions of
    each image's channel means and contrast."""
    paths = sorted((tiny_root / "train").iterdir())
    rng = np.random.default_rng(0)
    crops = []
    for index in range(SAMPLES // 8):
        image = cv2.cvtColor(cv2.imread(str(paths[index % len(paths)])), cv2.COLOR_BGR2RGB)
        y, x = rng.integers(0, image.shape[0] - 32 + 1), rng.integers(0, image.shape[1] - 32 + 1)
        crops.append(image[y:y + 32, x:x + 32])
    crops = np.stack(crops)
    cpu_set = A.Compose(strong_augmentations()[len(strong_flips()):] + cpu_extra_colour(), strict=True)
    cpu = []
    for seed, crop in enumerate(crops):
        reseed(cpu_set, seed)
        cpu.append(cpu_set(image=crop)["image"])
    cpu = np.stack(cpu).astype(np.float32) / 255
    cfg, _ = resolve_config("exp13", None)
    device = device_outputs(device_augmentations(cfg.augment), crops)
    for what, statistic in (("mean", lambda x: x.mean(axis=(1, 2, 3))), ("red mean", lambda x: x[..., 0].mean((1, 2))),
                            ("blue mean", lambda x: x[..., 2].mean((1, 2))), ("contrast", lambda x: x.std((1, 2, 3)))):
        same_distribution(statistic(cpu), statistic(device), what)


def test_the_workers_crop_and_flip_as_the_cpu_path_does_before_its_pixel_augmentations():
    """Under gpu_augment the worker's transform stops after the flips, drawing crop and flips from the stream the
    CPU path draws them from, so for every seed they are the same: the CPU pipeline with its pixel augmentations
    switched off (p = 0) gives what the worker gives."""
    cfg, _ = resolve_config("exp07", None, ["input.img_size=16", "speed.gpu_augment=true"])
    worker = build_train_transform(cfg, seed=0)
    cpu = build_train_transform(cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"gpu_augment": False})}),
                                seed=0)
    for transform in cpu.transforms[2 + len(strong_flips()):-1]:  # resize and crop first, ToTensorV2 last
        transform.p = 0.0
    image = np.arange(40 * 40 * 3, dtype=np.int64).reshape(40, 40, 3) % 251
    image = image.astype(np.uint8)
    outcomes = set()
    for seed in range(64):
        reseed(worker, seed)
        reseed(cpu, seed)
        got, want = worker(image=image)["image"], cpu(image=image)["image"]
        assert torch.equal(got, want) and got.dtype == torch.uint8
        outcomes.add(got.numpy().tobytes())
    assert len(outcomes) >= 60  # 17 x 17 crop positions x 8 flips: a repeat now and then


def test_gpu_augment_refuses_the_single_augmentation_study_in_one_line():
    from src.core.errors import UserError

    cfg, _ = resolve_config("aug_blur", None, ["speed.gpu_augment=true"])
    with pytest.raises(UserError, match="speed.gpu_augment covers augment.strong and augment.extra_colour, not "
                                        "augment.single=blur; set speed.gpu_augment=false"):
        build_train_transform(cfg, seed=0)


def test_normalising_on_the_device_is_albumentations_normalize_to_the_bit():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = np.random.default_rng(0).integers(0, 256, (4, 13, 17, 3), dtype=np.uint8)
    want = np.stack([A.Normalize(mean=mean, std=std, strict=True)(image=image)["image"] for image in images])
    got = InputStage(mean, std)(torch.from_numpy(images).permute(0, 3, 1, 2), 0).permute(0, 2, 3, 1).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_the_device_augmentation_of_a_batch_follows_from_the_seed_epoch_and_batch():
    cfg, _ = resolve_config("exp07", None)
    images = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)

    def augmented(seed: int, epoch: int, batch: int) -> torch.Tensor:
        stage = InputStage((0.5,) * 3, (0.5,) * 3, device_augmentations(cfg.augment), seed=seed)
        stage.set_epoch(epoch)
        torch.manual_seed(123 + batch)  # the global stream does not decide it
        return stage(images, batch)

    first = augmented(0, 1, 0)
    assert torch.equal(first, augmented(0, 1, 0))
    assert not torch.equal(first, augmented(0, 2, 0)) and not torch.equal(first, augmented(0, 1, 1))
    assert not torch.equal(first, augmented(1, 1, 0))
    assert len({batch_seed(0, epoch, batch) for epoch in range(3) for batch in range(3)}) == 9


def test_the_device_augmentation_leaves_the_cuda_generators_to_dropout_and_drop_path(monkeypatch):
    """The batch's seed goes to the CPU generator kornia draws from, never to CUDA's (torch.manual_seed would reseed
    every GPU, whose stream dropout and drop path draw from, and fork_rng(devices=[]) would not restore it)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    cfg, _ = resolve_config("exp07", None)
    stage = InputStage((0.5,) * 3, (0.5,) * 3, device_augmentations(cfg.augment), seed=0)
    stage(torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8), 0)
    stage(torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8), 1, torch.tensor([True, False, True, False]))
    assert reseeded == []
    torch.manual_seed(0)
    assert reseeded == [0], "the check does not see torch's reseeding of the GPUs"


def test_pseudo_labelled_crops_keep_the_light_augmentation_when_the_device_augments_the_paintings():
    """A batch of paintings and test crops (pseudo-labels) under speed.gpu_augment: the dataset marks the paintings,
    DeviceBatches takes the mark off the targets, and the device augments the paintings alone; a crop is only
    normalised, as the CPU path gives it only the crop's resize and flip."""
    from src.data.device_input import DeviceBatches
    from src.data.training_set import PAINTING, TrainingDataset

    class Rows:
        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return self.images[index], self.labels[index]

    cfg, _ = resolve_config("exp07", None)
    images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    dataset = TrainingDataset([Rows(images[:5], [0] * 5), Rows(images[5:], [1] * 3)],
                              {"weight": np.linspace(0.5, 1.0, 8, dtype=np.float32)})
    assert [bool(dataset[i][1][PAINTING]) for i in range(8)] == [True] * 5 + [False] * 3
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    stage = InputStage((0.5,) * 3, (0.5,) * 3, device_augmentations(cfg.augment), seed=0)
    (batch, targets), = list(DeviceBatches(loader, torch.device("cpu"), stage))
    assert PAINTING not in targets and set(targets) == {"label", "weight"}
    plain = InputStage((0.5,) * 3, (0.5,) * 3)(images, 0)
    assert torch.equal(batch[5:], plain[5:])
    assert all(not torch.equal(batch[i], plain[i]) for i in range(5))
