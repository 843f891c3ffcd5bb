"""The decoded-image cache: hits, misses, invalidation when the source changes, identical pixels either way, and the
squares the training transform starts from."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from src.core.config import resolve_config
from src.data.images import read_image
from src.data.image_cache import ImageCache, cache_for, needed_short_side, shrink, training_cache
from src.data.loader import ImageDataset, make_loader, training_dataset


def write_image(path, height: int, width: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 0)
    cv2.imwrite(str(path), image)
    return str(path)


@pytest.mark.parametrize("fmt", ["jpg", "npy"])
def test_first_load_misses_later_loads_hit_with_the_same_pixels(tmp_path, fmt):
    source = write_image(tmp_path / "big.jpg", 300, 200)
    cache = ImageCache(tmp_path / "cache", short_side=100, fmt=fmt)
    first = cache.load(source)
    assert (cache.hits, cache.misses) == (0, 1)
    assert first.shape == (150, 100, 3)
    again = ImageCache(tmp_path / "cache", short_side=100, fmt=fmt)
    np.testing.assert_array_equal(again.load(source), first)
    np.testing.assert_array_equal(again.load(source), first)
    assert (again.hits, again.misses) == (2, 0)
    assert len(list((tmp_path / "cache").rglob(f"*.{fmt}"))) == 1


def test_npy_entries_equal_the_shrunk_decode(tmp_path):
    source = write_image(tmp_path / "big.png", 240, 400)
    cache = ImageCache(tmp_path / "cache", short_side=60, fmt="npy")
    np.testing.assert_array_equal(cache.load(source), shrink(read_image(source), 60))


def test_a_changed_source_file_is_decoded_again(tmp_path):
    source = write_image(tmp_path / "art.png", 300, 300, seed=1)
    cache = ImageCache(tmp_path / "cache", short_side=100, fmt="npy")
    before = cache.load(source)
    write_image(tmp_path / "art.png", 300, 300, seed=2)
    os.utime(source, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns + 10**9))
    after = cache.load(source)
    assert cache.misses == 2 and cache.hits == 0
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, shrink(read_image(source), 100))


def test_another_short_side_is_another_entry(tmp_path):
    source = write_image(tmp_path / "art.png", 300, 300)
    ImageCache(tmp_path / "cache", short_side=100, fmt="npy").load(source)
    other = ImageCache(tmp_path / "cache", short_side=150, fmt="npy")
    assert other.load(source).shape == (150, 150, 3) and other.misses == 1


def test_small_images_are_read_as_they_are_without_a_copy(tmp_path):
    source = write_image(tmp_path / "small.jpg", 80, 60)
    cache = ImageCache(tmp_path / "cache", short_side=100, fmt="jpg")
    np.testing.assert_array_equal(cache.load(source), read_image(source))
    np.testing.assert_array_equal(cache.load(source), read_image(source))
    assert (cache.hits, cache.misses) == (1, 1)
    assert not list((tmp_path / "cache").rglob("*.jpg")) and len(list((tmp_path / "cache").rglob("*.small"))) == 1


def test_a_damaged_entry_counts_as_a_miss_and_is_rewritten(tmp_path):
    source = write_image(tmp_path / "big.jpg", 300, 200)
    cache = ImageCache(tmp_path / "cache", short_side=100, fmt="jpg")
    first = cache.load(source)
    entry = next((tmp_path / "cache").rglob("*.jpg"))
    entry.write_bytes(b"not a jpeg")
    np.testing.assert_array_equal(cache.load(source), first)
    assert cache.misses == 2


def test_short_side_covers_the_first_resize_of_every_crop_mode():
    """The cached copy never has to be upscaled: by the train crop, nor by the smallest validation crop."""
    whole = "validation.mode=whole"
    for crop, expected in (("none", 2 * 64), ("random", 3 * 64), ("mimic", round(2.5 * 64)), ("rrc", 4 * 64)):
        cfg, _ = resolve_config("exp00", None, [f"augment.crop={crop}", "input.img_size=64", whole,
                                                "augment.resize_scale=3.0", "augment.mimic_scale=2.5",
                                                "augment.rrc_scale=[0.0625,1.0]"])
        assert needed_short_side(cfg) == expected
    cfg, _ = resolve_config("exp00", None, ["input.img_size=64", "validation.crop_area=[0.04,0.3]"])
    assert needed_short_side(cfg) == 5 * 64  # a crop of 4% of the area spans a fifth of the side


def test_a_dataset_gives_the_same_tensors_from_a_cold_and_a_warm_cache(tiny_root, tmp_path):
    cfg, _ = resolve_config("exp00", "demo", ["input.img_size=32", "speed.image_cache=jpg", "validation.mode=whole"])
    cache = cache_for(cfg, tmp_path)
    assert cache.directory == tmp_path / "cache" / "images" and cache.short_side == 64
    paths = sorted(str(p) for p in (tiny_root / "train").iterdir())[:6]

    def resize(image):
        return {"image": cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)}

    dataset = ImageDataset(paths, None, resize, cache=cache)
    cold = [dataset[i][0] for i in range(len(paths))]
    warm = [dataset[i][0] for i in range(len(paths))]
    assert cache.misses == len(paths) and cache.hits == len(paths)
    for a, b in zip(cold, warm):
        np.testing.assert_array_equal(a, b)
    assert cache_for(cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"image_cache": "none"})}),
                     tmp_path) is None


def test_two_workers_filling_the_cache_at_once_give_what_no_workers_give_and_leave_no_temp_files(tiny_root, tmp_path):
    paths = sorted(str(p) for p in (tiny_root / "train").iterdir())[:8] * 2  # each image missed by both workers

    def resize(image):
        return {"image": cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA)}

    def images(workers: int, cache: ImageCache) -> torch.Tensor:
        loader = make_loader(ImageDataset(paths, None, resize, cache=cache), 2, workers, torch.device("cpu"),
                             train=False)
        return torch.cat([batch for batch, _ in loader])

    serial = images(0, ImageCache(tmp_path / "serial", short_side=32, fmt="jpg"))
    cache = ImageCache(tmp_path / "parallel", short_side=32, fmt="jpg")
    cold, warm = images(2, cache), images(2, cache)
    assert torch.equal(cold, serial) and torch.equal(warm, serial)
    entries = [p for p in (tmp_path / "parallel").rglob("*") if p.is_file()]
    assert len(entries) == 8 and not [p for p in entries if p.name.endswith(".tmp")]


# --- the cache at the training transform's start (speed.train_cache=transform_start) -----------------------------

def start_config(fmt: str, crop: str = "mimic", *overrides: str):
    cfg, _ = resolve_config("exp07", None, ["input.img_size=24", f"augment.crop={crop}", "augment.mimic_scale=2.5",
                                            "validation.mode=whole", f"speed.image_cache={fmt}",
                                            "speed.train_cache=transform_start", *overrides])
    return cfg


@pytest.mark.parametrize("fmt, tolerance", [("npy", 0), ("jpg", 2.0)])
def test_a_square_entry_is_the_training_transforms_first_step_of_the_original(tmp_path, fmt, tolerance):
    """What the uncached training transform starts with (its resize to the square) equals the cached item: exactly
    as npy, within the JPEG round trip (mean absolute difference in grey levels) as jpg."""
    from src.data.transforms import train_crop

    coarse = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # colour fields, not noise
    source = str(tmp_path / "painting.png")
    cv2.imwrite(source, cv2.resize(coarse, (230, 170), interpolation=cv2.INTER_CUBIC))
    cfg = start_config(fmt)
    first_step = train_crop(cfg.augment, cfg.input.img_size)[0]
    uncached = first_step(image=read_image(source))["image"]
    cache = training_cache(cfg, cache_for(cfg, tmp_path))
    cached = cache.load(source)
    assert cached.shape == uncached.shape == (60, 60, 3) and cache.geometry == "60 x 60 px"
    assert np.abs(cached.astype(float) - uncached).mean() <= tolerance
    np.testing.assert_array_equal(cache.load(source), cached)  # a hit gives what the miss gave
    assert (cache.hits, cache.misses) == (1, 1)


def test_the_training_images_from_a_square_npy_cache_are_those_of_no_cache(tiny_root, tmp_path):
    """Every epoch's crops and flips of the transform that skips the first resize, on the cached squares, equal the
    full transform's on the decoded originals, seed for seed: the cache changes no pixel."""
    paths = sorted(str(p) for p in (tiny_root / "train").iterdir())[:5]
    cfg = start_config("npy")
    cached = training_dataset(cfg, paths, [0] * 5, cache_for(cfg, tmp_path), seed=0)
    assert cached.cache.square == 60
    plain = training_dataset(cfg, paths, [0] * 5, None, seed=0)
    for key in [(i, seed) for i in range(5) for seed in (1, 2)] * 2:  # cold, then warm
        assert torch.equal(cached[key][0], plain[key][0])
    assert cached.cache.misses == 5 and cached.cache.hits == 15


def test_the_geometry_is_part_of_the_key_and_rrc_keeps_the_short_side(tmp_path):
    source = write_image(tmp_path / "painting.png", 200, 120)
    squares = {side: ImageCache(tmp_path / "cache", 100, "npy", square=side) for side in (48, 64)}
    short = ImageCache(tmp_path / "cache", 100, "npy")
    assert len({squares[48].key(source), squares[64].key(source), short.key(source)}) == 3
    assert squares[48].load(source).shape == (48, 48, 3) and squares[64].load(source).shape == (64, 64, 3)
    assert short.load(source).shape == (167, 100, 3)
    assert short.key(source) == ImageCache(tmp_path / "other", 100, "jpg").key(source)  # entries made before stay
    for crop, side in (("random", 48), ("none", 24), ("mimic", 60)):
        assert training_cache(start_config("jpg", crop, "augment.resize_scale=2.0"),
                              short).square == side
    rrc = start_config("jpg", "rrc")
    assert training_cache(rrc, short) is short
    assert training_cache(rrc.model_copy(update={"speed": rrc.speed.model_copy(update={"train_cache": "short_side"})}),
                          short) is short
