"""The compiled step, walked on the CPU with dynamo's eager backend (CUDA graphs themselves need a GPU): static shapes,
so a fold compiles its training graph and its prediction graph once and nothing recompiles over epochs, validation
and the test pass (prediction batches padded to one size); the CUDA-graph wrapper that marks every call a step; the
compile time in the fold's log; and progress lines in a log that is not a terminal."""
from __future__ import annotations

import functools
import re

import pytest
import torch

from src.core.config import resolve_config
from src.core.distributed import SINGLE_PROCESS
from src.core.progress import StepProgress
from src.inference.probabilities import padded
from src.model import prepare

from .conftest import TINY_RUN, run_cli


def test_auto_compiles_with_cuda_graphs_in_one_process_on_cuda_and_without_under_ddp():
    cfg, _ = resolve_config("exp07", None)
    ddp = type("Ctx", (), {"enabled": True})()
    assert prepare.compile_mode(cfg, torch.device("cuda"), SINGLE_PROCESS) == "reduce-overhead"
    assert prepare.compile_mode(cfg, torch.device("cuda"), ddp) == "default"
    assert prepare.compile_mode(cfg, torch.device("cpu"), SINGLE_PROCESS) == "default"
    chosen = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"compile_mode": "max-autotune"})})
    assert prepare.compile_mode(chosen, torch.device("cuda"), ddp) == "max-autotune"


def test_a_cuda_graph_model_marks_every_call_a_new_step_and_hands_out_copies(monkeypatch):
    """Each call starts a step of CUDA graph trees, and what a call returns survives the next call, whose replay
    writes its outputs into the same memory (as TTA's second view would overwrite the first's logits)."""

    class Replays(torch.nn.Module):  # a CUDA graph's outputs: one buffer that every replay overwrites
        def __init__(self):
            super().__init__()
            self.out = torch.zeros(3)

        def forward(self, x):
            return self.out.copy_(x)

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(torch, "compile", lambda model, mode, dynamic: Replays())
    wrapped = prepare.compile_model(torch.nn.Linear(3, 3), "reduce-overhead")
    assert isinstance(wrapped, prepare.GraphSteps) and prepare.is_compiled(wrapped)
    first = wrapped(torch.ones(3))
    second = wrapped(torch.full((3,), 2.0))
    assert torch.equal(first, torch.ones(3)) and torch.equal(second, torch.full((3,), 2.0)) and len(marks) == 2
    assert not isinstance(prepare.compile_model(torch.nn.Linear(3, 3), "default"), prepare.GraphSteps)


def test_a_short_batch_is_padded_with_zero_images_in_its_memory_layout():
    images = torch.rand(3, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    full = padded(images, 8)
    assert full.shape == (8, 3, 4, 5) and torch.equal(full[:3], images) and not full[3:].any()
    assert full.is_contiguous(memory_format=torch.channels_last)
    assert padded(images, None) is images and padded(images, 3) is images


@pytest.mark.slow
def test_compiled_folds_compile_in_their_first_epoch_and_never_again(tiny_root, tmp_path, monkeypatch, capsys):
    """exp19 (crop-mimic, EMA) with a TinyViT stand-in, compiled as on a GPU with CUDA graphs for training (the
    wrapper runs; the graphs themselves need CUDA) and without for prediction, two folds of 2 epochs whose validation
    and test passes end in short batches:
    dynamo compiles the training model, the evaluation model and the EMA's in fold 0's first epoch (its first step
    and its first validation); fold 0's second epoch, its test pass and all of fold 1 compile nothing."""
    import timm

    from src.model import networks

    graphs, modes = [], []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    real_compile = torch.compile
    from src.inference import predictor

    for module in (prepare, predictor):  # compile on the CPU, as on CUDA
        monkeypatch.setattr(module, "compiles", lambda cfg, device: cfg.speed.compile)
    monkeypatch.setattr(torch, "compile", lambda model, mode, dynamic: modes.append((mode, dynamic)) or
                        real_compile(model, backend=counting_backend, dynamic=dynamic))
    monkeypatch.setattr(networks, "build_backbone", lambda cfg, img_size=None: timm.create_model(
        "tiny_vit_5m_224", pretrained=False, num_classes=0, embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2), window_sizes=(2, 2, 2, 2)))
    torch._dynamo.reset()
    epochs_seen = []
    monkeypatch.setattr("src.training.fold.train_one_epoch", functools.partial(
        lambda real, run, epoch, desc: epochs_seen.append(len(graphs)) or real(run, epoch, desc),
        __import__("src.training.loop", fromlist=["train_one_epoch"]).train_one_epoch))
    assert run_cli("run", "exp19", "--data", tiny_root, "--outputs", tmp_path / "out", "--submissions", tmp_path / "s",
                   *TINY_RUN, "input.img_size=64", "train.epochs=2", "train.folds=[0,1]", "train.ema_decay=0.5",
                   "inference.batch_size=12", "speed.compile=true", "speed.compile_mode=reduce-overhead") == 0
    torch._dynamo.reset()
    assert set(modes) == {("reduce-overhead", False), ("default", False)}  # prediction: no CUDA graphs
    assert len(epochs_seen) == 4 and 0 < epochs_seen[1] == epochs_seen[3] == len(graphs), epochs_seen
    log = capsys.readouterr().out
    assert re.search(r"exp19 fold 0: compiled: the first training step took [\d.]+s, the first prediction pass "
                     r"[\d.]+s", log)


@pytest.mark.slow
def test_a_run_whose_stderr_is_not_a_terminal_logs_progress_lines(tiny_root, tmp_path, capsys):
    """Under pytest's capture stderr is not a terminal, as under nohup, SLURM or a notebook: the epoch and the
    prediction passes print a line to the log (stdout) after their first step and then every
    tracking.progress_seconds; stderr stays for errors."""
    assert run_cli("run", "exp00", "--data", tiny_root, "--outputs", tmp_path / "out", "--submissions",
                   tmp_path / "s", *TINY_RUN, "train.folds=[0]", "tracking.progress_seconds=1e-9") == 0
    captured = capsys.readouterr()
    log = captured.out
    assert "images/s" not in captured.err
    steps = re.findall(r"exp00 fold 0 epoch 1: step (\d+)/(\d+), ([\d,.]+) images/s, input pipeline (\d+)% of the "
                       r"time, \d+s", log)
    assert [int(step) for step, _, _, _ in steps] == list(range(1, int(steps[0][1]) + 1))
    assert all(float(rate.replace(",", "")) > 0 and 0 <= int(share) <= 100 for _, _, rate, share in steps)
    assert re.search(r"exp00 fold 0 validate: step 1/\d+, [\d,.]+ images/s", log)
    assert re.search(r"exp00 fold 0 test: step 1/\d+", log)


def test_progress_lines_come_every_so_many_seconds_and_a_terminal_gets_a_bar_instead(monkeypatch):
    import io

    from types import SimpleNamespace

    from src.core import progress as module

    clock = iter([0.0, 0.5, 1.0, 1.5, 20.0, 20.5, 31.0, 40.0])
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    stream = io.StringIO()
    progress = StepProgress(total=6, desc="epoch 1", every_s=10, terminal=io.StringIO(), log=stream)
    for waited in (0.25, 0.25, 0.25, 5.0, 5.0):
        progress.update(32, waited)
    progress.note(loss="1.2345")
    progress.update(32, 5.0)
    assert stream.getvalue().splitlines() == [
        "epoch 1: step 1/6, 64.0 images/s, input pipeline 50% of the time, 0s",
        "epoch 1: step 4/6, 6.4 images/s, input pipeline 25% of the time, 20s",
        "epoch 1: step 6/6, 6.2 images/s, input pipeline 16% of the time, 31s, loss 1.2345"]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    bar = StepProgress(total=2, desc="epoch 1", every_s=10, terminal=terminal, log=log)
    bar.update(32, 0.0)
    bar.close()
    assert bar.bar is not None and "epoch 1" in terminal.getvalue() and not log.getvalue()


@pytest.mark.slow
def test_bench_gives_the_compiled_steps_gain_and_compile_seconds(tiny_root, monkeypatch):
    """bench's rows that only a GPU fills, walked on the CPU (dynamo's eager backend): the compiled step beside the
    same switches eager with its compile seconds, and the compiled prediction's, which the projection adds."""
    from src.data.competition import load_competition_data
    from src.inference import predictor
    from src.tools import bench

    from .conftest import resolved

    for module in (prepare, predictor, bench):
        monkeypatch.setattr(module, "compiles", lambda cfg, device: cfg.speed.compile)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode, dynamic: real_compile(model, backend="eager",
                                                                                    dynamic=dynamic))
    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg = resolved(resolve_config("exp07", "demo", ["input.img_size=32", "train.batch_size=4", "inference.batch_size=4",
                                                    "speed.compile=true"])[0], data)
    measured = bench.Bench(cfg, data, n_images=8, steps=2, warmup=1, workers=0, log=lambda _: None)
    measured.cuda_only = ""  # the switch rows, as on a GPU
    measured.model_ceiling()
    measured.inference()
    rows = {figure.setting: figure for figure in measured.figures}
    assert re.match(r"\d+\.\d\dx the same switches eager; compiled \(default\) in \d+s, the first step; ",
                    rows["all + torch.compile"].note)
    assert rows["all + torch.compile"].images_per_s > 0
    assert re.search(r"compiled in \d+s \(the first batch\)", rows["no TTA"].note)
    assert measured.rates["predict"] > 0 and measured.rates["predict_compile"] > 0
