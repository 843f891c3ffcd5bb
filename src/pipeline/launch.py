"""Several processes from one command: the folds of an experiment in parallel across GPUs (--gpus), and one
fold trained by N processes through torchrun (--ddp N), on one machine or several (--nnodes).

Each fold job is the ordinary single-experiment command restricted to one fold (train.folds=[k]), run as a
subprocess that sees only its slot's GPUs (CUDA_VISIBLE_DEVICES) and writes its own log. The next fold starts
as soon as a slot frees; a failing fold does not stop the others and is reported at the end with its log.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import UserError
from ..core.paths import REPO


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


def nodes_from_args(args: argparse.Namespace) -> Nodes:
    """--nnodes, --node-rank and --rdzv-endpoint, checked."""
    if args.nnodes < 1:
        raise UserError(f"--nnodes {args.nnodes}: expected 1 or more machines")
    if args.nnodes == 1:
        return Nodes()
    if not args.rdzv_endpoint:
        raise UserError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, the same on every machine "
                        "(e.g. the first node's host name and a free port such as 29500)")
    if args.gpus:
        raise UserError("--gpus runs folds in parallel on one machine; across machines use --ddp N with --nnodes "
                        "(one fold trained by every machine's N processes)")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank}: expected 0 to {args.nnodes - 1} with --nnodes {args.nnodes}")
    if args.restart and args.node_rank is None:
        raise UserError("--restart with --nnodes needs --node-rank: only node 0 discards the outputs (shared by the "
                        "machines), so name each machine's rank, e.g. --node-rank $SLURM_NODEID")
    return Nodes(args.nnodes, args.rdzv_endpoint, args.node_rank)


def launch_processes(args: argparse.Namespace, name: str) -> None:
    """--gpus: one subprocess per fold, in parallel over the GPU slots, then the OOF and submission once every
    fold is done. --ddp N alone: the whole experiment under torchrun with N processes, on this machine or on each
    of --nnodes machines. The config (its data-decided values included), the data, the folds and --restart are
    dealt with here, once, before any child starts; the children get the resolved values as overrides."""
    import torch

    from ..core.layout import ExperimentDir, check_free_for
    from ..core.runtime import available_cores, worker_count
    from ..data.folds import shared_folds
    from .resolve import log, resolve_run
    from .run import claim_folder, fold_status, folds_to_train, holding_folds, run_experiment

    nodes = nodes_from_args(args)
    run = resolve_run(name, args.profile, args.overrides, args.data)
    cfg, data = run.cfg, run.data
    outputs, experiment = Path(args.outputs), ExperimentDir(Path(args.outputs) / cfg.name)  # name=X: OUTPUTS/X
    fingerprint = run.fingerprint(outputs)
    folds = folds_to_train(cfg)
    check_free_for(experiment.path, "experiment")
    if args.restart and not nodes.rank:  # before any child starts; the children's runs do not restart
        with holding_folds(experiment, folds, cfg.name):
            claim_folder(experiment, cfg, folds, fingerprint, True, Path(args.submissions), log)
    shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    slots = gpu_slots(args.gpus, args.ddp, torch.cuda.device_count()) if args.gpus else []
    # The children's torch threads: this machine's cores shared by its training processes (unless set already).
    threads = max(1, available_cores() // (max(1, len(slots)) * args.ddp))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    child = ["-m", "src.cli", "run", name, "--data", str(data.root), "--profile", run.profile or "none",
             "--outputs", str(outputs), "--submissions", str(args.submissions), *args.overrides,
             *run.explicit_overrides()]
    launcher = python_launcher(args.ddp, nodes, run_id=f"artist-{name}")
    if not args.gpus:
        where = f" on each of {nodes.count} machines (rendezvous {nodes.endpoint})" if nodes.count > 1 else ""
        log(f"{cfg.name}: training with {args.ddp} processes{where} (DDP through torchrun)")
        code = subprocess.run([*launcher, *child], cwd=REPO, env={**os.environ, **env}).returncode
        if code:
            raise UserError(f"the {args.ddp}-process DDP run of {cfg.name} failed (exit {code}); its messages are "
                            "above")
        return

    if torch.cuda.is_available() and cfg.train.num_workers is None:
        child.append(f"train.num_workers={worker_count(None, torch.device('cuda'), len(slots) * args.ddp)}")
    todo = [k for k in folds if fold_status(experiment.fold(k), fingerprint, not cfg.frozen) != "done"]
    with holding_folds(experiment, todo, cfg.name):  # refused here, before a job's log replaces the running fold's
        pass
    log(f"{cfg.name}: {len(todo)} folds to train over {len(slots)} slots (GPUs {' | '.join(slots)})"
        + ("" if torch.cuda.is_available() else "; no CUDA device, so they share the CPU"))
    jobs = [Job(f"{cfg.name} fold {k}", [*launcher, *child, "--fold-job", f"train.folds=[{k}]"], experiment.log(k))
            for k in todo]
    failures = [result for result in run_jobs(jobs, slots, log, env=env) if result.failed]
    publish_only = cfg.model_copy(update={"train": cfg.train.model_copy(update={"folds": []})})
    run_experiment(dataclasses.replace(run, cfg=publish_only), outputs, Path(args.submissions),
                   extra_info={"overrides": list(args.overrides), "command": " ".join(sys.argv), "gpus": args.gpus,
                               "ddp": args.ddp}, log=log)
    if failures:
        raise UserError(f"{len(failures)} of {len(jobs)} folds failed: "
                        + "; ".join(result.failure_line() for result in failures)
                        + "; fix the cause and rerun the same command (finished folds are kept)")
