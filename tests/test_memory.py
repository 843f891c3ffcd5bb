"""The training-memory estimate: bytes alive counted as by hand, the FakeTensor estimate of a ViT's step against what
the CPU allocator allocates (with gradient checkpointing and without), the peak that moves with the batch, and the
batch that fits a GPU's reported capacity."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.tools.memory import (GIB, HEADROOM, Gpu, LiveBytes, MemoryEstimate, estimate, estimating_config, table)
from src.training.loop import build_training, train_step

from .conftest import resolved


def test_live_bytes_count_each_storage_from_the_operation_that_makes_or_reads_it_until_it_is_freed():
    """A view adds nothing, a storage stops counting when its last reference goes, a tensor made outside counts from
    the first operation that reads it."""
    outside = torch.ones(250)
    live = LiveBytes()
    with live:
        a = torch.ones(1000)
        assert live.bytes == 4000
        view = a[:500]
        assert live.bytes == 4000
        b = a * 2
        assert live.bytes == 8000
        del a
        assert live.bytes == 8000  # the view still holds a's storage
        del view
        assert live.bytes == 4000
        total = b + outside[0]
        assert live.bytes == 4000 + 1000 + 4000  # b, outside (outside[0] is a view of it), the sum
    assert max(live.timeline) == live.bytes == 9000 and total.shape == (1000,)


def allocator_peak(step) -> int:
    """The highest the CPU allocator's count rises above where it stood when `step` starts (torch.profiler's memory
    events, in order). `step` may free only what it allocated: the profiler does not see frees of older blocks."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def resident_bytes(run, *tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages the trainer keeps: weights and buffers, the EMA's, the optimiser's state, and
    `tensors`."""
    kept = [*run.model.parameters(), *run.model.buffers(), *tensors,
            *(t for state in run.optimizer.state.values() for t in state.values() if torch.is_tensor(t))]
    if run.ema is not None:
        kept += [*run.ema.module.parameters(), *run.ema.module.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.values())


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_estimate_of_a_vits_step_matches_what_the_cpu_allocator_allocates(tiny_root, checkpointing):
    """EVA-02-Ti (random weights) at 224 px in exp22's recipe (AdamW, EMA, bfloat16 autocast on the CPU): the
    FakeTensor estimate from probes at batch 2 and 4, at batch 8, against a real second step on the CPU, the bytes
    the trainer keeps plus the allocator's peak above them. With checkpointing the peak includes the recomputed
    block's tensors, which a count of what autograd saves missed (it said 2.8 MiB an image; at a large batch the step
    holds 5.9, without checkpointing 28.4)."""
    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg, _ = resolve_config("exp22", None, ["model.pretrained=false", "model.backbone=eva02_tiny_patch14_224",
                                            "input.img_size=224", f"speed.grad_checkpointing={checkpointing}",
                                            "train.num_workers=0"])
    cpu = torch.device("cpu")
    run = build_training(estimating_config(resolved(cfg, data), cpu), data.train, len(data.classes), cpu)
    assert run.cfg.train.amp_dtype == "bfloat16" and run.ema is not None
    estimated = estimate(run)
    batch = 8
    images, labels = torch.randn(batch, 3, 224, 224), torch.zeros(batch, dtype=torch.long)
    train_step(run, images, labels)  # the first step makes AdamW's moments
    run.optimizer.zero_grad(set_to_none=True)  # frees what the profiler could not see freed
    kept = resident_bytes(run, images, labels)
    allocated = allocator_peak(lambda: train_step(run, images, labels))
    assert estimated.training_bytes(batch) - kept == pytest.approx(allocated, rel=0.02)
    assert estimated.peak(64)[1] / 2 ** 20 == pytest.approx(5.9 if checkpointing else 28.4, abs=0.1)  # MiB an image


def test_the_peak_is_the_highest_moment_at_each_batch_not_one_line_through_two_peaks():
    """Three moments whose bytes at batch 2 and 4 are (10, 12), (30, 32), (25, 45): lines 8 + 1 b, 28 + 1 b and
    5 + 10 b. At batch 10 the peak is the third, 105, where a line through the two probes' peaks (30, 45) says 90."""
    estimated = MemoryEstimate.from_probes((2, 4), ([10, 30, 25], [12, 32, 45]), "bfloat16")
    assert set(estimated.moments) == {(28.0, 1.0), (5.0, 10.0)}  # 8 + 1 b is below 28 + 1 b everywhere
    assert estimated.between_steps == (8.0, 1.0)
    assert estimated.training_bytes(2) == 30 and estimated.training_bytes(10) == 105
    assert estimated.largest_batch(100 / HEADROOM) == 9  # 28 + 9 and 5 + 90 fit 100; 5 + 100 does not
    assert estimated.largest_batch(100 / HEADROOM, multiple=2) == 8
    assert estimated.largest_batch(20 / HEADROOM) == 0  # 28 does not fit at any batch
    with pytest.raises(RuntimeError, match="the same ones"):
        MemoryEstimate.from_probes((2, 4), ([10, 30], [12, 32, 45]), "bfloat16")


def test_the_batch_that_fits_is_computed_from_the_capacity_torch_reports_not_the_label():
    """A T4 sold as "16 GB" reports 14.56 GiB: 2 GiB fixed and 0.5 GiB an image fit 20 images in 85% of it
    (a "16 GB" taken as 16 GiB would say 23)."""
    t4 = Gpu("16 GB", "T4", 14.56)
    estimated = MemoryEstimate(((2 * GIB, 0.5 * GIB),), (GIB, 0.0), "bfloat16")
    assert t4.bytes == 14.56 * GIB
    assert estimated.largest_batch(t4.bytes) == int((14.56 * HEADROOM - 2) / 0.5) == 20
    rows = table(estimated, batch=8, gpus=(t4,))
    assert rows[0].startswith("estimated training memory (bfloat16 autocast") and "6.00 GiB at batch 8" in rows[0]
    assert rows[-1] == "| 16 GB (T4) | 14.56 GiB | 20 |"


def test_with_gradient_accumulation_the_table_gives_the_batch_as_micro_batches():
    """train.accumulate_steps 2: the batch that fits is two micro-batches (a multiple of 2), and the line says the
    activations are a micro-batch's."""
    t4 = Gpu("16 GB", "T4", 14.56)
    estimated = MemoryEstimate(((2 * GIB, 0.5 * GIB),), (GIB, 0.0), "bfloat16")
    rows = table(estimated, batch=8, multiple=2, gpus=(t4,), accumulate_steps=2)
    assert "at batch 8 (2 micro-batches of 4: the activations, and BatchNorm, are a micro-batch's)" in rows[0]
    assert rows[-1] == "| 16 GB (T4) | 14.56 GiB | 20 (2 x 10) |"
