"""Several processes from one command: the fold scheduler and --gpus, DDP on the CPU (gloo: the gathered rows,
SyncBatchNorm, two nodes joined over localhost), and the bench."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import WeightedRandomSampler

from src.core.config import resolve_config
from src.core.schema import ModelConfig
from src.data.competition import load_competition_data
from src.core.distributed import DistContext, SINGLE_PROCESS
from src.training.sync_batchnorm import GlooSyncBatchNorm, convert_sync_batchnorm
from src.core.errors import UserError
from src.data.geometry import validation_set
from src.tools.gpucheck import fresh_predictor, predict_validation
from src.inference.probabilities import read_probs
from src.training.losses import FocalLoss
from src.model.networks import build_model
from src.pipeline.launch import Job, Nodes, gpu_slots, python_launcher, run_jobs
from src.pipeline.submission import validate_submission
from src.training.loop import build_training, sync_for, train_one_epoch

from .conftest import TINY_RUN, resolved, run_cli

REPO = Path(__file__).resolve().parent.parent

FOLD_FILES = ("best.pt", "history.csv", "val_probs.csv", "test_probs.csv", "done.json")


def python_job(tmp_path, name: str, code: str) -> Job:
    return Job(name, [sys.executable, "-c", code], tmp_path / "logs" / f"{name}.log")


def test_a_failing_job_is_reported_with_its_log_and_the_others_finish(tmp_path):
    report = "import os, time; time.sleep(0.3); print('slot', os.environ['CUDA_VISIBLE_DEVICES'])"
    jobs = [python_job(tmp_path, "fold0", report),
            python_job(tmp_path, "fold1", "import sys; print('error: fold 1 broke'); sys.exit(3)"),
            python_job(tmp_path, "fold2", report), python_job(tmp_path, "fold3", report)]
    results = run_jobs(jobs, ["4", "7"], log=lambda _: None, poll_seconds=0.05)
    assert sorted(r.job.name for r in results) == ["fold0", "fold1", "fold2", "fold3"]
    failed = [r for r in results if r.failed]
    assert [r.job.name for r in failed] == ["fold1"] and failed[0].returncode == 3
    assert "fold1 failed (exit 3): error: fold 1 broke" in failed[0].failure_line()
    assert str(tmp_path / "logs" / "fold1.log") in failed[0].failure_line()
    for result in results:
        if not result.failed:
            assert (tmp_path / "logs" / f"{result.job.name}.log").read_text().strip() == f"slot {result.slot}"
    assert {r.slot for r in results} == {"4", "7"}


def test_two_slots_of_one_gpu_run_their_jobs_at_the_same_time(tmp_path):
    code = "import time; print(time.time()); time.sleep(1.0); print(time.time())"
    results = run_jobs([python_job(tmp_path, f"job{i}", code) for i in range(2)], ["0", "0"], log=lambda _: None,
                       poll_seconds=0.02)
    spans = [[float(t) for t in r.job.log_path.read_text().split()] for r in results]
    assert all(r.slot == "0" and not r.failed for r in results)
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


def test_a_slot_runs_one_job_at_a_time(tmp_path):
    marker = tmp_path / "running"
    code = (f"import os, sys, time; p = {str(marker)!r} + os.environ['CUDA_VISIBLE_DEVICES']; "
            "busy = os.path.exists(p); open(p, 'w').close(); time.sleep(0.2); os.remove(p); sys.exit(9 if busy else 0)")
    results = run_jobs([python_job(tmp_path, f"job{i}", code) for i in range(4)], ["0"], log=lambda _: None,
                       poll_seconds=0.02)
    assert [r.returncode for r in results] == [0, 0, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--gpus", "0,1"], "--gpus runs folds in parallel on one machine"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--restart"], "--restart with --nnodes needs --node-rank"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"], "--node-rank 2: expected 0 to 1"),
])
def test_multi_node_flags_are_checked_before_anything_starts(flags, message, tmp_path, capsys):
    assert run_cli("run", "exp00", "--outputs", tmp_path, *flags) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_gpu_slots():
    assert gpu_slots("0,1,2,3", 1, 0) == ["0", "1", "2", "3"]
    assert gpu_slots("0,1,2,3", 2, 0) == ["0,1", "2,3"]
    assert gpu_slots("0,0", 1, 1) == ["0", "0"]
    assert gpu_slots("all", 1, 3) == ["0", "1", "2"]
    for spec, per_slot, count, message in (("0,1,2", 2, 4, "multiple of 2"), ("a,b", 1, 2, "device ids"),
                                           ("all", 1, 0, "no CUDA device")):
        with pytest.raises(UserError, match=message):
            gpu_slots(spec, per_slot, count)


def assert_complete_experiment(root, outputs, submissions, folds: int):
    data = load_competition_data(root, log=lambda _: None)
    for fold in range(folds):
        for name in FOLD_FILES:
            assert (outputs / "exp00" / f"fold{fold}" / name).is_file(), f"fold{fold}/{name} missing"
    oof = pd.read_csv(outputs / "exp00" / "oof.csv", dtype={"id": str})
    assert not oof.duplicated(["id", "crop"]).any() and sorted(oof["id"].unique()) == sorted(data.train["id"])
    validate_submission(pd.read_csv(submissions / "exp00.csv", dtype={"id": str}), data.sample_submission,
                        data.classes)


def run_nodes(root, work: Path, *launch: list[str], env: dict) -> list[subprocess.Popen]:
    """`run exp00` of fold 0 from a launcher process per node, started at once."""
    args = [sys.executable, "-m", "src.cli", "run", "exp00", "--data", str(root), "--outputs", str(work / "outputs"),
            "--submissions", str(work / "submissions"), *TINY_RUN, "train.folds=[0]"]
    return [subprocess.Popen([*args, *node], cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for node in launch]


def finished(processes: list[subprocess.Popen]) -> str:
    """Every process's output, once all have ended well. (The c10d rendezvous numbers the ranks in the order the
    nodes join, so rank 0's lines may be in either node's output.)"""
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    return "\n".join(outputs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_gather_what_one_process_predicts_from_best_pt(tiny_root, tmp_path):
    """Two "nodes" joined over localhost (c10d rendezvous, one DDP process each, one thread each as --ddp 2 gives on
    2 cores; gloo): each rank predicts its shard, and the gathered rows are in id order and equal what one process
    predicts from best.pt. --ddp N is the same launch on one machine (torchrun --standalone, next test)."""
    port = free_port()
    nodes = [["--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"localhost:{port}"] for rank in (0, 1)]
    out = finished(run_nodes(tiny_root, tmp_path / "nodes", *nodes, env={"OMP_NUM_THREADS": "1"}))
    assert "on each of 2 machines" in out and "x 2 processes (DDP, SyncBatchNorm)" in out

    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg = resolved(resolve_config("exp00", "demo", [*TINY_RUN[2:], "model.pretrained=false"])[0], data)
    fold_dir = tmp_path / "nodes" / "outputs" / "exp00" / "fold0"
    assert sorted(p.name for p in fold_dir.iterdir()) == sorted(FOLD_FILES)
    folds = pd.read_csv(next((tmp_path / "nodes" / "outputs" / "folds").glob("*.csv")), dtype={"id": str})
    validation = validation_set(cfg, data.train[(folds["fold"] == 0).to_numpy()])
    one_process = fresh_predictor(cfg, len(data.classes), torch.device("cpu"), fold_dir / "best.pt", data.classes)
    gathered = read_probs(fold_dir / "val_probs.csv")
    assert list(zip(gathered["id"], gathered["crop"])) == list(zip(validation.ids, validation.crops))
    np.testing.assert_allclose(gathered[data.classes].to_numpy(), predict_validation(one_process, validation),
                               atol=1e-6)
    gathered = pd.read_csv(fold_dir / "test_probs.csv", dtype={"id": str})
    assert gathered["id"].tolist() == data.test["id"].tolist()
    expected = one_process.predict(data.test["path"].tolist(), test=True)
    np.testing.assert_allclose(gathered[data.classes].to_numpy(), expected, atol=1e-6)


def test_ddp_on_one_machine_is_torchrun_standalone_and_across_machines_a_shared_rendezvous():
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    assert python_launcher(1) == [sys.executable]
    assert python_launcher(2) == [*torchrun, "--standalone", "--nproc-per-node=2"]
    assert python_launcher(1, Nodes(2, "head:29500", 1), "exp07") == [
        *torchrun, "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500", "--rdzv-id=exp07",
        "--node-rank=1", "--nproc-per-node=1"]


def _sync_batchnorm_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: its half of a batch through a converted BatchNorm, forward and backward."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x, weights, bn = _sync_batchnorm_case()
    synced = convert_sync_batchnorm(nn.Sequential(bn), torch.device("cpu")).train()
    assert isinstance(synced[0], GlooSyncBatchNorm)
    half = x[4 * rank:4 * (rank + 1)].clone().requires_grad_()
    out = synced(half)
    (out * weights[4 * rank:4 * (rank + 1)]).sum().backward()
    torch.save({"out": out.detach(), "grad": half.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _sync_batchnorm_case():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 5, generator=generator) * 3 + 1
    weights = torch.randn(8, 3, 4, 5, generator=generator)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return x, weights, bn


@pytest.mark.slow
def test_gloo_sync_batchnorm_equals_one_batchnorm_over_the_whole_batch(tmp_path):
    torch.multiprocessing.start_processes(_sync_batchnorm_rank, args=(str(tmp_path / "init"), str(tmp_path)),
                                          nprocs=2, start_method="fork")  # forked: no second import of the suite
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    x, weights, bn = _sync_batchnorm_case()
    x.requires_grad_()
    out = bn.train()(x)
    (out * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, atol=1e-5, rtol=1e-5)
    for name, expected in (("weight_grad", bn.weight.grad), ("bias_grad", bn.bias.grad)):
        torch.testing.assert_close(ranks[0][name] + ranks[1][name], expected, atol=1e-4, rtol=1e-5)
    for name in ("running_mean", "running_var"):
        for rank in ranks:
            torch.testing.assert_close(rank[name], getattr(bn, name), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_sync_batchnorm_conversion_keeps_every_layer_and_timms_activations():
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained=False), 4).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert sum(isinstance(m, GlooSyncBatchNorm) for m in converted.modules()) == norms > 10
    assert list(converted.state_dict()) == keys
    torch.testing.assert_close(converted(x), before)


def test_sync_batchnorm_follows_the_switch(tiny_root):
    data = load_competition_data(tiny_root, log=lambda _: None)
    two_ranks = DistContext(rank=0, world_size=2, local_rank=0, local_world_size=2)
    for switch, expected in (("true", True), ("false", False)):
        cfg, _ = resolve_config("exp00", "demo", ["input.img_size=32", f"train.sync_batchnorm={switch}"])
        for ctx, converted in ((two_ranks, expected), (SINGLE_PROCESS, False)):
            model = build_model(cfg.model.model_copy(update={"pretrained": False}), len(data.classes))
            assert any(isinstance(m, GlooSyncBatchNorm) for m in sync_for(model, cfg, ctx).modules()) == converted


@pytest.mark.slow
def test_parallel_folds_report_a_failed_fold_and_finish_it_on_rerun(tiny_root, tmp_path, capsys, monkeypatch):
    """Also one group of tracked runs, as a single process makes: each fold child opens its fold's run, the parent
    the experiment's (MLflow: nested; W&B: grouped)."""
    from .test_tracking import mlflow_runs, wandb_runs

    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    outputs, submissions = tmp_path / "outputs", tmp_path / "submissions"
    args = ["run", "exp00", "--data", tiny_root, "--outputs", outputs, "--submissions", submissions,
            "--gpus", "0,0", *TINY_RUN, "data.n_folds=2", "tracking.mlflow=true", "tracking.wandb=true"]
    broken = outputs / "exp00" / "fold1" / "last.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"truncated")
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "1 of 2 folds failed: exp00 fold 1 failed (exit 2)" in err and "not a readable checkpoint" in err
    assert str(outputs / "exp00" / "logs" / "fold1.log") in err
    assert (outputs / "exp00" / "fold0" / "done.json").is_file()
    assert not (outputs / "exp00" / "oof.csv").exists()

    broken.unlink()
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    assert "1 folds to train" in out and "exp00 fold 1: started" in out
    assert_complete_experiment(tiny_root, outputs, submissions, folds=2)
    _, [experiment], fold_runs = mlflow_runs(outputs)
    assert sorted(run.info.run_name for run in fold_runs) == ["exp00 fold 0", "exp00 fold 1"]
    assert {run.data.tags["mlflow.parentRunId"] for run in fold_runs} == {experiment.info.run_id}
    assert {"fold0/best_macro_f1", "fold1/best_macro_f1", "cv_macro_f1"} <= set(experiment.data.metrics)
    assert {name: len(runs) for name, runs in wandb_runs(outputs / "exp00").items()} == \
        {"exp00": 1, "exp00 fold 0": 1, "exp00 fold 1": 1}


@pytest.mark.slow
def test_bench_times_the_trainers_own_epoch_and_writes_its_table(tiny_root, tmp_path, capsys, monkeypatch):
    from src.tools import bench

    built, epochs = [], []
    monkeypatch.setattr(bench, "build_training", lambda *a, **k: built.append(build_training(*a, **k)) or built[-1])
    monkeypatch.setattr(bench, "train_one_epoch", lambda run, epoch, desc: epochs.append(run) or
                        train_one_epoch(run, epoch, desc))
    assert run_cli("bench", "--experiment", "exp11", "--data", tiny_root, "--outputs", tmp_path, "--img-size", "32",
                   "--batch", "4", "--images", "8", "--steps", "1", "--warmup", "0", "--workers", "0") == 0
    assert "using the 'demo' profile" in capsys.readouterr().out  # no CUDA: the CPU demo profile, as everywhere
    table = (tmp_path / "bench" / "exp11-tf_efficientnet_lite0-32-b4.md").read_text()
    for setting in ("decode every image, 0 workers (plain)", "jpg cache, warm", "npy cache, warm",
                    "npy cache at the transform's start, warm",
                    "npy cache at the transform's start, warm, pixel augmentations on the device",
                    "the device's share: normalise + pixel augmentations (speed.gpu_augment), on cpu",
                    "plain: fp32, NCHW, eager", "plain: fp32, decode every image", "TTA d4"):
        row = next(line for line in table.splitlines() if f"| {setting} |" in line)
        assert float(row.split("|")[3].replace(",", "")) > 0, row
    loop = next(line for line in table.splitlines() if "| config switches," in line)
    assert "input pipeline:" in loop and "of the steps-only rate" in loop
    assert len(epochs) == 4 and all(run in built for run in epochs)  # warm-up and timed epoch, plain and switches
    assert all(run.objective.cutmix is not None and isinstance(run.loader.sampler.order, WeightedRandomSampler)
               and isinstance(run.objective.criterion, FocalLoss) for run in epochs)
    assert "machine:" in table and not list(tmp_path.glob("bench-cache-*"))
    assert "projected wall time of exp11 at 4 epochs (train.epochs, or fewer by early stopping)" in table
    assert "| at hand: 47 paintings, 26 test images |" in table and "| the competition's: 5,911 paintings" in table


def test_the_projection_adds_epochs_of_training_and_validation_the_test_pass_and_compiling():
    """exp21's fold at the real budget (30 epochs, patience 0) from rates picked by hand: 5,911 paintings in 5 folds
    hold out 1,183, train on 4,728 (147 full batches of 32: 4,704 images an epoch) and validate on 4 crops of each."""
    from src.tools.projection import FoldWork, projection_lines

    cfg, _ = resolve_config("exp21", None, ["train.batch_size=32"])
    work = FoldWork.of(cfg, 5911, 12670)
    assert (work.train, work.validation, work.test) == (4704, 4732, 12670)
    lines = projection_lines(cfg, 311, 202, train_rate=1000.0, predict_rate=4000.0, compile_seconds=60.0)
    epoch = 4704 / 1000 + 4732 / 4000
    fold = 30 * epoch + 12670 / 4000 + 60
    assert (epoch, fold) == (pytest.approx(5.887), pytest.approx(239.7775))
    assert "| the competition's: 5,911 paintings, 12,670 test images | 4,704 / 4,732 / 12,670 | 6s | 4.0 min | " \
           "20.0 min |" in lines
    assert lines[0].startswith("projected wall time of exp21 at 30 epochs (train.epochs), batch 32")
    early = resolve_config("exp07", None)[0]
    assert "at 30 epochs (early stopping decides; 30 assumed" in projection_lines(early, 311, 202, 1.0, 1.0, 0.0)[0]
    assert "at 12 epochs (--epochs)" in projection_lines(early, 311, 202, 1.0, 1.0, 0.0, epochs=12)[0]
