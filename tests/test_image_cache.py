"""The decoded-image cache: hits, misses, invalidation when the source changes, and identical pixels either way."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from src.core.config import resolve_config
from src.data.images import read_image
from src.data.image_cache import ImageCache, cache_for, needed_short_side, shrink
from src.data.loader import ImageDataset, make_loader


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
