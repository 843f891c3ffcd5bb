"""One experiment end to end: its resolved config on disk, the shared folds, every fold trained (finished folds of
the same config and data are kept, a fold another run is training is refused), then the OOF table, the
fold-averaged test probabilities and the submission (src/pipeline/publish.py). `bash run.sh EXP` and `ladder`."""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from ..core.config import run_info
from ..core.distributed import SINGLE_PROCESS, DistContext, all_gather, barrier, destroy, device_for, init_distributed
from ..core.errors import UserError, one_line
from ..core.files import write_yaml
from ..core.layout import ExperimentDir, FoldDir, check_free_for, read_saved
from ..core.paths import CONFIG_DIR
from ..core.redact import redact_all
from ..core.removal import remove_output, remove_stale_temporaries
from ..core.runtime import precision_record
from ..core.schema import ExperimentConfig
from ..data.folds import shared_folds
from ..data.geometry import unresolved
from ..data.image_cache import cache_for
from ..training.fold import train_fold
from ..training.frozen import FEATURE_DIR, FrozenFeatureFolds
from .figures import plot_training_curves
from .locks import held_elsewhere, locked
from .publish import assemble_oof, mean_test_probs, publish
from .resolve import RunConfig, banner, log, quiet, resolve_run
from .tracking import NO_TRACKING, Tracker, open_trackers

FOLD_RESULT_KEYS = ("best_macro_f1", "best_epoch", "epochs_run")  # what a fold's done.json tells the trackers
T = TypeVar("T")


def fold_status(fold_dir: FoldDir, fingerprint: str, weights: bool = True) -> str:
    """'done' when the fold finished with this config and data and its files are whole; 'damaged' when done.json
    marks it finished but it cannot be used as it is (FoldDir.damage: a run that trains the fold trains it again);
    else 'todo'. A fold finished with another config or data stops the run with one line: it is never mixed with
    folds of another config. `weights`: whether the fold has a network (best.pt), false for frozen features."""
    if not fold_dir.done.is_file():
        return "todo"
    check_fingerprint(fold_dir, fingerprint)
    return "damaged" if fold_dir.damage(weights) else "done"


def check_fingerprint(fold_dir: FoldDir, fingerprint: str) -> None:
    """Stop with one line when the fold finished with another config or data than `fingerprint`'s."""
    done = fold_dir.done_record() if fold_dir.done.is_file() else None
    if done is not None and done["fingerprint"] != fingerprint:
        raise UserError(f"{fold_dir.path} holds a fold trained with another config or data; rerun with --restart to "
                        "train it again (--restart removes the folds the run trains: train.folds, all when unset), or "
                        "name a new experiment (name=...)")


def fold_result(fold_dir: FoldDir) -> dict[str, float]:
    """What a done fold's done.json says of its result (best_macro_f1; best_epoch and epochs_run when trained)."""
    done = fold_dir.done_record()
    return {key: done[key] for key in FOLD_RESULT_KEYS if key in done}


def folds_to_train(cfg: ExperimentConfig) -> list[int]:
    """train.folds (every fold when unset), each checked to exist."""
    folds = list(range(cfg.data.n_folds)) if cfg.train.folds is None else list(dict.fromkeys(cfg.train.folds))
    for fold in folds:
        if fold not in range(cfg.data.n_folds):
            raise UserError(f"train.folds: fold {fold} does not exist (data.n_folds={cfg.data.n_folds})")
    return folds


def on_main(ctx: DistContext, action: Callable[[], T]) -> Optional[T]:
    """`action()` on rank 0 (its result there, None on the other ranks); a UserError it raises stops every rank with
    the same line."""
    result, refusal = None, None
    if ctx.is_main:
        try:
            result = action()
        except UserError as error:
            refusal = str(error)
    refusal = all_gather(ctx, refusal)[0]
    if refusal:
        raise UserError(refusal)
    return result


@contextlib.contextmanager
def holding_folds(experiment: ExperimentDir, folds: list[int], name: str,
                  ctx: DistContext = SINGLE_PROCESS) -> Iterator[None]:
    """The locks (src/pipeline/locks.py) of the folds a run trains, all taken before it writes anything into the
    experiment's folder and held until it ends, by rank 0 for every rank. When another run holds one, this one stops
    with one line, having written nothing."""
    with contextlib.ExitStack() as held:
        on_main(ctx, lambda: [held.enter_context(locked(experiment.lock(f"fold{k}"), f"training {name} fold {k}"))
                              for k in folds])
        yield


def check_folds(experiment: ExperimentDir, cfg: ExperimentConfig, fingerprint: str, retrained: list[int]) -> None:
    """Stop (one line, nothing written) at a fold finished with another config or data, unless it is one of the
    folds --restart is about to train again (`retrained`)."""
    for fold in range(cfg.data.n_folds):
        if fold in retrained:
            continue
        try:
            check_fingerprint(experiment.fold(fold), fingerprint)
        except UserError:
            if not retrained:
                raise
            raise UserError(f"{experiment.fold(fold).path} holds a fold trained with another config or data, and "
                            f"--restart trains only folds {retrained} again (train.folds): add fold {fold} to "
                            "train.folds, leave train.folds unset to train every fold again, or name a new "
                            "experiment (name=...)") from None


def discard_for_restart(experiment: ExperimentDir, folds: list[int], submissions: Path, name: str,
                        log: Callable[[str], None]) -> None:
    """--restart: remove the folds the run trains again and what was published from them (oof.csv, test_probs.csv,
    the submission, their TensorBoard records); the experiment's other folds, logs and tracked runs stay. The
    caller holds the folds' locks."""
    if not folds:
        return
    parts = [*(experiment.fold(k).path for k in folds), *(experiment.tensorboard / f"fold{k}" for k in folds),
             experiment.tensorboard / "experiment", experiment.oof, experiment.test_probs]
    submission = submissions / f"{name}.csv"
    with locked(experiment.lock("publish"), f"publishing {name}", wait=True):
        gone = [path for path in parts if os.path.lexists(path)]
        for path in gone:
            remove_output(experiment.path, path)
        shown = [str(path.relative_to(experiment.path)) for path in gone]
        if submission.is_file():
            remove_output(submissions, submission)
            shown.append(str(submission))
    log(f"--restart: removed {', '.join(shown) or 'nothing'} from {experiment.path}, to train folds {folds} again")


def refuse_another_config(experiment: ExperimentDir, folds: list[int], fingerprint: str, name: str) -> None:
    """Stop with one line when a run of another config (another result fingerprint in the config.yaml there) holds
    one of the experiment's locks other than those of `folds`: config.yaml describes the folds, and predict, tta and
    export rebuild the model from it."""
    saved = read_saved(experiment.path, required=False)
    if saved is None or saved.run.get("result_fingerprint") in (None, fingerprint):
        return
    ours = {experiment.lock(f"fold{k}") for k in folds} | {experiment.lock("config")}
    for lock in experiment.locks():
        who = None if lock in ours else held_elsewhere(lock)
        if who:
            raise UserError(f"{name} is being trained with another config ({experiment.config}) by {who} (lock "
                            f"{lock}); wait for it to end or stop it, or name this run otherwise (name=...)")


def claim_folder(experiment: ExperimentDir, cfg: ExperimentConfig, folds: list[int], fingerprint: str,
                 restart: bool, submissions: Path, log: Callable[[str], None],
                 resolved: Optional[dict[str, Any]] = None) -> None:
    """With the locks of `folds` held by the caller, under the experiment's config lock: the checks that refuse the
    run (a run of another config in progress, a fold of another config), then --restart's removal and config.yaml
    (`resolved`, when given), so nothing is removed or written by a run that is refused."""
    with locked(experiment.lock("config"), f"writing {cfg.name}'s config.yaml", wait=True):
        refuse_another_config(experiment, folds, fingerprint, cfg.name)
        check_folds(experiment, cfg, fingerprint, retrained=folds if restart else [])
        if restart:
            discard_for_restart(experiment, folds, submissions, cfg.name, log)
        if resolved is not None:
            write_yaml(resolved, experiment.config)


def prepare_folder(run: RunConfig, outputs: Path, experiment: ExperimentDir, folds: list[int], fingerprint: str,
                   restart: bool, submissions: Path, record: dict[str, Any], log: Callable[[str], None]) -> Tracker:
    """What a run does to its folder before training, on rank 0 while it holds the locks of the folds it trains:
    the checks, --restart and config.yaml (passwords in URLs hidden; claim_folder), the removal of what killed writes
    left, the shared folds and the trackers."""
    cfg = run.cfg
    resolved = redact_all({**cfg.model_dump(mode="json"), "run": record})
    claim_folder(experiment, cfg, folds, fingerprint, restart, submissions, log, resolved)
    for fold in folds:  # every writer into a fold's folder holds its lock, so what is there now is left over
        remove_stale_temporaries(experiment.fold(fold).path, any_writer=True, log=log)
    remove_stale_temporaries(experiment.path, log=log)
    shared_folds(run.data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    tracker = open_trackers(cfg, experiment.path, outputs, resolved, fingerprint)
    if tracker.where:
        log(f"tracking: {tracker.where}")
    return tracker


def run_experiment(run: RunConfig, outputs: Path, submissions: Path, extra_info: dict[str, Any],
                   restart: bool = False, log: Callable[[str], None] = print, ctx: DistContext = SINGLE_PROCESS,
                   out_dir: Optional[Path] = None, on_epoch: Optional[Callable[[int, dict], None]] = None,
                   publishes: bool = True) -> dict[str, float]:
    """Train the configured folds (fine-tuning, or a classifier on frozen features when cfg.frozen is set); once
    all folds are done write oof.csv, test_probs.csv and the submission, unless `publishes` is off (a --gpus fold
    job: the command that started it publishes). Under DDP every rank runs this; rank 0 alone writes files,
    reports to the trackers (cfg.tracking) and publishes. `out_dir` (default OUTPUTS/NAME) holds the experiment's
    files; the folds and the image cache stay shared under `outputs`. `on_epoch(fold, history row)` is called
    after every epoch on every rank (see train_fold). Nothing is written into the experiment's folder before the
    run holds the locks of the folds it trains and has passed every check; --restart then removes exactly those
    folds and what was published from them."""
    cfg, data = run.cfg, run.data
    if unresolved(cfg):
        raise ValueError(f"run_experiment needs a resolved config; still 'auto': {', '.join(unresolved(cfg))}")
    started = time.time()
    experiment = ExperimentDir(out_dir or outputs / cfg.name)
    fingerprint = run.fingerprint(outputs)
    device = device_for(ctx)
    folds = folds_to_train(cfg)
    check_free_for(experiment.path, "experiment")
    with holding_folds(experiment, folds, cfg.name, ctx):
        record = {**run_info(), **run.record(**extra_info), "python": sys.version.split()[0],
                  "data_root": str(data.root), "data_fingerprint": data.fingerprint(),
                  "result_fingerprint": fingerprint, "processes": ctx.world_size,
                  "precision": precision_record(cfg.train.amp, cfg.train.amp_dtype, device)} if ctx.is_main else {}
        tracker = on_main(ctx, lambda: prepare_folder(run, outputs, experiment, folds, fingerprint, restart,
                                                      submissions, record, log)) or NO_TRACKING
        try:
            tracker.start()
            train_folds(run, outputs, experiment, folds, fingerprint, device, log, ctx, tracker, on_epoch)
            result = publish_when_done(run, outputs, experiment, submissions, fingerprint, started, log, tracker) \
                if ctx.is_main and publishes else {}
        except BaseException:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                tracker.close()
            raise
        tracker.close()
    return result


def train_folds(run: RunConfig, outputs: Path, experiment: ExperimentDir, folds_todo: list[int], fingerprint: str,
                device, log: Callable[[str], None], ctx: DistContext, tracker: Tracker,
                on_epoch: Optional[Callable[[int, dict], None]]) -> None:
    """Every fold of `folds_todo` not done yet (their locks held by the caller); a finished fold whose files are
    damaged is trained again, saying so. The tracker hears of every epoch and fold."""
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

    for fold in folds_todo:
        fold_dir = experiment.fold(fold)
        # rank 0's reading for every rank: it removes a damaged fold before the others could look
        status = all_gather(ctx, on_main(ctx, lambda: fold_status(fold_dir, fingerprint, not cfg.frozen)))[0]
        if status == "done":
            log(f"{cfg.name} fold {fold}: already complete, skipped")
            continue
        if status == "damaged" and ctx.is_main:
            log(f"{cfg.name} fold {fold} was finished, but {fold_dir.damage(not cfg.frozen)}: training the fold again")
            remove_output(experiment.path, fold_dir.path)
        barrier(ctx)
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
    status = {k: fold_status(experiment.fold(k), fingerprint, not cfg.frozen) for k in all_folds}
    pending = [k for k in all_folds if status[k] != "done"]
    for k in (k for k in pending if status[k] == "damaged"):
        log(f"{cfg.name} fold {k} was finished, but {experiment.fold(k).damage(not cfg.frozen)}: a run that trains it "
            "(train.folds) trains it again")
    if pending:
        log(f"{cfg.name}: folds {pending} not trained yet; oof.csv and the submission are written once all "
            f"{cfg.data.n_folds} folds are done")
        return {}
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    with locked(experiment.lock("publish"), f"publishing {cfg.name}", wait=True):
        oof = assemble_oof(experiment.path, data, folds, all_folds, cfg, remedy="rerun with --restart")
        result = publish(cfg.name, experiment.path, oof,
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
