"""The path GPU users take, walked on the CPU: DataLoader workers, autocast, TinyViT, SyncBatchNorm, the loop
that does not wait for the device every step, and the GPU acceptance command."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.core.layout import FoldDir
from src.training import fold as train
from src.training import objective
from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.data.folds import shared_folds
from src.data.geometry import validation_set
from src.tools.gpucheck import augmentation_batches, check_fold_predictions, fresh_predictor
from src.core.metrics import scores
from src.training.optim import SAM, build_optimizer
from src.core.runtime import autocast_dtype, precision_record
from src.data.device_input import InputStage
from src.training.loop import CHECK_EVERY, Training, build_training, train_one_epoch
from src.training.objective import Objective

from .conftest import TINY_RUN, resolved, run_cli

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def run_fold0(root, work: Path, experiment: str, *overrides: str) -> Path:
    assert run_cli("run", experiment, "--data", root, "--outputs", work / "outputs", "--submissions",
                   work / "submissions", *TINY_RUN, "train.folds=[0]", *overrides) == 0
    return work / "outputs" / experiment


def scripted_scores(monkeypatch, best_epoch: int) -> None:
    """Validation says epoch `best_epoch` (1 or 2 of 2) was the best, whatever the model does."""
    calls = []

    def scripted(labels, probs):
        calls.append(1)
        return {**scores(labels, probs), "macro_f1": 1.0 / len(calls) if best_epoch == 1 else float(len(calls))}

    monkeypatch.setattr(train, "scores", scripted)


@pytest.mark.slow
@pytest.mark.parametrize("backbone, ema, best_epoch", [("tf_efficientnet_lite0", None, 1),
                                                       ("tiny_vit_5m_224", 0.5, 2)])
def test_fold_files_equal_a_fresh_model_from_best_pt(backbone, ema, best_epoch, tiny_root, tmp_path, monkeypatch):
    """The best epoch need not be the last (best epoch 1 of 2). TinyViT caches its attention biases in eval mode:
    the EMA of the weights, updated in place while it stays in eval mode, must validate with its current biases,
    not epoch 1's; and the test pass, which loads best.pt into the raw model after that model validated epoch 2,
    must predict with best.pt's biases (best epoch 2 of 2, EMA on)."""
    scripted_scores(monkeypatch, best_epoch)
    average = [f"train.ema_decay={ema}"] if ema else []
    run_dir = run_fold0(tiny_root, tmp_path, "exp05", f"model.backbone={backbone}", "model.pretrained=false",
                        "train.epochs=2", "train.patience=0", "augment.strong=false", "scheduler.name=constant",
                        "optimizer.lr=0.01", *average)
    fold_dir = run_dir / "fold0"
    assert torch.load(fold_dir / "best.pt", weights_only=True)["epoch"] == best_epoch
    cfg, _ = resolve_config("exp05", "demo", [*TINY_RUN[2:], f"model.backbone={backbone}", "model.pretrained=false",
                                              *average])
    data = load_competition_data(tiny_root, cfg.data.label_fixes, log=lambda _: None)
    cfg = resolved(cfg, data)
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, tmp_path / "outputs" / "folds")
    validation = validation_set(cfg, data.train[(folds["fold"] == 0).to_numpy()])
    assert validation.are_crops
    predictor = fresh_predictor(cfg, len(data.classes), CPU, fold_dir / "best.pt", data.classes)
    check = check_fold_predictions(predictor, data, FoldDir(fold_dir), validation, epochs=2)
    assert check.passed, check.detail


@pytest.mark.slow
def test_a_compiled_tinyvit_and_its_compiled_ema_predict_like_fresh_models_after_every_epoch(tiny_root, monkeypatch):
    """speed.compile as on a GPU (torch.compile, here with dynamo's eager backend on the CPU) on a TinyViT stand-in
    of two small stages, with an EMA: after each epoch the compiled evaluation models of the raw weights and of the
    EMA predict what fresh eager models with those weights predict."""
    import functools

    import timm

    from src.inference.predictor import Predictor
    from src.model import networks as models
    from src.model import prepare

    compile_eagerly = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(prepare, "compiles", lambda cfg, device: cfg.speed.compile)
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    monkeypatch.setattr(models, "build_backbone", lambda cfg, img_size=None: timm.create_model(
        "tiny_vit_5m_224", pretrained=False, num_classes=0, embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2), window_sizes=(2, 2, 2, 2)))
    cfg, _ = resolve_config("exp19", "demo", ["input.img_size=64", "train.batch_size=8", "train.num_workers=0",
                                              "train.ema_decay=0.5", "speed.compile=true", "optimizer.lr=0.05"])
    data = load_competition_data(tiny_root, cfg.data.label_fixes, log=lambda _: None)
    cfg = resolved(cfg, data)
    rows = data.train.head(16)
    run = build_training(cfg, rows, len(data.classes), CPU)
    for epoch in (1, 2):
        train_one_epoch(run, epoch, desc="compiled")
        for compiled, weights in ((run.predicting_model, run.predicting_state()),
                                  (run.eval_model, run.model.state_dict())):
            fresh = models.build_model(cfg.model, len(data.classes))
            fresh.load_state_dict(weights)
            got, want = (Predictor(cfg, model, fresh, CPU, workers=0).predict(rows["path"]) for model in (compiled,
                                                                                                         fresh))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert isinstance(run.predicting_model, torch._dynamo.eval_frame.OptimizedModule)


# --- DataLoader workers ----------------------------------------------------------------------------------------

def test_workers_augment_every_image_and_epoch_differently_and_like_a_loader_without_workers(tiny_root):
    cfg, _ = resolve_config("exp02", "demo", ["input.img_size=32", "train.batch_size=4"])
    path = str(next((tiny_root / "train").iterdir()))
    with_workers = augmentation_batches(cfg, path, workers=2, epochs=2, batches=4)
    images = torch.cat(with_workers).flatten(1)
    assert len(images) == 2 * 4 * 4 and len(torch.unique(images, dim=0)) == len(images)
    without = augmentation_batches(cfg, path, workers=0, epochs=2, batches=4)
    assert all(torch.equal(a, b) for a, b in zip(with_workers, without))


@pytest.mark.slow
def test_a_run_with_two_workers_equals_a_run_without(tiny_root, tmp_path):
    outputs = {workers: run_fold0(tiny_root, tmp_path / f"w{workers}", "exp02", f"train.num_workers={workers}",
                                  "train.keep_checkpoints=true") / "fold0" for workers in (0, 2)}
    for name in ("val_probs.csv", "test_probs.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(outputs[0] / name), pd.read_csv(outputs[2] / name),
                                      check_exact=True)
    weights = [torch.load(outputs[w] / "last.pt", weights_only=True)["model"] for w in (0, 2)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.slow
def test_workers_run_opencv_single_threaded_without_deadlocking_after_the_parent_used_its_pool(tmp_path):
    """Limiting OpenCV inside a worker (worker_init_fn) hangs once the parent has used OpenCV's thread pool; the
    loader sets the limit around the fork instead. Run in a subprocess so a hang fails the test, not the suite."""
    script = tmp_path / "threads.py"
    script.write_text(textwrap.dedent("""
        import cv2, numpy as np, torch
        from src.data.loader import make_loader
        big = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
        for _ in range(3):
            cv2.resize(big, (1000, 1000), interpolation=cv2.INTER_AREA)
        before = cv2.getNumThreads()
        class Threads:
            def __len__(self): return 8
            def __getitem__(self, index):
                cv2.resize(big, (500, 500), interpolation=cv2.INTER_AREA)
                return cv2.getNumThreads()
        loader = make_loader(Threads(), 2, 2, torch.device("cpu"), train=False)
        print(sorted({int(n) for batch in loader for n in batch}), before, cv2.getNumThreads())
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    in_workers, parent_before, parent_after = done.stdout.rsplit("]", 1)[0] + "]", *done.stdout.split()[-2:]
    assert in_workers == "[1]" and parent_before == parent_after


# --- precision --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((6, 0), torch.float16), ((7, 0), torch.float16),
                                                  ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_follows_the_compute_capability_not_bf16_emulation(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts here
    assert autocast_dtype(True, "auto", torch.device("cuda")) == expected


def test_precision_on_the_cpu_and_named_dtypes():
    assert autocast_dtype(True, "auto", CPU) is None
    assert autocast_dtype(False, "bfloat16", CPU) is None
    assert autocast_dtype(True, "bfloat16", CPU) == torch.bfloat16
    assert autocast_dtype(True, "float16", CPU) == torch.float16
    assert precision_record(True, "auto", CPU) == {"device": "cpu", "autocast": "off (float32)",
                                                   "grad_scaler": False}
    assert precision_record(True, "float16", CPU)["grad_scaler"] is True


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cpu_autocast_trains_through_the_amp_branches(dtype, tiny_root, tmp_path, monkeypatch):
    seen = []
    build_loss = objective.build_loss

    def recording_loss(cfg, reduction="mean"):
        criterion = build_loss(cfg, reduction)

        def loss(logits, targets):
            seen.append(logits.dtype)
            return criterion(logits, targets)
        return loss

    monkeypatch.setattr(objective, "build_loss", recording_loss)
    run_dir = run_fold0(tiny_root, tmp_path, "exp00", f"train.amp_dtype={dtype}", "train.keep_checkpoints=true")
    steps = 37 // 8  # fold 0 of the tiny data trains on 37 images in batches of 8; validation sees float32 logits
    assert seen[:steps] == [getattr(torch, dtype)] * steps and set(seen[steps:]) == {torch.float32}
    record = pd.json_normalize(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())["run"])
    assert record["precision.autocast"].item() == dtype
    assert record["precision.grad_scaler"].item() == (dtype == "float16")
    scaler = torch.load(run_dir / "fold0" / "last.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (dtype == "float16") and (not scaler or scaler["scale"] > 0)


@pytest.mark.slow
def test_a_resume_with_an_empty_or_foreign_scaler_state_starts_a_fresh_scaler(tiny_root):
    data = load_competition_data(tiny_root, log=lambda _: None)
    notes = []
    for dtype in ("float16", "bfloat16"):
        cfg, _ = resolve_config("exp00", "demo", ["input.img_size=32", f"train.amp_dtype={dtype}"])
        run = build_training(cfg, data.train, len(data.classes), CPU)
        run.restore_scaler({}, notes.append, "exp00 fold 0")
        run.restore_scaler({"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 0}, notes.append, "exp00 fold 0")
        assert run.scaler.is_enabled() == (dtype == "float16")
        if run.scaler.is_enabled():
            assert run.scaler.get_scale() == 1024.0
    assert notes == ["exp00 fold 0: the checkpoint was saved without float16 gradient scaling; the scaler starts "
                     "afresh"]


# --- the loop and the optimisers --------------------------------------------------------------------------------

class HostReads:
    """Counts the calls that make the host wait for the device: .item(), float(), int(), bool(), .tolist(),
    torch.nonzero."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, self.counting(getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch, "nonzero", self.counting(torch.nonzero))

    def counting(self, function):
        def counted(*args, **kwargs):
            self.count += 1
            return function(*args, **kwargs)
        return counted


def tiny_training(cfg, batches, optimizer_name: str = "sgd") -> Training:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = build_optimizer(cfg.optimizer.model_copy(update={"name": optimizer_name, "lr": 0.01}),
                                model.parameters(), CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Training(cfg, CPU, model, model, model, (0.5,) * 3, (0.5,) * 3, 0, batches, optimizer, scheduler,
                    torch.amp.GradScaler("cpu", enabled=False),
                    Objective(nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), 3),
                    inputs=InputStage((0.5,) * 3, (0.5,) * 3))


def uint8_images(*shape: int, generator=None) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


@pytest.mark.slow
def test_the_loop_reads_its_losses_once_every_check_not_every_step(monkeypatch):
    cfg, _ = resolve_config("exp00", "demo")
    generator = torch.Generator().manual_seed(0)
    steps = 2 * CHECK_EVERY + 3
    batches = [(uint8_images(4, 3, 2, 2, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(steps)]
    run = tiny_training(cfg, batches)
    reads = HostReads(monkeypatch)
    stats = train_one_epoch(run, 1, desc="loop")
    assert stats.images == 4 * steps and np.isfinite(stats.loss)
    assert reads.count <= 3 * (steps // CHECK_EVERY + 1), f"{reads.count} host reads in {steps} steps"


@pytest.mark.parametrize("steps", [CHECK_EVERY, 2 * CHECK_EVERY])
def test_an_epoch_of_a_whole_number_of_checks_ends_normally(steps):
    """The last in-loop check falls on the last step: nothing is left for the end-of-epoch check."""
    cfg, _ = resolve_config("exp00", "demo")
    batches = [(uint8_images(2, 3, 2, 2), torch.zeros(2, dtype=torch.long)) for _ in range(steps)]
    stats = train_one_epoch(tiny_training(cfg, batches), 1, desc="loop")
    assert stats.images == 2 * steps and np.isfinite(stats.loss)


@pytest.mark.slow
def test_the_epoch_loss_is_the_image_weighted_mean_of_the_step_losses():
    cfg, _ = resolve_config("exp00", "demo")
    batches = [(torch.full((n, 3, 2, 2), 40 * n, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)) for n in (1, 3)]
    run = tiny_training(cfg, batches)
    run.optimizer.param_groups[0]["lr"] = 0.0  # the weights stay put, so the losses can be computed here
    expected = [F.cross_entropy(run.model(run.inputs(x, 0)), y, reduction="sum").item() for x, y in batches]
    assert train_one_epoch(run, 1, desc="loop").loss == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_adam_and_adamw_use_fused_kernels_on_cuda_only():
    params = [nn.Parameter(torch.zeros(2))]
    for name in ("adam", "adamw"):
        cfg, _ = resolve_config("exp05", overrides=[f"optimizer.name={name}"])
        assert build_optimizer(cfg.optimizer, params, torch.device("cuda")).defaults["fused"] is True
        assert build_optimizer(cfg.optimizer, params, CPU).defaults["fused"] is False
    sam, _ = resolve_config("exp10")
    assert isinstance(optimizer := build_optimizer(sam.optimizer, params, torch.device("cuda")), SAM)
    assert optimizer.base_optimizer.defaults["fused"] is True


# --- the GPU acceptance command --------------------------------------------------------------------------------

def test_gpucheck_without_cuda_says_so_in_one_line_and_exits_0(tmp_path, capsys):
    assert run_cli("gpucheck", "--outputs", tmp_path) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("gpucheck: no CUDA device here") and "\n" not in out
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpucheck_walks_its_checks_on_the_cpu_at_a_tiny_geometry(tiny_root, tmp_path, capsys):
    assert run_cli("gpucheck", "--device", "cpu", "--data", tiny_root, "--outputs", tmp_path, "--steps", "2",
                   "model.backbone=tiny_vit_5m_224", "input.img_size=48", "train.batch_size=8",
                   "inference.batch_size=32", "train.num_workers=2") == 0
    report = (tmp_path / "gpucheck" / "report.md").read_text()
    checks = [line for line in report.splitlines() if "| PASS |" in line or "| FAIL |" in line]
    assert len(checks) == 4 and all("| PASS |" in line for line in checks), checks
    assert "augmentations with 2 workers | PASS | 16 distinct of 16" in report
    assert "autocast dtype | PASS | CPU, amp_dtype auto: autocast off (float32)" in report
    for figure in ("training: the trainer's epoch over 16 images", "training: fold run, epoch 2",
                   "prediction: 26 test crops"):
        row = next(line for line in report.splitlines() if figure in line)
        assert float(row.split("|")[2].split()[0].replace(",", "")) > 0, row
