"""What a training step needs in GPU memory, estimated without a GPU, and the largest batch that fits a GPU.

The trainer's own step (train_step: forward, backward, the optimiser's step, the EMA's) runs on a copy of the
Training whose tensors are FakeTensors: shapes, dtypes and storages without data or arithmetic, so EVA-02-L at 448 px
takes seconds where its real step takes half an hour on 2 CPU cores. A dispatch mode counts the bytes of every
storage alive after every operation, from the operation that makes (or first reads) it until its last reference
goes: weights, EMA, AdamW's moments, gradients, what autograd keeps for the backward pass, autocast's low-precision
copies of the weights, the blocks a checkpointed model recomputes during its backward pass, temporaries. A test holds
this count against the CPU allocator's (torch.profiler's memory events) for a checkpointed ViT and a plain one.

The step runs twice (the first makes AdamW's moments) at two probe batches. After each operation of the second step
the bytes alive are a line in the batch, fixed + per image x batch (every tensor is either independent of the batch or
proportional to it), and the peak at a batch is the highest of those lines: not one line, since the moment of the
peak moves. A checkpointed ViT peaks at the end of its backward pass at a small batch, when every gradient exists,
and near its start at a large one, when every block's input is still kept. Under gradient accumulation
(train.accumulate_steps k) the step splits its batch into k micro-batches, so the probes are k times larger, the
batch that fits is k micro-batches, and what grows with it is a micro-batch's activations plus the batch's inputs.

An estimate, not a measurement: a GPU adds its kernels' workspace, the allocator's rounding and fragmentation and
the CUDA context (about a GiB), which HEADROOM leaves room for. On the CPU the step follows CUDA's autocast lists and
attention kernels (src/tools/cuda_rules.py), so the CPU gives the batches a GPU run of the estimator gives. `bench` on
a GPU reports the measured peak.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import random
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from ..core.runtime import autocast_dtype
from ..core.schema import ExperimentConfig
from ..training.loop import Training, capture_rng, restore_rng, train_step
from ..training.optim import SAM
from .cuda_rules import cuda_rules

GIB = 2 ** 30
HEADROOM = 0.85  # the share of a GPU's memory the estimate may fill: the rest for workspace, fragmentation, context
PROBE_BATCHES = (2, 4)  # even, for CutMix; micro-batches of these under gradient accumulation


@dataclass(frozen=True)
class Gpu:
    """A GPU size by its label as sold ("16 GB"), a card of that size, and the capacity torch reports on it
    (torch.cuda.get_device_properties(...).total_memory: less than the label says, for ECC and the driver's
    reservation), from which the batch that fits is computed."""
    marketed: str
    card: str
    gib: float

    @property
    def bytes(self) -> float:
        return self.gib * GIB


# The smallest capacity torch reports on common cards of each size, as users' out-of-memory messages quote it ("GPU 0
# has a total capacity of 14.56 GiB"; it varies a little with the driver and ECC). The H200's is the figure this
# project's GPU machine was described with, not read off a card here.
GPUS = (Gpu("16 GB", "T4", 14.56), Gpu("24 GB", "A10", 21.99), Gpu("40 GB", "A100 40GB", 39.39),
        Gpu("80 GB", "H100, A100 80GB", 79.11), Gpu("141 GB", "H200", 139.8))


def this_gpu(device: torch.device) -> Gpu:
    return Gpu("this GPU", torch.cuda.get_device_name(device),
               torch.cuda.get_device_properties(device).total_memory / GIB)


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes a training step holds, as lines in the batch, (fixed bytes, bytes an image): every moment of the
    step that is the peak at some batch, and what stays on the device between steps."""
    moments: tuple[tuple[float, float], ...]
    between_steps: tuple[float, float]
    precision: str  # the autocast dtype the step ran under

    @classmethod
    def from_probes(cls, batches: tuple[int, int], timelines: tuple[list[int], list[int]],
                    precision: str) -> MemoryEstimate:
        """The lines through two probes' timelines (the bytes after every operation, the same operations)."""
        (small, large), (first, second) = batches, timelines
        if len(first) != len(second):
            raise RuntimeError(f"the training step ran {len(first)} operations at batch {small} and {len(second)} at "
                               f"batch {large}: the memory estimate needs the same ones")
        lines = [((a * large - b * small) / (large - small), (b - a) / (large - small)) for a, b in zip(first, second)]
        return cls(highest_lines(lines), lines[0], precision)

    def peak(self, batch: int) -> tuple[float, float]:
        """The line of the step's peak at `batch`."""
        return max(self.moments, key=lambda line: line[0] + line[1] * batch)

    def training_bytes(self, batch: int) -> float:
        fixed, per_image = self.peak(batch)
        return fixed + per_image * batch

    def largest_batch(self, gpu_bytes: float, multiple: int = 1) -> int:
        """The largest batch (a multiple of `multiple`) whose peak fits HEADROOM of `gpu_bytes`. Every moment holds
        the batch's images, so every line grows with the batch."""
        room = gpu_bytes * HEADROOM
        if any(fixed > room for fixed, _ in self.moments):
            return 0
        return min(int((room - fixed) // per_image) for fixed, per_image in self.moments) // multiple * multiple


def highest_lines(lines: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """The lines that no other line matches or exceeds in both its fixed part and its per-image part: the only ones
    that can be the highest at a batch."""
    kept: list[tuple[float, float]] = []
    for fixed, per_image in sorted(set(lines), key=lambda line: (-line[1], -line[0])):
        if not kept or fixed > kept[-1][0]:
            kept.append((fixed, per_image))
    return tuple(kept)


class LiveBytes(TorchDispatchMode):
    """The bytes of the distinct storages alive, sampled after every operation that runs inside it: a storage counts
    from the first operation that makes or reads it until its last reference goes (a weakref finalizer), so a view
    adds nothing and a tensor freed halfway through a step stops counting there."""

    def __init__(self):
        super().__init__()
        self.counted = WeakIdKeyDictionary()
        self.bytes = 0
        self.timeline: list[int] = []

    def _freed(self, size: int) -> None:
        self.bytes -= size

    def count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage not in self.counted:
            self.counted[storage] = size = storage.nbytes()
            self.bytes += size
            weakref.finalize(storage, self._freed, size)

    def sample(self) -> None:
        self.timeline.append(self.bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.count, (args, kwargs, out))
        self.sample()
        return out


def step_timeline(run: Training, batch: int) -> list[int]:
    """The bytes alive before and after every operation of the trainer's second step on `batch` random images (the
    first makes the optimiser's moments). It steps `run`: use a copy. The random streams are seeded (CutMix draws
    the same boxes at every probe) and restored."""
    size = run.cfg.input.img_size
    streams = capture_rng()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    gc.collect()
    live = LiveBytes()
    try:
        with live:
            images = torch.randn(batch, 3, size, size, device=run.device)
            labels = torch.zeros(batch, dtype=torch.long, device=run.device)
            train_step(run, images, labels)
            start = len(live.timeline)
            live.sample()
            train_step(run, images, labels)
    finally:
        restore_rng(streams)
    return live.timeline[start:]


@contextlib.contextmanager
def fake_training(run: Training) -> Iterator[Training]:
    """A copy of `run` whose tensors are FakeTensors, with their mode active: the eager model trains (a DDP wrapper is
    not copied; build `run` without speed.compile, whose modules are not copied either), no loader, and no gradient
    scaling (the scaler's inf checks read values, which FakeTensors do not have, and its state is a few bytes)."""
    mode = FakeTensorMode()
    plain = dataclasses.replace(run, train_model=run.model, loader=None,
                                scaler=torch.amp.GradScaler(run.device.type, enabled=False))
    memo: dict = {}
    with FakeCopyMode(mode):
        fake = copy.deepcopy(plain, memo)
        if isinstance(run.optimizer, SAM):  # torch's Optimizer copies only its defaults, state and parameter groups
            fake.optimizer.rho = run.optimizer.rho
            fake.optimizer.base_optimizer = copy.deepcopy(run.optimizer.base_optimizer, memo)  # the same parameters
    with mode, warnings.catch_warnings():
        # Optimizer.__getstate__ drops the step wrapper the LR scheduler installed, so the copy's scheduler would warn
        warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")
        yield fake


def estimating_config(cfg: ExperimentConfig, device: torch.device) -> ExperimentConfig:
    """`cfg` as the estimate runs it: eager (a compiled graph plans its own memory), and on the CPU under the
    autocast a GPU of compute capability 8.0 and up picks for `train.amp_dtype: auto` (bfloat16; float16 below 8.0
    keeps the same bytes)."""
    train = cfg.train
    if train.amp and train.amp_dtype == "auto" and device.type != "cuda":
        train = train.model_copy(update={"amp_dtype": "bfloat16"})
    return cfg.model_copy(update={"train": train, "speed": cfg.speed.model_copy(update={"compile": False})})


def estimate(run: Training, batches: tuple[int, int] | None = None, cuda: bool = True) -> MemoryEstimate:
    """The estimate for a Training built from estimating_config: its step on FakeTensors at two probe batches
    (default: PROBE_BATCHES micro-batches of train.accumulate_steps each). On the CPU the step follows CUDA's casting
    rules and attention kernels (src/tools/cuda_rules.py) unless `cuda` is false (the estimate of what the CPU itself
    allocates)."""
    batches = batches or tuple(probe * run.cfg.train.accumulate_steps for probe in PROBE_BATCHES)
    rules = cuda_rules if cuda and run.device.type == "cpu" else contextlib.nullcontext
    timelines = []
    for batch in batches:
        with fake_training(run) as fake, rules():
            timelines.append(step_timeline(fake, batch))
    dtype = autocast_dtype(run.cfg.train.amp, run.cfg.train.amp_dtype, run.device)
    return MemoryEstimate.from_probes(batches, tuple(timelines), str(dtype or torch.float32).removeprefix("torch."))


def table(estimated: MemoryEstimate, batch: int, multiple: int = 1, gpus: tuple[Gpu, ...] = GPUS,
          accumulate_steps: int = 1) -> list[str]:
    """A line on the estimate at `batch`, then Markdown rows: the largest batch for each GPU (with gradient
    accumulation: that many micro-batches of the batch / accumulate_steps images, whose memory it is)."""
    fixed, per_image = estimated.peak(batch)

    def fits(gpu: Gpu) -> str:
        largest = estimated.largest_batch(gpu.bytes, multiple)
        split = f" ({accumulate_steps} x {largest // accumulate_steps})" if accumulate_steps > 1 else ""
        return f"{largest}{split}"

    accumulated = "" if accumulate_steps == 1 else (
        f" ({accumulate_steps} micro-batches of {batch // accumulate_steps}: the activations, and BatchNorm, are a "
        "micro-batch's)")
    heading = "largest batch that fits (estimate)" + ("" if accumulate_steps == 1 else ": micro-batches x their size")
    rows = [f"| GPU, as sold | capacity torch reports | {heading} |", "|---|---:|---:|"]
    rows += [f"| {gpu.marketed} ({gpu.card}) | {gpu.gib:.2f} GiB | {fits(gpu)} |" for gpu in gpus]
    return [f"estimated training memory ({estimated.precision} autocast; the trainer's step on FakeTensors): "
            f"{estimated.training_bytes(batch) / GIB:.2f} GiB at batch {batch}{accumulated}, the peak of the step, "
            f"{fixed / GIB:.2f} GiB fixed (weights, gradients, optimiser moments, EMA, autocast's copies) + "
            f"{per_image / 2 ** 20:.1f} MiB an image; {estimated.between_steps[0] / GIB:.2f} GiB stays between "
            f"steps", "", *rows]
