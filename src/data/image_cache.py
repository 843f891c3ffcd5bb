"""Decode each image once: a disk cache of images shrunk to the short side the transforms need, or squashed to the
square the training transform starts from.

The competition's paintings are up to about 2,000 px on a side and decoding them every epoch starves a GPU.
An entry is keyed by the source's absolute path, byte size and modification time and by its geometry (the target
short side, or the square's side), so a changed source file is decoded again and every experiment with the same
geometry shares the entries. Under the short side, images already small enough are not copied: a marker file
records that the original is read as it is. A square entry is what the training transform's first step makes of
the original (`square_resize`): with npy exactly, with jpg up to the JPEG round trip; the worker then only crops,
flips and copies, and the files stay in the operating system's page cache (RAM) once read. A miss returns exactly
what a later hit will load (the JPEG is decoded back), so results do not depend on whether the cache was warm.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path

import cv2
import numpy as np

from ..core.files import write_bytes
from ..core.schema import ExperimentConfig
from .images import read_image
from .transforms import square_resize, train_start_side

CACHE_VERSION = 1
JPEG_QUALITY = 95
SMALL_MARKER = "small"


def needed_short_side(cfg: ExperimentConfig) -> int:
    """Short side that the first resize of the train and eval transforms never upscales: 2x the input size, or
    the random-crop / mimic scale when that is larger, or what the smallest RandomResizedCrop or validation crop
    needs to keep the input size (its side share is the square root of its area share)."""
    augment = cfg.augment
    scales = [2.0, {"none": 2.0, "random": augment.resize_scale, "mimic": augment.mimic_scale,
                    "rrc": 1 / math.sqrt(augment.rrc_scale[0])}[augment.crop]]
    if cfg.validation.mode == "crops":
        if cfg.validation.crop_area == "auto":
            raise ValueError("validation.crop_area is still 'auto': resolve it with the data first (resolved)")
        scales.append(1 / math.sqrt(cfg.validation.crop_area[0]))
    return math.ceil(max(scales) * cfg.input.img_size)


def shrink(image: np.ndarray, short_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    factor = short_side / min(height, width)
    if factor >= 1:
        return image
    size = (max(short_side, round(width * factor)), max(short_side, round(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class ImageCache:
    """`load(path)` gives the RGB image shrunk to `short_side`, or squashed to `square` x `square` when that is set,
    from the cache when it can. Counts hits and misses (per process: each DataLoader worker counts its own)."""

    def __init__(self, directory: str | os.PathLike, short_side: int, fmt: str = "jpg", square: int | None = None):
        if fmt not in ("jpg", "npy"):
            raise ValueError(f"image cache format must be jpg or npy, got {fmt!r}")
        self.directory = Path(directory)
        self.short_side = short_side
        self.fmt = fmt
        self.square = square
        self.hits = 0
        self.misses = 0

    def at_square(self, side: int) -> ImageCache:
        """The same cache (folder, format) holding images squashed to side x side."""
        return ImageCache(self.directory, self.short_side, self.fmt, square=side)

    @property
    def geometry(self) -> str:
        return f"{self.square} x {self.square} px" if self.square else f"short side {self.short_side}px"

    def key(self, path: str) -> str:
        stat = os.stat(path)
        geometry = f"square {self.square}" if self.square else f"{self.short_side}"
        source = f"{CACHE_VERSION}|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{geometry}"
        return hashlib.sha1(source.encode()).hexdigest()

    def _entry(self, key: str, suffix: str) -> Path:
        return self.directory / key[:2] / f"{key}.{suffix}"

    def _read_entry(self, path: str, key: str) -> np.ndarray | None:
        if self._entry(key, SMALL_MARKER).is_file():
            return read_image(path)
        entry = self._entry(key, self.fmt)
        if not entry.is_file():
            return None
        try:
            if self.fmt == "npy":
                return np.load(entry, allow_pickle=False)
            image = cv2.imdecode(np.fromfile(entry, dtype=np.uint8), cv2.IMREAD_COLOR)
            return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        except (OSError, ValueError):
            return None

    def _store(self, key: str, image: np.ndarray) -> np.ndarray:
        if self.fmt == "npy":
            buffer = _npy_bytes(image)
        else:
            ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                return image
            buffer = encoded.tobytes()
            image = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        write_bytes(buffer, self._entry(key, self.fmt))
        return image

    def load(self, path: str) -> np.ndarray:
        key = self.key(path)
        image = self._read_entry(path, key)
        if image is not None:
            self.hits += 1
            return image
        self.misses += 1
        original = read_image(path)
        if self.square:
            return self._store(key, square_resize(self.square)(image=original)["image"])
        image = shrink(original, self.short_side)
        if image is original:
            write_bytes(b"", self._entry(key, SMALL_MARKER))
            return image
        return self._store(key, image)


def _npy_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()


def cache_for(cfg: ExperimentConfig, outputs: Path) -> ImageCache | None:
    """The configured cache (speed.image_cache), or None when it is off."""
    if cfg.speed.image_cache == "none":
        return None
    directory = Path(cfg.speed.cache_dir) if cfg.speed.cache_dir else outputs / "cache" / "images"
    return ImageCache(directory, needed_short_side(cfg), cfg.speed.image_cache)


def training_cache(cfg: ExperimentConfig, cache: ImageCache | None) -> ImageCache | None:
    """The cache training images are read through: `cache` itself, or under speed.train_cache=transform_start the
    same cache at the square the training transform starts from (crop rrc has none: `cache`)."""
    side = train_start_side(cfg.augment, cfg.input.img_size)
    if cache is None or cfg.speed.train_cache == "short_side" or side is None:
        return cache
    return cache.at_square(side)
