"""Several processes from one command: the folds of an experiment in parallel across GPUs (--gpus), and one
fold trained by N processes through torchrun (--ddp N), on one machine or several (--nnodes).

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


@dataclass(frozen=True)
class Nodes:
    """Where the processes of one DDP run live: this machine alone (torchrun --standalone), or `count` machines
    that meet at a c10d rendezvous endpoint (host:port of one of them) and each start the same command."""
    count: int = 1
    endpoint: str | None = None
    rank: int | None = None  # this machine's place (SLURM_NODEID); the rendezvous orders them when it is left out

    def torchrun_args(self, run_id: str) -> list[str]:
        if self.count == 1:
            return ["--standalone"]
        args = [f"--nnodes={self.count}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={run_id}"]
        return args + ([f"--node-rank={self.rank}"] if self.rank is not None else [])


def python_launcher(processes: int, nodes: Nodes = Nodes(), run_id: str = "artist") -> list[str]:
    """How to start `-m src.cli ...`: plain Python, or torchrun with `processes` processes on this machine. On one
    machine torchrun picks a free rendezvous port of its own (--standalone), so parallel DDP jobs never collide on a
    port; across machines every node names the same endpoint and run id."""
    if processes <= 1 and nodes.count == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args(run_id),
            f"--nproc-per-node={processes}"]


def run_jobs(jobs: list[Job], slots: list[str], log: Callable[[str], None] = print, poll_seconds: float = 0.2,
             env: dict[str, str] | None = None) -> list[JobResult]:
    """Run every job, at most one per slot at a time, each seeing only its slot's GPUs (and `env` on top of this
    process's environment). Slots are positions: a GPU listed twice is two slots, which run two jobs on it at once.
    Returns the results in the order the jobs finished. Interrupting this stops the running jobs."""
    pending, running, results = deque(jobs), {}, []
    try:
        while pending or running:
            for position, slot in enumerate(slots):
                if position not in running and pending:
                    job = pending.popleft()
                    job.log_path.parent.mkdir(parents=True, exist_ok=True)
                    handle = open(job.log_path, "w", encoding="utf-8")
                    job_env = {**os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": slot, "PYTHONUNBUFFERED": "1"}
                    process = subprocess.Popen(job.argv, stdout=handle, stderr=subprocess.STDOUT, env=job_env,
                                               cwd=REPO)
                    running[position] = (job, process, handle)
                    log(f"{job.name}: started on GPU {slot}, log {job.log_path}")
            for position, (job, process, handle) in list(running.items()):
                if process.poll() is None:
                    continue
                handle.close()
                del running[position]
                result = JobResult(job, process.returncode, slots[position])
                results.append(result)
                log(f"{job.name}: {'FAILED (exit %d)' % result.returncode if result.failed else 'finished'} "
                    f"on GPU {result.slot}")
            time.sleep(poll_seconds)
    finally:
        for _, process, handle in running.values():
            process.terminate()
            process.wait()
            handle.close()
    return results
