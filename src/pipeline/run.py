"""One experiment end to end: its resolved config on disk, the shared folds, every fold trained (finished folds of
the same config and data are kept, a fold another run is training is refused), then the OOF table, the
fold-averaged test probabilities and the submission (src/pipeline/publish.py). `bash run.sh EXP` and `ladder`."""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..core.config import run_info
from ..core.distributed import SINGLE_PROCESS, DistContext, all_gather, barrier, destroy, device_for, init_distributed
from ..core.errors import UserError, one_line
from ..core.files import write_yaml
from ..core.layout import ExperimentDir, FoldDir
from ..core.paths import CONFIG_DIR
from ..core.runtime import precision_record
from ..data.folds import shared_folds
from ..data.geometry import unresolved
from ..data.image_cache import cache_for
from ..training.fold import train_fold
from ..training.frozen import FEATURE_DIR, FrozenFeatureFolds
from .figures import plot_training_curves
from .locks import ensure_unlocked, locked
from .publish import assemble_oof, mean_test_probs, publish
from .resolve import RunConfig, banner, log, quiet, resolve_run
from .tracking import NO_TRACKING, Tracker, open_trackers

FOLD_RESULT_KEYS = ("best_macro_f1", "best_epoch", "epochs_run")  # what a fold's done.json tells the trackers


def fold_status(fold_dir: FoldDir, fingerprint: str) -> str:
    """'done' when the fold finished with this config and data, else 'todo'. A fold finished with another config or
    data stops the run with one line: it is never mixed with folds of another config."""
    done = fold_dir.done_record()
    if done is None:
        return "todo"
    if done["fingerprint"] != fingerprint:
        raise UserError(f"{fold_dir.path} holds a fold trained with another config or data; rerun with --restart to "
                        f"discard {fold_dir.path.parent}, or name a new experiment")
    return "done"


def fold_result(fold_dir: FoldDir) -> dict[str, float]:
    """What a done fold's done.json says of its result (best_macro_f1; best_epoch and epochs_run when trained)."""
    done = fold_dir.done_record()
    return {key: done[key] for key in FOLD_RESULT_KEYS if key in done}


@contextlib.contextmanager
def fold_lock(path: Path, what: str, ctx: DistContext) -> Iterator[None]:
    """The fold's lock (src/pipeline/locks.py), held by rank 0 for all the ranks that train the fold together; when
    another run holds it, every rank stops with the same line."""
    with contextlib.ExitStack() as held:
        refusal = None
        if ctx.is_main:
            try:
                held.enter_context(locked(path, what))
            except UserError as error:
                refusal = str(error)
        refusal = all_gather(ctx, refusal)[0]
        if refusal:
            raise UserError(refusal)
        yield


def run_experiment(run: RunConfig, outputs: Path, submissions: Path, extra_info: dict[str, Any],
                   restart: bool = False, log: Callable[[str], None] = print, ctx: DistContext = SINGLE_PROCESS,
                   out_dir: Optional[Path] = None, on_epoch: Optional[Callable[[int, dict], None]] = None,
                   publishes: bool = True) -> dict[str, float]:
    """Train the configured folds (fine-tuning, or a classifier on frozen features when cfg.frozen is set); once
    all folds are done write oof.csv, test_probs.csv and the submission, unless `publishes` is off (a --gpus fold
    job: the command that started it publishes). Under DDP every rank runs this; rank 0 alone writes files,
    reports to the trackers (cfg.tracking) and publishes. `out_dir` (default OUTPUTS/NAME) holds the experiment's
    files; the folds and the image cache stay shared under `outputs`. `on_epoch(fold, history row)` is called
    after every epoch on every rank (see train_fold)."""
    cfg, data = run.cfg, run.data
    if unresolved(cfg):
        raise ValueError(f"run_experiment needs a resolved config; still 'auto': {', '.join(unresolved(cfg))}")
    started = time.time()
    experiment = ExperimentDir(out_dir or outputs / cfg.name)
    fingerprint = run.fingerprint(outputs)
    device = device_for(ctx)
    if ctx.is_main and restart and experiment.path.exists():
        ensure_unlocked(experiment.path)
        shutil.rmtree(experiment.path)
        log(f"--restart: removed {experiment.path}")
    barrier(ctx)
    for fold in range(cfg.data.n_folds):  # before config.yaml is written: a refused run changes nothing
        fold_status(experiment.fold(fold), fingerprint)
    tracker: Tracker = NO_TRACKING
    if ctx.is_main:
        resolved = {**cfg.model_dump(mode="json"),
                    "run": {**run_info(), **run.record(**extra_info), "python": sys.version.split()[0],
                            "data_root": str(data.root), "data_fingerprint": data.fingerprint(),
                            "result_fingerprint": fingerprint, "processes": ctx.world_size,
                            "precision": precision_record(cfg.train.amp, cfg.train.amp_dtype, device)}}
        write_yaml(resolved, experiment.config)
        shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
        tracker = open_trackers(cfg, experiment.path, outputs, resolved, fingerprint)
        if tracker.where:
            log(f"tracking: {tracker.where}")
    barrier(ctx)
    try:
        tracker.start()
        train_folds(run, outputs, experiment, fingerprint, device, log, ctx, tracker, on_epoch)
        result = publish_when_done(run, outputs, experiment, submissions, fingerprint, started, log, tracker) \
            if ctx.is_main and publishes else {}
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            tracker.close()
        raise
    tracker.close()
    return result


def train_folds(run: RunConfig, outputs: Path, experiment: ExperimentDir, fingerprint: str, device,
                log: Callable[[str], None], ctx: DistContext, tracker: Tracker,
                on_epoch: Optional[Callable[[int, dict], None]]) -> None:
    """Every configured fold not done yet, each under its lock; the tracker hears of every epoch and fold."""
    cfg, data = run.cfg, run.data
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    image_cache = cache_for(cfg, outputs)
    if cfg.frozen and ctx.enabled:
        raise UserError(f"{cfg.name} fits a classifier on frozen features in one process; run it without --ddp")
    frozen = FrozenFeatureFolds(cfg, data, outputs / FEATURE_DIR, device, log) if cfg.frozen else None

    def after_epoch(fold: int, record: dict) -> None:
        tracker.epoch(fold, record)  # the null tracker on ranks other than 0
        if on_epoch is not None:
            on_epoch(fold, record)

    for fold in cfg.train.folds if cfg.train.folds is not None else range(cfg.data.n_folds):
        if fold not in range(cfg.data.n_folds):
            raise UserError(f"train.folds: fold {fold} does not exist (data.n_folds={cfg.data.n_folds})")
        fold_dir = experiment.fold(fold)
        with fold_lock(experiment.lock(f"fold{fold}"), f"training {cfg.name} fold {fold}", ctx):
            if fold_status(fold_dir, fingerprint) == "done":  # read under the lock: another run may just have ended it
                log(f"{cfg.name} fold {fold}: already complete, skipped")
                continue
            if frozen:
                result = {"best_macro_f1": frozen.fit_fold(folds, fold, fold_dir, fingerprint)}
            else:
                trained = train_fold(cfg, data, folds, fold, fold_dir, device, fingerprint, log, image_cache, ctx,
                                     after_epoch, outputs=outputs)
                result = {key: getattr(trained, key) for key in FOLD_RESULT_KEYS}
        tracker.fold_end(fold, result)


def publish_when_done(run: RunConfig, outputs: Path, experiment: ExperimentDir, submissions: Path,
                      fingerprint: str, started: float, log: Callable[[str], None],
                      tracker: Tracker) -> dict[str, float]:
    """Once every fold is done: publish (under the experiment's publishing lock) and tell the trackers."""
    cfg, data = run.cfg, run.data
    all_folds = list(range(cfg.data.n_folds))
    pending = [k for k in all_folds if fold_status(experiment.fold(k), fingerprint) != "done"]
    if pending:
        log(f"{cfg.name}: folds {pending} not trained yet; oof.csv and the submission are written once all "
            f"{cfg.data.n_folds} folds are done")
        return {}
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    with locked(experiment.lock("publish"), f"publishing {cfg.name}", wait=True):
        result = publish(cfg.name, experiment.path, assemble_oof(experiment.path, data, folds, all_folds, cfg),
                         mean_test_probs(experiment.path, data, all_folds), data, submissions, started, log)
        curves = plot_training_curves(experiment.path) if tracker.keeps_files else None
        tracker.experiment_end({k: fold_result(experiment.fold(k)) for k in all_folds}, result,
                               [submissions / f"{cfg.name}.csv", experiment.oof, *filter(None, [curves])])
    return result


def command_run(args: argparse.Namespace, experiment: Optional[str] = None) -> None:
    """`bash run.sh EXP`: train an experiment (in several processes with --gpus, --ddp or --nnodes)."""
    from .launch import launch_processes

    name = experiment or args.experiment
    ctx = init_distributed()
    if not ctx.enabled and (args.gpus or args.ddp > 1 or args.nnodes > 1):
        launch_processes(args, name)
        return
    say = log if ctx.is_main else quiet
    try:
        run = resolve_run(name, args.profile, args.overrides, args.data, say)
        run_experiment(run, Path(args.outputs), Path(args.submissions),
                       extra_info={"overrides": list(args.overrides), "command": " ".join(sys.argv)},
                       restart=args.restart, log=say, ctx=ctx, publishes=not args.fold_job)
    finally:
        destroy()


def expand_experiments(patterns: list[str], config_dir: Path) -> list[str]:
    """Config names in the order given, each once. A glob pattern (aug_*) stands for the matching names under
    configs/: the shell hands `aug_*` over unexpanded when nothing in the current folder matches it. A path to a
    config file (configs/aug_blur.yaml, what the shell makes of configs/aug_*.yaml) stands for its name."""
    known = sorted(p.stem for p in config_dir.glob("*.yaml"))
    names: list[str] = []
    for pattern in patterns:
        if pattern.endswith(".yaml"):
            pattern = Path(pattern).stem
        matched = fnmatch.filter(known, pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matched:
            raise UserError(f"ladder: no config under {config_dir} matches '{pattern}' (known: {', '.join(known)})")
        names += [name for name in matched if name not in names]
    return names


def command_ladder(args: argparse.Namespace) -> None:
    """Run experiments in turn (finished folds are skipped); a failing one is reported and the rest go on."""
    names = expand_experiments(args.experiments or ["exp*"], CONFIG_DIR)
    failures = []
    for name in names:
        banner([f"ladder: {name} ({names.index(name) + 1} of {len(names)})"])
        try:
            command_run(args, experiment=name)
        except UserError as error:
            failures.append(f"{name} ({one_line(error)})")
            log(f"ladder: {name} failed: {one_line(error)}")
    if failures:
        raise UserError(f"ladder: {len(failures)} of {len(names)} experiments failed: {'; '.join(failures)}")
