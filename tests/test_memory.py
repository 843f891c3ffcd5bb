"""The training-memory estimate: saved activations counted against a count by hand, and the batch that fits."""
from __future__ import annotations

import torch
from torch import nn

from src.tools.memory import GIB, HEADROOM, MemoryEstimate, saved_bytes


def test_the_tensors_kept_for_the_backward_pass_count_as_by_hand():
    """Linear 64 -> 32, ReLU, Linear 32 -> 10 on 8 images in float32: the first layer keeps its input (for its weight
    gradient), the ReLU its output, which is also the second layer's input (one storage, counted once); the weights
    are state, not activations."""
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(8, 64)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    assert saved_bytes(lambda: net(x).sum().backward(), weights) == 8 * 64 * 4 + 8 * 32 * 4
    assert saved_bytes(lambda: net(x).sum().backward(), set()) > 8 * 64 * 4 + 8 * 32 * 4  # with the weights


def test_the_largest_batch_leaves_the_headroom():
    estimate = MemoryEstimate(state_bytes=2 * GIB, per_image_bytes=0.5 * GIB)
    assert estimate.training_bytes(4) == 4 * GIB
    assert estimate.largest_batch(16) == int((16 * HEADROOM - 2) / 0.5)
    assert estimate.largest_batch(16, multiple=4) == int((16 * HEADROOM - 2) / 0.5) // 4 * 4
    assert MemoryEstimate(20 * GIB, GIB).largest_batch(16) == 0
