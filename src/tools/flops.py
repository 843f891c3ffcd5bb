"""How far a run is from what the hardware can do: the FLOPs of one training image, the device's peak measured on
the spot, and the model FLOP utilisation (MFU) of a measured images/s.

FLOPs are counted by torch's FlopCounterMode on the trainer's own step (`train_step`: forward and backward, both
passes of SAM) with the real model at the real input size: matrix products, convolutions and attention, the work a
GPU's tensor cores do. Elementwise work is not counted, as in every published MFU figure. The peak is a dense
square matmul in the run's compute dtype (bfloat16 or float16 on GPUs, float32 on the CPU), timed here.

torch 2.14's formula for a convolution's backward counts the weight gradient of a grouped convolution as if it had
one group: a depthwise 3x3 over 64 channels comes out at 65 times its forward instead of 2, which made
EfficientNet's count 40 times its forward. Here each gradient a convolution's backward computes costs exactly its
forward's multiply-adds, which is what both of them are.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from ..core.runtime import autocast_dtype, synchronize
from ..training.loop import Training, train_step


def convolution_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """The input gradient and the weight gradient, each as many FLOPs as the forward (groups included)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def counted_flops(step: Callable[[], object]) -> int:
    """The FLOPs that running `step` once performs (FlopCounterMode's count, with convolution_backward_flops)."""
    mapping = {torch.ops.aten.convolution_backward: convolution_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


def flops_per_training_image(run: Training, batch: int = 2) -> float:
    """FLOPs of the trainer's step per image, counted on the eager model (a compiled or DDP-wrapped one cannot be
    traced) with a batch of random images at the config's input size. It takes an optimiser step on `run`: use a
    Training made for measuring."""
    size = run.cfg.input.img_size
    images = torch.randn(batch, 3, size, size, device=run.device)
    labels = torch.randint(0, run.model.head[-1].out_features, (batch,), device=run.device)
    eager = run.train_model
    run.train_model = run.model
    try:
        return counted_flops(lambda: train_step(run, images, labels)) / batch
    finally:
        run.train_model = eager


def peak_flops(device: torch.device, dtype: torch.dtype, side: int | None = None, repeats: int | None = None) -> float:
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


def compute_dtype(run: Training) -> torch.dtype:
    """The dtype the run's matmuls compute in: its autocast dtype, float32 without autocast."""
    return autocast_dtype(run.cfg.train.amp, run.cfg.train.amp_dtype, run.device) or torch.float32


def utilisation(images_per_s: float, flops_per_image: float, peak: float) -> str:
    """'X TFLOP/s, Y% of the peak' for a measured rate."""
    achieved = images_per_s * flops_per_image
    return f"{achieved / 1e12:.3g} TFLOP/s, {100 * achieved / peak:.1f}% of the device's peak (MFU)"
