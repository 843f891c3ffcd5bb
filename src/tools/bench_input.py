"""`bench`'s input pipeline section: images/s of the DataLoader's workers (decode, the training transform, uint8
batches), decoding every image against the image cache at the short side the transforms need (cold: the first epoch
fills it; warm: later epochs) and at the square the training transform starts from, with the pixel augmentations on
the CPU or on the device; then the device's share (normalise, and augment under speed.gpu_augment), OpenCV's
threads, persistent workers and pinned memory."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.schema import ExperimentConfig
from ..model.prepare import uses_channels_last
from ..data.image_cache import ImageCache, needed_short_side
from ..data.device_input import has_device_share, training_inputs
from ..data.loader import make_loader, training_dataset
from ..data.transforms import train_start_side
from .bench_common import Figure, images_per_second, plain, with_speed

SECTION = "input pipeline"


def loader_rate(dataset, cfg: ExperimentConfig, workers: int, device: torch.device, epochs: int = 1,
                opencv_threads: Optional[int] = 1) -> float:
    loader = make_loader(dataset, cfg.train.batch_size, workers, device, train=True, seed=0,
                         pin_memory=cfg.speed.pin_memory, persistent_workers=cfg.speed.persistent_workers,
                         worker_opencv_threads=opencv_threads)

    def run() -> int:
        count = 0
        for _ in range(epochs):
            for images, _labels in loader:
                count += len(images)
        return count

    return images_per_second(run, device)


def on_disk_kib(folder: Path, images: int) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / max(images, 1) / 2**10


def input_pipeline(bench, cache_root: Path) -> None:
    """The rows of the section, against the plain path (decode every image, the augmentation on the CPU)."""
    base, workers, device = plain(bench.cfg), bench.workers, bench.device

    def rate(cfg: ExperimentConfig, cache: Optional[ImageCache], workers: int = workers, **kwargs) -> float:
        return loader_rate(training_dataset(cfg, bench.paths, bench.labels, cache, seed=0), cfg, workers, device,
                           **kwargs)

    plain_rate = bench.add(Figure(SECTION, f"decode every image, {workers} workers (plain)", rate(base, None))
                           ).images_per_s
    bench.add(Figure(SECTION, "decode every image, no workers (one core)", rate(base, None, 0), plain_rate))
    side = train_start_side(bench.cfg.augment, bench.cfg.input.img_size)
    device_share = has_device_share(bench.cfg.augment)
    for fmt in ("jpg", "npy"):
        cache = ImageCache(cache_root / fmt, needed_short_side(bench.cfg), fmt)
        bench.add(Figure(SECTION, f"{fmt} cache, cold (first epoch fills it)", rate(base, cache), plain_rate))
        bench.add(Figure(SECTION, f"{fmt} cache, warm", rate(base, cache), plain_rate,
                         note=f"short side {cache.short_side}px, {on_disk_kib(cache_root / fmt, len(bench.paths)):,.0f}"
                         " KiB an image on disk"))
        if side is None:
            continue
        start = with_speed(base, False, image_cache=fmt, train_cache="transform_start")
        square = cache_root / f"{fmt}-start"
        rate(start, ImageCache(square, cache.short_side, fmt))  # fills it
        bench.add(Figure(SECTION, f"{fmt} cache at the transform's start, warm", rate(start, ImageCache(
            square, cache.short_side, fmt)), plain_rate, note=f"{side} x {side} px (speed.train_cache="
                  f"transform_start), {on_disk_kib(square, len(bench.paths)):,.0f} KiB an image on disk"))
        if device_share:
            on_device = with_speed(start, False, gpu_augment=True)
            bench.add(Figure(SECTION, f"{fmt} cache at the transform's start, warm, pixel augmentations on the "
                             "device", rate(on_device, ImageCache(square, cache.short_side, fmt)), plain_rate,
                             note="the workers' share: crop, flips, copy (speed.gpu_augment)"))
    device_stage(bench)
    if workers:
        cache = ImageCache(cache_root / "jpg", needed_short_side(bench.cfg), "jpg")
        one_thread = rate(base, cache)
        bench.add(Figure(SECTION, "jpg cache warm, OpenCV's default threads in every worker",
                         rate(base, cache, opencv_threads=None), one_thread,
                         note=f"against one OpenCV thread per worker: {one_thread:,.1f} images/s"))
        two_epochs = rate(base, cache, epochs=2)
        persistent = rate(with_speed(base, False, persistent_workers=True), cache, epochs=2)
        bench.add(Figure(SECTION, "jpg cache warm, 2 epochs: persistent workers", persistent, two_epochs,
                         note="against workers restarted each epoch"))
    pinned_copy(bench)


def device_stage(bench) -> None:
    """images/s of what the device does to a uint8 batch before the model: normalise, and the pixel augmentations
    under speed.gpu_augment."""
    size, batch = bench.cfg.input.img_size, bench.cfg.train.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=bench.device)
    for gpu_augment in (False, True) if has_device_share(bench.cfg.augment) else (False,):
        cfg = with_speed(bench.cfg, bench.cfg.train.amp, gpu_augment=gpu_augment)
        stage = training_inputs(cfg, bench.mean, bench.std, 0, uses_channels_last(cfg, bench.device))
        what = "normalise + pixel augmentations (speed.gpu_augment)" if gpu_augment else "normalise"
        bench.add(Figure(SECTION, f"the device's share: {what}, on {bench.device.type}",
                         bench.timed(lambda: len(stage(images, 0))), note=f"batches of {batch}"))


def pinned_copy(bench) -> None:
    if bench.device.type != "cuda":
        bench.add(Figure(SECTION, "copy to the GPU: pinned memory", None, note="CUDA only"))
        return
    size = bench.cfg.input.img_size
    batch = torch.randint(0, 256, (bench.cfg.train.batch_size, 3, size, size), dtype=torch.uint8)
    pinned = batch.pin_memory()

    def copies(source: torch.Tensor) -> Callable[[], int]:
        def run() -> int:
            for _ in range(20):
                source.to(bench.device, non_blocking=True)
            return 20 * len(source)
        return run

    pageable_rate = images_per_second(copies(batch), bench.device)
    bench.add(Figure(SECTION, "copy to the GPU: pinned memory", images_per_second(copies(pinned), bench.device),
                     pageable_rate, note=f"uint8 batches; pageable: {pageable_rate:,.0f} images/s"))
