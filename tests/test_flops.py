"""FLOP counts against a count by hand, the trainer's step per image, and the share of the peak."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.tools.flops import counted_flops, flops_per_training_image, peak_flops, utilisation
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


def test_the_trainers_step_is_counted_per_image_and_twice_under_sam(tiny_root):
    """The trainer's own step on EfficientNet-Lite0 at 64 px: the count per image does not depend on the batch, and
    SAM's two forward-backward passes a step count twice."""
    data = load_competition_data(tiny_root, log=lambda _: None)

    def per_image(name: str, batch: int) -> float:
        cfg, _ = resolve_config(name, "demo", ["model.pretrained=false", "input.img_size=64", "train.batch_size=4"])
        run = build_training(resolved(cfg, data), data.train, len(data.classes), torch.device("cpu"))
        return flops_per_training_image(run, batch=batch)

    plain = per_image("exp05", 2)
    assert plain == pytest.approx(per_image("exp05", 4), rel=1e-9) and plain > 1e7
    assert per_image("exp10", 2) == pytest.approx(2 * plain, rel=1e-9)


def test_the_peak_is_a_positive_rate_and_the_utilisation_its_share():
    peak = peak_flops(torch.device("cpu"), torch.float32, side=128, repeats=2)
    assert peak > 0
    assert utilisation(10.0, 1e9, 1e11) == "0.01 TFLOP/s, 10.0% of the device's peak (MFU)"
