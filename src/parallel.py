"""Several processes from one command: the folds of an experiment in parallel across GPUs (--gpus), and one
fold trained by N processes through torchrun (--ddp N).

Each fold job is the ordinary single-experiment command restricted to one fold (train.folds=[k]), run as a
subprocess that sees only its slot's GPUs (CUDA_VISIBLE_DEVICES) and writes its own log. The next fold starts
as soon as a slot frees; a failing fold does not stop the others and is reported at the end with its log.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Job:
    name: str
    argv: list[str]
    log_path: Path


@dataclass(frozen=True)
class JobResult:
    job: Job
    returncode: int
    slot: str

    @property
    def failed(self) -> bool:
        return self.returncode != 0

    def failure_line(self) -> str:
        """The job's error line from its log (the last 'error:' line, else the last line)."""
        lines = [line.strip() for line in self.job.log_path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        last = (errors or lines or ["(empty log)"])[-1]
        return f"{self.job.name} failed (exit {self.returncode}): {last} [log: {self.job.log_path}]"


def gpu_slots(spec: str, processes_per_slot: int, device_count: int) -> list[str]:
    """'0,1,2,3' with 2 processes per slot -> ['0,1', '2,3']; 'all' means every visible GPU. A GPU may be listed
    twice to run two folds on it at once."""
    if spec == "all":
        if device_count == 0:
            raise UserError("--gpus all: no CUDA device is visible; list device ids (e.g. --gpus 0,1) or leave "
                            "out --gpus")
        ids = [str(i) for i in range(device_count)]
    else:
        ids = [part.strip() for part in spec.split(",") if part.strip()]
        if not ids or not all(part.isdigit() for part in ids):
            raise UserError(f"--gpus {spec}: expected comma-separated device ids such as 0,1,2,3, or 'all'")
    if len(ids) % processes_per_slot:
        raise UserError(f"--gpus {spec} with --ddp {processes_per_slot}: the number of GPUs must be a multiple "
                        f"of {processes_per_slot}")
    return [",".join(ids[i:i + processes_per_slot]) for i in range(0, len(ids), processes_per_slot)]


def python_launcher(processes: int) -> list[str]:
    """How to start `-m src.cli ...`: plain Python, or torchrun with a free rendezvous port of its own
    (--standalone), so parallel DDP jobs never collide on a port."""
    if processes <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


def run_jobs(jobs: list[Job], slots: list[str], log: Callable[[str], None] = print,
             poll_seconds: float = 0.2) -> list[JobResult]:
    """Run every job, at most one per slot at a time, each seeing only its slot's GPUs. Returns the results in
    the order the jobs finished. Interrupting this stops the running jobs."""
    pending, running, results = deque(jobs), {}, []
    try:
        while pending or running:
            for slot in slots:
                if slot not in running and pending:
                    job = pending.popleft()
                    job.log_path.parent.mkdir(parents=True, exist_ok=True)
                    handle = open(job.log_path, "w", encoding="utf-8")
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot, "PYTHONUNBUFFERED": "1"}
                    process = subprocess.Popen(job.argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                    running[slot] = (job, process, handle)
                    log(f"{job.name}: started on GPU {slot}, log {job.log_path}")
            for slot, (job, process, handle) in list(running.items()):
                if process.poll() is None:
                    continue
                handle.close()
                del running[slot]
                result = JobResult(job, process.returncode, slot)
                results.append(result)
                log(f"{job.name}: {'FAILED (exit %d)' % result.returncode if result.failed else 'finished'} "
                    f"on GPU {slot}")
            time.sleep(poll_seconds)
    finally:
        for _, process, handle in running.values():
            process.terminate()
            process.wait()
            handle.close()
    return results
