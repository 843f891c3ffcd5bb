"""How far a run is from what the hardware can do, under the standard definition of model FLOP utilisation (MFU,
PaLM's appendix B): the FLOPs the model needs per training image times the images/s measured, over the dense peak
the GPU's datasheet gives for the dtype the run computes in.

- Model FLOPs: 3 x one forward pass (the backward pass costs twice the forward), whatever the run recomputes.
  Gradient checkpointing's second forward of the blocks is not counted: it buys memory, not model work. SAM's second
  forward-backward pass is counted: it is the recipe's work (a SAM step needs both passes to take its step), so SAM
  doubles the model FLOPs.
- Hardware FLOPs: what the trainer's own step (`train_step`) performs, recompute included and each backward at its
  kernel's cost (attention's backward recomputes its scores: 2.5 x its forward). Over the same peak they give the
  hardware FLOP utilisation (HFU), which is what a profiler sees.
- The peak: DATASHEETS, matched on torch.cuda.get_device_name. Beside it `bench` times a dense square matmul on the
  spot (8192 x 8192 on a GPU), what the card delivers here, which is well under the datasheet on an H100. A device
  missing from the table, the CPU included, gets no MFU: its figures are shares of that measured matmul, and say so.

Both counts are FlopCounterMode's, on a FakeTensor copy of the trainer (shapes without arithmetic: EVA-02-L at
448 px in seconds, and the trainer is left as it was), at the real input size: matrix products, convolutions and
attention, the work of a GPU's tensor cores; elementwise work is not counted, as in every published MFU figure.

Two corrections to torch 2.14's counter. Its formula for a convolution's backward counts the weight gradient of a
grouped convolution as if it had one group (a depthwise 3x3 over 64 channels at 65 times its forward instead of 2,
EfficientNet at 40 times its forward): here each gradient costs its forward's multiply-adds, which is what both are.
And it has no formula for the CPU's attention kernels (aten._scaled_dot_product_flash_attention_for_cpu and its
backward), which it counted as 0 (18% of EVA-02-B's forward at 448 px): here they get torch's own formulas for the
GPU's attention kernels.
"""
from __future__ import annotations

import platform
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

from ..core.runtime import synchronize
from ..training.loop import Training, train_step
from ..training.optim import SAM
from .memory import fake_training

TERA = 1e12

# Dense peaks (no structured sparsity: NVIDIA's headline tensor figures are twice these) in TFLOP/s, from NVIDIA's
# datasheets, for the dtypes runs compute in. float32 is the CUDA cores' figure: torch does float32 matmuls without
# TF32 unless asked (cuDNN's convolutions do use TF32, so a float32 CNN can outrun it). Matched in order on
# torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "Tesla T4").
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DATASHEETS: tuple[tuple[str, str, dict[torch.dtype, float]], ...] = (
    (r"H100.*PCIe", "H100 PCIe", {BF16: 756, FP16: 756, FP32: 51}),
    (r"H100(?!.*NVL)", "H100 SXM", {BF16: 989, FP16: 989, FP32: 67}),
    (r"H200(?!.*NVL)", "H200 SXM", {BF16: 989, FP16: 989, FP32: 67}),
    (r"A100", "A100", {BF16: 312, FP16: 312, FP32: 19.5}),
    (r"L40S", "L40S", {BF16: 362, FP16: 362, FP32: 91.6}),
    (r"\bL4\b", "L4", {BF16: 121, FP16: 121, FP32: 30.3}),
    (r"\bA10\b", "A10", {BF16: 125, FP16: 125, FP32: 31.2}),
    (r"RTX 4090", "GeForce RTX 4090", {BF16: 165.2, FP16: 165.2, FP32: 82.6}),  # float32 accumulation
    (r"V100S", "V100S", {FP16: 130, FP32: 16.4}),
    (r"V100.*PCIE", "V100 PCIe", {FP16: 112, FP32: 14}),
    (r"V100", "V100 SXM2", {FP16: 125, FP32: 15.7}),
    (r"\bT4\b", "T4", {FP16: 65, FP32: 8.1}),
    (r"P100.*PCIE", "P100 PCIe", {FP16: 18.7, FP32: 9.3}),
    (r"P100", "P100 SXM2", {FP16: 21.2, FP32: 10.6}),
)


def datasheet_peak(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """The datasheet's dense FLOP/s of the first DATASHEETS entry matching `device_name` in `dtype`; None for a
    device or dtype the table does not know."""
    for pattern, _, peaks in DATASHEETS:
        if re.search(pattern, device_name):
            return peaks[dtype] * TERA if dtype in peaks else None
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"the CPU ({platform.machine()})"


def convolution_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """The input gradient and the weight gradient, each as many FLOPs as the forward (groups included)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: convolution_backward_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}


def counted_flops(step: Callable[[], object]) -> int:
    """The FLOPs that running `step` once performs (FlopCounterMode's count, with FLOP_FORMULAS)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        step()
    return counter.get_total_flops()


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of a training step, per image."""
    forward: float  # one forward pass
    passes: int  # forward-backward passes a step: 2 under SAM
    hardware: float  # counted on the trainer's step: recompute included

    @property
    def model(self) -> float:
        return 3 * self.forward * self.passes


def step_flops(run: Training, batch: int = 2) -> StepFlops:
    """Model and hardware FLOPs of the trainer's step per image, counted on a FakeTensor copy of `run` with a batch
    of random images at the config's input size."""
    size = run.cfg.input.img_size
    with fake_training(run) as fake:
        images = torch.randn(batch, 3, size, size, device=run.device)
        labels = torch.zeros(batch, dtype=torch.long, device=run.device)
        with torch.no_grad():
            forward = counted_flops(lambda: fake.model(images))
        hardware = counted_flops(lambda: train_step(fake, images, labels))
    return StepFlops(forward / batch, 2 if isinstance(run.optimizer, SAM) else 1, hardware / batch)


def measured_peak(device: torch.device, dtype: torch.dtype, side: int | None = None,
                  repeats: int | None = None) -> float:
    """FLOP/s of a dense side x side matmul in `dtype` on `device`, the best of a few timed rounds."""
    side = side or (8192 if device.type == "cuda" else 1024)
    repeats = repeats or (20 if device.type == "cuda" else 5)
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * side ** 3 * repeats / best


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s in a dtype: the datasheet's (None when the table does not know the device) and the one
    measured here."""
    device: str
    dtype: torch.dtype
    datasheet: Optional[float]
    measured: float

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def line(self) -> str:
        sheet = (f"datasheet {self.datasheet / TERA:.4g} TFLOP/s dense" if self.datasheet is not None
                 else "no datasheet figure in src/tools/flops.py")
        return f"{self.device}, {self.dtype_name}: {sheet}; measured {self.measured / TERA:.3g} TFLOP/s (square matmul)"


def utilisation(images_per_s: float, flops: StepFlops, peak: Peak) -> str:
    """MFU and HFU of a measured rate against the datasheet's peak, and the share of the measured matmul; without a
    datasheet figure only the share of the measured matmul, labelled as not MFU."""
    model, hardware = images_per_s * flops.model, images_per_s * flops.hardware
    achieved = f"{model / TERA:.3g} TFLOP/s of model FLOPs"
    measured = f"{100 * model / peak.measured:.1f}% of the measured {peak.dtype_name} matmul"
    if peak.datasheet is None:
        return (f"{achieved}, {measured} (no datasheet peak: not MFU); hardware FLOPs "
                f"{100 * hardware / peak.measured:.1f}% of it")
    return (f"MFU {100 * model / peak.datasheet:.1f}% ({achieved} over the datasheet's {peak.datasheet / TERA:.4g} "
            f"dense {peak.dtype_name}), HFU {100 * hardware / peak.datasheet:.1f}%; {measured}")
