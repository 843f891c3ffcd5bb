"""FLOP counts against counts by hand (attention on the CPU included), model against hardware FLOPs of the trainer's
step, the datasheet peaks and MFU's arithmetic."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.tools.flops import (FLOP_FORMULAS, Peak, StepFlops, counted_flops, datasheet_peak, measured_peak, step_flops,
                             utilisation)
from src.training.loop import build_training

from .conftest import resolved


def test_a_two_layer_perceptron_counts_as_by_hand():
    """Linear 64 -> 32 -> 10 on a batch of 8: forward 2·B·(64·32 + 32·10); backward, the weight gradients of both
    layers (the same again) and the input gradient of the second layer only (the images need no gradient)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, batch = torch.randn(8, 64), 8
    first, second = 2 * batch * 64 * 32, 2 * batch * 32 * 10
    assert counted_flops(lambda: net(x)) == first + second
    assert counted_flops(lambda: net(x).sum().backward()) == (first + second) + (first + second) + second


def test_a_small_conv_net_counts_as_by_hand():
    """Conv 3 -> 8 (3x3, padding 1) then conv 8 -> 4 (3x3, padding 1) on 16x16 images: each is 2·H·W·Cout·Cin·9
    FLOPs an image forward; backward, both weight gradients and the second layer's input gradient."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    first, second = 2 * 2 * 16 * 16 * 8 * 3 * 9, 2 * 2 * 16 * 16 * 4 * 8 * 9
    assert counted_flops(lambda: net(x)) == first + second
    assert counted_flops(lambda: net(x).sum().backward()) == 2 * (first + second) + second


def test_a_depthwise_conv_counts_its_groups_forward_and_backward():
    """Depthwise 3x3 over 64 channels (groups 64), then a pointwise 64 -> 32, on 16x16 images, batch 2: forward
    2·B·H·W·Cout·(Cin/groups)·9 and 2·B·H·W·32·64; backward, both weight gradients and the pointwise layer's input
    gradient, each the forward's count (torch's own formula counts the depthwise weight gradient 64 times)."""
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.Conv2d(64, 32, 1, bias=False))
    x = torch.randn(2, 64, 16, 16)
    depthwise, pointwise = 2 * 2 * 16 * 16 * 64 * 1 * 9, 2 * 2 * 16 * 16 * 32 * 64
    assert counted_flops(lambda: net(x)) == depthwise + pointwise
    assert counted_flops(lambda: net(x).sum().backward()) == 2 * (depthwise + pointwise) + pointwise


def test_attention_on_the_cpu_counts_as_by_hand():
    """scaled_dot_product_attention on the CPU (its flash kernel), batch 2, 3 heads, 5 tokens of 4: forward Q·Kᵀ and
    A·V, 2·(2·B·H·L·L·D); backward, torch's formula for the GPU's kernels: the scores again, then four products."""
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    product = 2 * 2 * 3 * 5 * 5 * 4
    assert counted_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * product
    assert counted_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 2 * product + 5 * product


def test_a_vit_forward_counts_as_by_hand():
    """A ViT of 32x32 images in 8x8 patches (16 patches and a class token: T = 17), width 32, 2 blocks of 2 heads,
    MLP ratio 4, 10 classes, batch 2. An image: the patch embedding 2·16·32·(3·8·8); each block qkv 2·T·D·3D,
    attention Q·Kᵀ and A·V 2·2·T·T·D (all heads), the projection 2·T·D·D, the MLP 2·2·T·D·4D; the head on the class
    token 2·D·10."""
    torch.manual_seed(0)
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                            num_classes=10)
    tokens, width = 17, 32
    block = (2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
             + 2 * 2 * tokens * width * 4 * width)
    image = 2 * 16 * width * 3 * 8 * 8 + 2 * block + 2 * width * 10
    with torch.no_grad():
        assert counted_flops(lambda: net(torch.randn(2, 3, 32, 32))) == 2 * image


def block_forward_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs of the backbone's blocks in one forward pass, from FlopCounterMode's count by module."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(images)
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if name.rsplit(".", 2)[-2:-1] == ["blocks"])


def test_model_flops_leave_out_checkpointings_recompute_and_hardware_flops_count_it(tiny_root):
    """EVA-02-Ti in exp22's recipe at 56 px (16 patches and a class token: T = 17, width 192, SwiGLU hidden 512), no
    drop path, the trainer's step with and without gradient checkpointing: model FLOPs are 3 x the forward either way.
    Hardware FLOPs grow by the blocks' forward, which the backward pass recomputes, less each block's last
    projection, 2·T·512·192 an image: torch's checkpoint stops recomputing once it has every tensor the backward pass
    needs, and that projection's output is not one of them."""
    data = load_competition_data(tiny_root, log=lambda _: None)

    def flops(checkpointing: bool) -> tuple[StepFlops, int]:
        cfg, _ = resolve_config("exp22", None, ["model.pretrained=false", "model.backbone=eva02_tiny_patch14_224",
                                                "input.img_size=56", f"speed.grad_checkpointing={checkpointing}",
                                                "model.drop_path_rate=0", "train.batch_size=4", "train.num_workers=0"])
        run = build_training(resolved(cfg, data), data.train, len(data.classes), torch.device("cpu"))
        return step_flops(run, batch=2), block_forward_flops(run.model, torch.randn(2, 3, 56, 56)) // 2

    plain, blocks = flops(False)
    checkpointed, _ = flops(True)
    assert checkpointed.model == plain.model == 3 * plain.forward and plain.passes == 1
    assert checkpointed.hardware - plain.hardware == blocks - 12 * 2 * 17 * 512 * 192
    assert checkpointed.hardware > 1.2 * checkpointed.model
    assert plain.hardware == pytest.approx(plain.model, rel=0.02)  # no recompute: the 3 x convention holds


def test_the_trainers_step_is_counted_per_image_and_twice_under_sam(tiny_root):
    """The trainer's own step on EfficientNet-Lite0 at 64 px: the counts per image do not depend on the batch, and
    SAM's two forward-backward passes a step count twice, in model and in hardware FLOPs."""
    data = load_competition_data(tiny_root, log=lambda _: None)

    def per_image(name: str, batch: int) -> StepFlops:
        cfg, _ = resolve_config(name, "demo", ["model.pretrained=false", "input.img_size=64", "train.batch_size=4"])
        run = build_training(resolved(cfg, data), data.train, len(data.classes), torch.device("cpu"))
        return step_flops(run, batch=batch)

    plain, larger = per_image("exp05", 2), per_image("exp05", 4)
    assert (larger.forward, larger.hardware) == pytest.approx((plain.forward, plain.hardware), rel=1e-9)
    assert plain.hardware > 1e7
    sam = per_image("exp10", 2)
    assert sam.passes == 2 and sam.model == 2 * plain.model
    assert sam.hardware == pytest.approx(2 * plain.hardware, rel=1e-9)


def test_the_datasheet_peaks_are_matched_on_the_device_name():
    tera = 1e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989 * tera
    assert datasheet_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756 * tera
    assert datasheet_peak("NVIDIA H200", torch.float32) == 67 * tera
    assert datasheet_peak("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5 * tera
    assert datasheet_peak("NVIDIA A100 80GB PCIe", torch.bfloat16) == 312 * tera
    assert datasheet_peak("NVIDIA L4", torch.bfloat16) == 121 * tera
    assert datasheet_peak("NVIDIA L40S", torch.bfloat16) == 362 * tera
    assert datasheet_peak("NVIDIA A10", torch.float16) == 125 * tera
    assert datasheet_peak("Tesla T4", torch.float16) == 65 * tera
    assert datasheet_peak("Tesla V100S-PCIE-32GB", torch.float16) == 130 * tera
    assert datasheet_peak("Tesla P100-PCIE-16GB", torch.float32) == 9.3 * tera
    for unknown in ("NVIDIA A10G", "NVIDIA H100 NVL", "NVIDIA L40", "the CPU (x86_64)"):
        assert datasheet_peak(unknown, torch.bfloat16) is None, unknown
    assert datasheet_peak("Tesla T4", torch.bfloat16) is None  # no bfloat16 tensor cores


def test_mfu_is_model_flops_over_the_datasheet_peak_and_without_one_is_not_called_mfu():
    """100 images/s of 1 GFLOP forward (3 GFLOP model, 4 GFLOP hardware a training image): 0.3 TFLOP/s of model
    FLOPs, 30% of a 1 TFLOP/s datasheet peak, 40% in hardware FLOPs, 60% of a measured 0.5 TFLOP/s."""
    flops = StepFlops(forward=1e9, passes=1, hardware=4e9)
    assert flops.model == 3e9 and StepFlops(1e9, 2, 8e9).model == 6e9
    known = Peak("NVIDIA H100 80GB HBM3", torch.bfloat16, datasheet=1e12, measured=5e11)
    assert utilisation(100, flops, known) == ("MFU 30.0% (0.3 TFLOP/s of model FLOPs over the datasheet's 1 dense "
                                              "bfloat16), HFU 40.0%; 60.0% of the measured bfloat16 matmul")
    unknown = Peak("the CPU (x86_64)", torch.float32, datasheet=None, measured=5e11)
    assert utilisation(100, flops, unknown) == ("0.3 TFLOP/s of model FLOPs, 60.0% of the measured float32 matmul "
                                                "(no datasheet peak: not MFU); hardware FLOPs 80.0% of it")
    assert measured_peak(torch.device("cpu"), torch.float32, side=128, repeats=2) > 0
