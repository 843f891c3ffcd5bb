"""The training-memory estimate: bytes alive counted as by hand, the FakeTensor estimate of a ViT's step against what
the CPU allocator allocates (with gradient checkpointing and without), the peak that moves with the batch, the
batch that fits a GPU's reported capacity, and CUDA's casting rules and attention kernels on the CPU."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.tools.cuda_rules import cuda_rules
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
    estimated = estimate(run, cuda=False)  # what the CPU itself allocates, under its own autocast and kernels
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


# --- CUDA's rules on the CPU (src/tools/cuda_rules.py) ------------------------------------------------------------

class OpDtypes(TorchDispatchMode):
    """The name and output dtype of every operation that makes a tensor, but copies (where autocast's casts land
    differs by device) and in-place restrides (the CPU's mean restrides its output)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and func.__name__ not in ("_to_copy.default", "detach.default") \
                and torch.Tag.inplace_view not in func.tags:
            self.ops.append((func.__name__, first.dtype))
        return out


class ToFakeDevice(FakeCopyMode):
    """deepcopy under this mode makes FakeTensors on `device` (FakeCopyMode keeps the source's device)."""

    def __init__(self, mode: FakeTensorMode, device: torch.device):
        super().__init__(mode)
        self.device = device

    def fake(self, tensor: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        return self.fake_mode.fake_tensor_converter.from_meta_and_device(self.fake_mode, meta, self.device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch._C.TensorBase.clone:
            return func(self.fake(args[0]), **(kwargs or {}))
        if func is torch.Tensor.__deepcopy__:
            tensor, memo = args
            memo.setdefault(id(tensor), self.fake(tensor).requires_grad_(tensor.requires_grad))
            return memo[id(tensor)]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def autocast_on(device_type: str):
    """bfloat16 autocast on `device_type`, set directly: torch.autocast refuses "cuda" on a machine without one."""
    before = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, before[0])
        torch.set_autocast_dtype(device_type, before[1])
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


def forward_ops(model: torch.nn.Module, device: str, rules) -> list[tuple[str, torch.dtype]]:
    mode = FakeTensorMode()
    with ToFakeDevice(mode, torch.device(device)):
        fake = copy.deepcopy(model)
    recorded = OpDtypes()
    with mode, autocast_on(device), rules(), recorded:
        fake(torch.empty(2, 3, 64, 64, device=device))
    return recorded.ops


SMALL = {"vit_tiny_patch16_224": dict(img_size=64), "eva02_tiny_patch14_224": dict(img_size=64), "convnext_atto": {},
         "tiny_vit_5m_224": dict(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                 window_sizes=(2, 2, 2, 2))}


@pytest.mark.parametrize("backbone", sorted(SMALL))
def test_on_the_cpu_every_operation_of_a_forward_computes_in_the_dtype_cuda_autocast_gives_it(backbone, monkeypatch):
    """The forward pass on FakeTensors of the GPU under CUDA's own autocast (a forward needs no GPU; only the backward
    pass does) against the same forward on the CPU under CUDA's rules: operation by operation the same output dtypes,
    where the CPU's own autocast differs (layer norm, softmax in bfloat16). Attention is unfused here, since without a
    GPU a CUDA FakeTensor cannot pick its kernel; test_attention_takes_the_kernel_a_gpu_picks covers that."""
    import timm
    import timm.layers

    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    model = timm.create_model(backbone, pretrained=False, num_classes=5, **SMALL[backbone])
    cuda = forward_ops(model, "cuda", contextlib.nullcontext)
    assert forward_ops(model, "cpu", cuda_rules) == cuda
    own = forward_ops(model, "cpu", contextlib.nullcontext)
    assert own != cuda  # the CPU's own autocast computes some of them in another dtype


def test_attention_takes_the_kernel_a_gpu_picks():
    """Flash attention without a mask, the memory-efficient kernel with one (TinyViT's learnable biases), where the
    CPU runs its flash kernel and, with a mask, the math kernel that keeps every attention matrix for the backward."""
    with FakeTensorMode():
        query = torch.empty(2, 4, 49, 32, requires_grad=True)
        bias = torch.empty(4, 49, 49, requires_grad=True)
        for mask, kernel in ((None, "_scaled_dot_product_flash_attention.default"),
                             (bias, "_scaled_dot_product_efficient_attention.default")):
            recorded = OpDtypes()
            with torch.autocast("cpu", dtype=torch.bfloat16), cuda_rules(), recorded:
                out = F.scaled_dot_product_attention(query, query, query, attn_mask=mask)
            assert kernel in [name for name, _ in recorded.ops] and out.shape == (2, 4, 49, 32)
            assert out.dtype == torch.bfloat16
            out.sum().backward()
        assert bias.grad.shape == bias.shape


@pytest.mark.slow
def test_the_cpu_estimate_of_exp07_is_what_the_estimator_gave_on_an_h200(tiny_root):
    """Run on an H200 (torch 2.11, FACTS.md) the estimator put exp07 at 3.83 GiB at batch 16 (3.97 measured) and its
    largest batch on 139.8 GiB at 543 (118.97 GiB measured there); the CPU, under its own rules, said 5.75 and 348."""
    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg, _ = resolve_config("exp07", None, ["model.pretrained=false", "train.num_workers=0"])
    cpu = torch.device("cpu")
    run = build_training(estimating_config(resolved(cfg, data), cpu), data.train, len(data.classes), cpu)
    estimated = estimate(run)
    assert estimated.training_bytes(16) / GIB == pytest.approx(3.83, abs=0.005)
    assert estimated.largest_batch(139.8 * GIB) == 543
