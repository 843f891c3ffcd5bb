"""Several processes from one command: the fold scheduler, --gpus and the 2-process gloo DDP run on the CPU."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from src.data import load_competition_data
from src.errors import UserError
from src.parallel import Job, gpu_slots, run_jobs
from src.submission import validate_submission

from .conftest import TINY_RUN, run_cli

FOLD_FILES = ("best.pt", "last.pt", "history.csv", "val_probs.csv", "test_probs.csv", "done.json")


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


def test_a_slot_runs_one_job_at_a_time(tmp_path):
    marker = tmp_path / "running"
    code = (f"import os, sys, time; p = {str(marker)!r} + os.environ['CUDA_VISIBLE_DEVICES']; "
            "busy = os.path.exists(p); open(p, 'w').close(); time.sleep(0.2); os.remove(p); sys.exit(9 if busy else 0)")
    results = run_jobs([python_job(tmp_path, f"job{i}", code) for i in range(4)], ["0"], log=lambda _: None,
                       poll_seconds=0.02)
    assert [r.returncode for r in results] == [0, 0, 0, 0]


def test_gpu_slots():
    assert gpu_slots("0,1,2,3", 1, 0) == ["0", "1", "2", "3"]
    assert gpu_slots("0,1,2,3", 2, 0) == ["0,1", "2,3"]
    assert gpu_slots("0,0", 1, 1) == ["0", "0"]
    assert gpu_slots("all", 1, 3) == ["0", "1", "2"]
    for spec, per_slot, count, message in (("0,1,2", 2, 4, "multiple of 2"), ("a,b", 1, 2, "device ids"),
                                           ("all", 1, 0, "no CUDA device")):
        with pytest.raises(UserError, match=message):
            gpu_slots(spec, per_slot, count)


def assert_complete_experiment(root, outputs, submissions):
    data = load_competition_data(root, log=lambda _: None)
    for fold in range(5):
        for name in FOLD_FILES:
            assert (outputs / "exp00" / f"fold{fold}" / name).is_file(), f"fold{fold}/{name} missing"
    oof = pd.read_csv(outputs / "exp00" / "oof.csv", dtype={"id": str})
    assert oof["id"].is_unique and sorted(oof["id"]) == sorted(data.train["id"])
    validate_submission(pd.read_csv(submissions / "exp00.csv", dtype={"id": str}), data.sample_submission,
                        data.classes)


def test_two_process_gloo_ddp_run_writes_the_same_files_with_each_id_once(tiny_root, tmp_path, capfd):
    outputs, submissions = tmp_path / "outputs", tmp_path / "submissions"
    assert run_cli("run", "exp00", "--data", tiny_root, "--outputs", outputs, "--submissions", submissions,
                   "--ddp", "2", *TINY_RUN) == 0
    assert_complete_experiment(tiny_root, outputs, submissions)
    for fold in range(5):
        val = pd.read_csv(outputs / "exp00" / f"fold{fold}" / "val_probs.csv", dtype={"id": str})
        assert val["id"].is_unique
    assert "x 2 processes (DDP)" in capfd.readouterr().out


def test_parallel_folds_report_a_failed_fold_and_finish_it_on_rerun(tiny_root, tmp_path, capsys):
    outputs, submissions = tmp_path / "outputs", tmp_path / "submissions"
    args = ["run", "exp00", "--data", tiny_root, "--outputs", outputs, "--submissions", submissions,
            "--gpus", "0,0", *TINY_RUN]
    broken = outputs / "exp00" / "fold3" / "last.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"truncated")
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "1 of 5 folds failed: exp00 fold 3 failed (exit 2)" in err and "not a readable checkpoint" in err
    assert str(outputs / "exp00" / "logs" / "fold3.log") in err
    assert all((outputs / "exp00" / f"fold{k}" / "done.json").is_file() for k in (0, 1, 2, 4))
    assert not (outputs / "exp00" / "oof.csv").exists()

    broken.unlink()
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    assert "1 folds to train" in out and "exp00 fold 3: started" in out
    assert_complete_experiment(tiny_root, outputs, submissions)


def test_bench_runs_every_section_and_writes_its_table(tiny_root, tmp_path, capsys):
    assert run_cli("bench", "--data", tiny_root, "--outputs", tmp_path, "--backbone", "tf_efficientnet_lite0",
                   "--img-size", "32", "--batch", "4", "--images", "8", "--steps", "1", "--warmup", "0",
                   "--workers", "0") == 0
    table = (tmp_path / "bench" / "tf_efficientnet_lite0-32-b4.md").read_text()
    for setting in ("decode every image, 0 workers (plain)", "jpg cache, warm", "npy cache, warm",
                    "plain: fp32, NCHW, eager", "plain: fp32, decode every image", "TTA d4"):
        row = next(line for line in table.splitlines() if f"| {setting} |" in line)
        assert float(row.split("|")[3].replace(",", "")) > 0, row
    assert "machine:" in table and not list(tmp_path.glob("bench-cache-*"))
