"""`bash run.sh bench`: how fast one backbone trains and predicts here, and what each speed switch buys.

Five sections, figures only (nothing passes or fails):
- input pipeline: images/s of decode + training transform through the DataLoader, decoding every image every
  time (the plain path) against the image cache (cold = first epoch, which fills it; warm = later epochs),
  plus persistent workers over two epochs and pinned memory for the copy to the GPU;
- training steps on a batch already on the device: the plain path (fp32, NCHW, no cudnn benchmark, eager) and
  each switch alone and all together, with peak GPU memory: the model's ceiling, without the input pipeline;
- the training loop on real images: plain (fp32, no cache) against the default switches with a warm cache;
  when it falls well short of the ceiling, the input pipeline is the bottleneck;
- inference with and without TTA;
- memory (asked for by name): the estimated training memory and the largest batch for each GPU size (with
  train.accumulate_steps, in micro-batches: the memory is a micro-batch's), beside the FLOPs of a training image
  (both counted on FakeTensors, so a large backbone takes a minute on the CPU).
The model is built with random weights (speed does not depend on them, and nothing is downloaded).
"""
from __future__ import annotations

import argparse
import math
import platform
import resource
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..core.distributed import SINGLE_PROCESS
from ..core.errors import UserError
from ..core.files import write_text
from ..core.runtime import autocast_dtype, available_cores, select_device, to_device, worker_count
from ..core.schema import ExperimentConfig
from ..data.competition import CompetitionData
from ..data.device_input import has_device_share
from ..data.image_cache import ImageCache, needed_short_side, training_cache
from ..inference.predictor import Predictor
from ..inference.tta import with_tta
from ..model.networks import build_model, normalisation
from ..model.prepare import compile_mode, compiles, is_compiled, uses_channels_last
from ..training.loop import EpochStats, Training, build_training, train_one_epoch, train_step
from .bench_common import (Figure, images_per_second, no_download, peak_gib, plain, reset_peak, timed_seconds, waiting,
                           with_speed)
from .bench_input import input_pipeline
from .flops import Peak, StepFlops, datasheet_peak, device_name, measured_peak, step_flops, utilisation
from .memory import GPUS, estimate, estimating_config, this_gpu
from .memory import table as memory_table
from .projection import projection_lines


class Bench:
    def __init__(self, cfg: ExperimentConfig, data: CompetitionData, n_images: int, steps: int, warmup: int,
                 workers: Optional[int], log: Callable[[str], None], device: Optional[torch.device] = None):
        self.cfg, self.data, self.steps, self.warmup, self.log = cfg, data, steps, warmup, log
        self.device = device or select_device()
        self.workers = worker_count(workers, self.device)
        self.cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": self.workers})})
        self.rows = data.train.iloc[np.arange(n_images) % len(data.train)]  # repeated when the data has fewer
        self.paths, self.labels = self.rows["path"].tolist(), self.rows["label"].tolist()
        self.figures: list[Figure] = []
        model = build_model(cfg.model.model_copy(update={"pretrained": False}), len(data.classes), cfg.input.img_size)
        self.mean, self.std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
        self.cuda_only = "CUDA only" if self.device.type != "cuda" else ""
        self.peaks: dict[torch.dtype, Peak] = {}
        self.rates: dict[str, float] = {}  # what the projection reads: training, prediction, compile seconds

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        self.log(figure.row())
        return figure

    def training(self, cfg: ExperimentConfig, rows, cache: Optional[ImageCache] = None) -> Training:
        """What the trainer builds for `cfg` (model, loader over `rows`, optimiser, schedule, scaler, loss, CutMix),
        with random weights, on a clean peak-memory count."""
        reset_peak(self.device)
        return build_training(no_download(cfg), rows, len(self.data.classes), self.device, image_cache=cache)

    def timed(self, work: Callable[[], int]) -> float:
        """images/s of `work` (one batch a call) over the timed steps, after the warm-up steps."""
        for _ in range(self.warmup):
            work()
        return images_per_second(lambda: sum(work() for _ in range(self.steps)), self.device)

    def first_call(self, work: Callable[[], int]) -> float:
        """Seconds of one call of `work`, the device's queue drained: a compiled model's first call compiles."""
        return timed_seconds(work, self.device)[1]

    def train_steps(self, cfg: ExperimentConfig) -> tuple[float, Optional[float], Optional[float]]:
        """images/s and peak GPU memory of the trainer's steps (train.py's train_step: loss, scaler, schedule,
        CutMix as configured) on one batch kept on the device, and the first step's seconds when it compiles."""
        run = self.training(cfg, self.rows)
        size, batch = cfg.input.img_size, cfg.train.batch_size
        images = to_device(torch.randn(batch, 3, size, size), self.device, uses_channels_last(cfg, self.device))
        labels = torch.randint(0, len(self.data.classes), (batch,), device=self.device)

        def step() -> int:
            train_step(run, images, labels)
            return batch

        compiling = self.first_call(step) if is_compiled(run.train_model) else None
        return self.timed(step), peak_gib(self.device), compiling

    @cached_property
    def flops(self) -> StepFlops:
        """Model and hardware FLOPs of the trainer's step per image, at the config's switches (eager: compiling
        changes no FLOP)."""
        return step_flops(self.training(with_speed(self.cfg, self.cfg.train.amp, compile=False), self.rows))

    def peak(self, dtype: torch.dtype) -> Peak:
        """The device's datasheet and measured peaks in `dtype`, measured once."""
        if dtype not in self.peaks:
            name = device_name(self.device)
            self.peaks[dtype] = Peak(name, dtype, datasheet_peak(name, dtype), measured_peak(self.device, dtype))
        return self.peaks[dtype]

    def compute_dtype(self, amp: bool) -> torch.dtype:
        """The dtype the matmuls compute in with autocast on or off: float32 without autocast."""
        return autocast_dtype(amp, self.cfg.train.amp_dtype, self.device) or torch.float32

    def limits_line(self) -> str:
        flops, cfg = self.flops, self.cfg
        sam = ", x2 for SAM's two passes" if flops.passes == 2 else ""
        recompute = "gradient checkpointing's recompute included, " if cfg.speed.grad_checkpointing else ""
        return (f"model: {flops.model / 1e9:,.2f} GFLOP per training image (3 x the forward's "
                f"{flops.forward / 1e9:,.2f}{sam}); hardware: {flops.hardware / 1e9:,.2f} GFLOP counted on the "
                f"trainer's step ({recompute}FlopCounterMode at {cfg.input.img_size}px); peak: "
                f"{self.peak(self.compute_dtype(cfg.train.amp)).line()}")

    def mfu(self, images_per_s: float, amp: bool) -> str:
        """MFU of a rate measured with autocast on or off, against the peak of the dtype that computes in."""
        return utilisation(images_per_s, self.flops, self.peak(self.compute_dtype(amp)))

    def memory(self) -> list[str]:
        """The estimated training memory and the largest batch for common GPU sizes (src/tools/memory.py)."""
        cfg = estimating_config(self.cfg, self.device)
        gpus = GPUS + ((this_gpu(self.device),) if self.device.type == "cuda" else ())
        steps = cfg.train.accumulate_steps
        return memory_table(estimate(self.training(cfg, self.rows)), cfg.train.batch_size,
                            multiple=math.lcm(steps, 2 if cfg.train.cutmix_prob else 1), gpus=gpus,
                            accumulate_steps=steps)

    def model_ceiling(self) -> float:
        """The trainer's step alone: plain, each switch alone, all of them eager, and all of them compiled (the
        compiled row gives the compile seconds and its gain over the same switches eager)."""
        section, base = "training steps (batch on device)", plain(self.cfg)
        plain_rate, memory, _ = self.train_steps(base)
        self.add(Figure(section, "plain: fp32, NCHW, eager", plain_rate, peak_gib=memory,
                        note=self.mfu(plain_rate, amp=False)))
        dtype = autocast_dtype(True, self.cfg.train.amp_dtype, self.device)
        autocast_name = f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "autocast"
        everything = dict(amp=True, channels_last=True, cudnn_benchmark=True)
        switches = {autocast_name: dict(amp=True), "channels_last": dict(amp=False, channels_last=True),
                    "cudnn benchmark": dict(amp=False, cudnn_benchmark=True),
                    f"all: {autocast_name} + channels_last + cudnn benchmark": everything,
                    "all + torch.compile": dict(everything, compile=True)}
        best, eager = plain_rate, None
        for name, switch in switches.items():
            if self.cuda_only:
                self.add(Figure(section, name, None, note=self.cuda_only))
                continue
            switch = dict(switch)
            amp = switch.pop("amp")
            rate, memory, compiling = self.train_steps(with_speed(base, amp, **switch))
            best = max(best, rate)
            note = self.mfu(rate, amp)
            if compiling is not None:
                mode = compile_mode(self.cfg, self.device, SINGLE_PROCESS)
                note = (f"{rate / eager:.2f}x the same switches eager; compiled ({mode}) in {compiling:.0f}s, the "
                        f"first step; {note}")
            eager = rate
            self.add(Figure(section, name, rate, plain_rate, memory, note=note))
        return best

    def train_loop(self, cfg: ExperimentConfig, cache: Optional[ImageCache]) -> tuple[EpochStats, Training]:
        """The trainer's own epoch (train.py's train_one_epoch) over steps x batch real images: one untimed epoch
        (it fills the cache and compiles), then the timed one."""
        rows = self.rows.iloc[np.arange(self.steps * cfg.train.batch_size) % len(self.rows)]
        run = self.training(cfg, rows, cache)
        train_one_epoch(run, 0, desc="bench warm-up epoch")
        return train_one_epoch(run, 1, desc="bench epoch"), run

    def real_loop(self, cache_root: Path, ceiling: Optional[float]) -> None:
        section = "training loop (real images)"
        plain_stats, _ = self.train_loop(plain(self.cfg), None)
        self.add(Figure(section, "plain: fp32, decode every image", plain_stats.images_per_s,
                        peak_gib=peak_gib(self.device),
                        note=f"{waiting(plain_stats)}; {self.mfu(plain_stats.images_per_s, amp=False)}"))
        cache = ImageCache(cache_root / self.cfg.speed.image_cache, needed_short_side(self.cfg),
                           self.cfg.speed.image_cache) if self.cfg.speed.image_cache != "none" else None
        stats, run = self.train_loop(self.cfg, cache)
        share = f"; {100 * stats.images_per_s / ceiling:.0f}% of the steps-only rate" if ceiling else ""
        compiled = f"; compiled in {run.compile_seconds:.0f}s (the first step)" if run.compile_seconds else ""
        self.rates.update(train=stats.images_per_s, train_compile=run.compile_seconds or 0.0)
        self.add(Figure(section, f"config switches, {loop_setting(self.cfg, cache, self.device)}", stats.images_per_s,
                        plain_stats.images_per_s, peak_gib(self.device),
                        note=f"{waiting(stats)}{share}{compiled}; {self.mfu(stats.images_per_s, self.cfg.train.amp)}"))

    def inference(self) -> None:
        section = "inference"
        cfg = self.cfg
        size, batch = cfg.input.img_size, cfg.inference.batch_size
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=self.device)
        predictor = Predictor.for_checkpoints(cfg, len(self.data.classes), self.device)
        plain_rate = None
        for mode in ("none", "hflip", "d4"):
            with_mode = Predictor(cfg, with_tta(predictor.model, mode), predictor.network, self.device)
            reset_peak(self.device)

            def predict() -> int:
                with_mode.batch(images)
                return batch

            compiling = self.first_call(predict) if mode == "none" and with_mode.pad_to else None
            rate = self.timed(predict)
            plain_rate = plain_rate or rate
            note = "config switches" if mode == "none" else "against no TTA"
            if mode == "none":
                self.rates.update(predict=rate, predict_compile=compiling or 0.0)
                note += f"; compiled in {compiling:.0f}s (the first batch)" if compiling else ""
            self.add(Figure(section, "no TTA" if mode == "none" else f"TTA {mode}", rate,
                            plain_rate if mode != "none" else None, peak_gib(self.device), note=note))


def loop_setting(cfg: ExperimentConfig, cache: Optional[ImageCache], device: torch.device) -> str:
    """What the config's own loop runs with, in words."""
    if cache is None:
        return "no image cache"
    start = training_cache(cfg, cache).square is not None  # the cache the trainer reads through
    where = "at the transform's start" if start else "at the short side"
    moved = cfg.speed.gpu_augment and has_device_share(cfg.augment)
    augment = ", pixel augmentations on the device" if moved else ""
    compiled = ", compiled" if compiles(cfg, device) else ""
    return f"{cfg.speed.image_cache} cache {where} warm{augment}{compiled}"


def machine_line(device: torch.device) -> str:
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"{platform.machine()}, {available_cores()} cores, {accelerator}, torch {torch.__version__}, "
            f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


SECTIONS = ("pipeline", "steps", "loop", "inference", "memory")


def run_bench(cfg: ExperimentConfig, data: CompetitionData, outputs: Path, n_images: int, steps: int,
              warmup: int, workers: Optional[int], sections: tuple[str, ...] = SECTIONS,
              log: Callable[[str], None] = print, epochs: Optional[int] = None) -> Path:
    bench = Bench(cfg, data, n_images, steps, warmup, workers, log)
    speed_sections = set(sections) - {"memory"}
    header = (["| section | setting | images/s | vs plain | peak GPU GiB | note |", "|---|---|---:|---:|---:|---|"]
              if speed_sections else [])
    log(f"bench: {cfg.model.backbone} at {cfg.input.img_size}px, batch {cfg.train.batch_size}, "
        f"{len(bench.paths)} images of {data.root}, {bench.workers} workers, {steps} timed steps on "
        f"{bench.device.type}")
    limits = [bench.limits_line()] if {"steps", "loop", "memory"} & set(sections) else []
    if limits or header:
        log("\n".join([*limits, *header]))
    outputs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=outputs) as cache_root:
        if "pipeline" in sections:
            input_pipeline(bench, Path(cache_root))
        ceiling = bench.model_ceiling() if "steps" in sections else None
        if "loop" in sections:
            bench.real_loop(Path(cache_root), ceiling)
    if "inference" in sections:
        bench.inference()
    memory = bench.memory() if "memory" in sections else []
    if memory:
        log("\n".join(memory))
    projection = []
    if {"train", "predict"} <= set(bench.rates):
        rates = bench.rates
        projection = projection_lines(cfg, len(data.train), len(data.test), rates["train"], rates["predict"],
                                      rates["train_compile"] + rates["predict_compile"], epochs)
        log("\n".join(projection))
    machine = machine_line(bench.device)
    log(f"machine: {machine}")
    path = outputs / "bench" / f"{cfg.name}-{cfg.model.backbone}-{cfg.input.img_size}-b{cfg.train.batch_size}.md"
    write_text("\n".join([f"# bench: {cfg.model.backbone} at {cfg.input.img_size}px, batch {cfg.train.batch_size}",
                          "", f"machine: {machine}", f"data: {len(bench.paths)} images of {data.root}", *limits,
                          "", *header, *(figure.row() for figure in bench.figures), *([""] + memory if memory else []),
                          *([""] + projection if projection else [])])
               + "\n", path)
    return path


def command_bench(args: argparse.Namespace) -> None:
    from ..pipeline.resolve import log, resolve_run

    overrides = list(args.overrides)
    for key, value in (("model.backbone", args.backbone), ("input.img_size", args.img_size),
                       ("train.batch_size", args.batch), ("inference.batch_size", args.batch)):
        if value is not None:
            overrides.append(f"{key}={value}")
    run = resolve_run(args.experiment, args.profile, overrides, args.data)
    on_gpu = torch.cuda.is_available()
    steps = args.steps if args.steps is not None else (30 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    sections = tuple(part.strip() for part in args.sections.split(","))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise UserError(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    path = run_bench(run.cfg, run.data, Path(args.outputs), args.images, steps, warmup, args.workers, sections, log,
                     args.epochs)
    log(f"wrote {path}")
