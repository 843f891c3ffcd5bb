"""Hyperparameter tuning with Optuna: TPE sampling over a search space of config keys (configs/tune/*.yaml: cnn
for the 2022 ladder, vit for ViT fine-tuning with layer-wise lr decay, the default picked from the experiment),
median pruning on each epoch's validation macro F1 once the trial's lr warm-up is over, a study in SQLite under
OUTPUTS/tune/ that a rerun resumes.

Every trial is an ordinary experiment run (`run_experiment`, the one training loop, the shared folds) on the folds
given, named STUDY-tNNN with its files in OUTPUTS/tune/STUDY/STUDY-tNNN, so trials never share outputs. The loop
reports each epoch through its `on_epoch` hook; the trial's value is its folds' mean best validation macro F1. A
trial that ends (complete or pruned) keeps no last.pt: a finished fold keeps best.pt, a fold cut short no weights.
At the end: the trials table (CSV and markdown), a picture of the trials, and the best trial's values as a config
delta whose parent is the tuned experiment.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..core.config import parse_overrides, resolve_config
from ..core.errors import UserError
from ..core.files import write_csv, write_text
from ..core.layout import ExperimentDir
from ..core.names import check_name
from ..core.paths import CONFIG_DIR, REPO, TUNE_DIR
from ..core.redact import redact
from ..core.removal import remove_output
from ..core.requirements import require
from ..core.schema import SEED_RANGE, ExperimentConfig
from ..data.competition import CompetitionData
from ..data.folds import shared_folds
from ..pipeline.resolve import RunConfig
from ..pipeline.run import run_experiment
from ..training.fold import fold_rows
from ..training.schedules import warmup_steps
from .study_storage import open_storage
AUTO_SPACE = "auto"
Value = Union[bool, int, float, str, list]


class Param(BaseModel):
    """One config key's range: float or int between low and high (log: sampled on a log scale; step: a grid), or
    one of the categorical choices."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Value]] = None

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter needs choices (and no low/high)")
        elif self.low is None or self.high is None or not self.low < self.high or self.choices is not None:
            raise ValueError(f"a {self.type} parameter needs low < high (and no choices)")
        elif self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        return self

    def values(self) -> list[Value]:
        """The values that bound the range: each is checked against the config schema before any trial runs."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class Space(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    params: dict[str, Param] = Field(..., min_length=1, description="dotted config key -> its range")
    seed: int = Field(0, **SEED_RANGE, description="seed of the TPE sampler")
    random_trials: int = Field(10, ge=0, description="trials sampled at random before TPE models the results")
    pruner_startup_trials: int = Field(5, ge=0, description="finished trials before the median pruner prunes")
    prune_from_epoch: int = Field(1, ge=1, description="the first epoch of a fold at which a trial can be pruned; "
                                  "never before the trial's own lr warm-up is over")


def family_space(cfg: ExperimentConfig) -> str:
    """The search space for an experiment's family: vit for ViT fine-tuning with layer-wise lr decay (exp22-25),
    cnn for the 2022 ladder (exp00-21)."""
    return "vit" if cfg.optimizer.layer_decay is not None else "cnn"


def space_path(name: str, cfg: ExperimentConfig, log: Callable[[str], None] = print) -> Path:
    """The search space file `name` names: a name under configs/tune/, a .yaml path, or 'auto' (the family's)."""
    if name == AUTO_SPACE:
        name = family_space(cfg)
        log(f"{cfg.name}: search space {name} ({(TUNE_DIR / f'{name}.yaml').relative_to(REPO)}), the one for "
            + ("ViT fine-tuning with layer-wise lr decay (optimizer.layer_decay is set)" if name == "vit" else
               "the 2022 ladder (no optimizer.layer_decay)") + "; --space NAME or FILE picks another")
    path = Path(name)
    if path.suffix != ".yaml":
        path = TUNE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TUNE_DIR.glob("*.yaml"))
        raise UserError(f"no search space '{name}': {path} does not exist (known under {TUNE_DIR}: "
                        f"{', '.join(known)})")
    return path


def override(key: str, value: Value) -> str:
    """key=value as the command line writes it (JSON is YAML, so it parses back to the same value)."""
    return f"{key}={json.dumps(value)}"


def load_space(path: Path, experiment: str, profile: Optional[str], overrides: list[str]) -> Space:
    """The search space, checked: its own fields, then every key against the config schema (an unknown key is an
    error naming the file and the key) and every bound or choice as a value of that key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        space = Space.model_validate(data)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{path}: '{where}': {err['msg'].removeprefix('Value error, ')}; fix the search space") \
            from None
    for key, param in space.params.items():
        for value in param.values():
            try:
                resolve_config(experiment, profile, [*overrides, override(key, value)], override_source=str(path))
            except UserError as error:
                if "unknown config key" in str(error):
                    raise
                raise UserError(f"{path}: params.{key}: {value!r} is not a valid value of {key} "
                                f"({str(error).split(': ', 1)[1]})") from None
    return space


def suggest(trial, key: str, param: Param) -> Value:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    if param.type == "int":
        return trial.suggest_int(key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)


def warmup_of(cfg: ExperimentConfig, train_images: int) -> tuple[int, int]:
    """(iterations of the lr warm-up, iterations an epoch) of a fold that trains on `train_images` images, as its
    schedule runs them: no warm-up for a constant lr; the training loader drops the last incomplete batch."""
    steps = train_images // cfg.train.batch_size if train_images > cfg.train.batch_size else 1
    if cfg.scheduler.name == "constant":
        return 0, steps
    return warmup_steps(cfg.scheduler, steps, cfg.train.epochs * steps), steps


def fold_train_images(data: CompetitionData, split: pd.DataFrame, fold: int) -> int:
    """The number of images fold `fold` trains on, as train_fold picks them."""
    return len(fold_rows(data, split, fold)[0])


def drop_checkpoints(out_dir: Path, folds: list[int]) -> int:
    """What an ended trial keeps: no last.pt (what resumes), best.pt (what predicts) only for a finished fold.
    Returns the bytes removed."""
    removed = 0
    for k in folds:
        fold = ExperimentDir(out_dir).fold(k)
        for path in (fold.last,) if fold.done.is_file() else (fold.last, fold.best):
            if path.is_file():
                removed += path.stat().st_size
                remove_output(out_dir, path)
    return removed


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, state, value (mean best validation macro F1), the epochs it reported, its
    parameters, its duration and its experiment folder."""
    rows = []
    for trial in study.trials:
        duration = trial.duration.total_seconds() if trial.duration else None
        value = trial.value if trial.state.name == "COMPLETE" else None  # a pruned trial's is its last epoch's
        rows.append({"trial": trial.number, "state": trial.state.name, "value": value,
                     "epochs_reported": len(trial.intermediate_values),
                     **{key: trial.params.get(key) for key in sorted({k for t in study.trials for k in t.params})},
                     "seconds": round(duration, 1) if duration is not None else None,
                     "experiment": trial.user_attrs.get("experiment", "")})
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_trials(study, path: Path) -> Path:
    """Left: each trial's validation macro F1 per step (epoch), pruned trials dashed where they stopped; right:
    each finished trial's value, the best one starred."""
    from ..pipeline.figures import pyplot, save_png

    plt = pyplot()
    fig, (curves, values) = plt.subplots(1, 2, figsize=(10, 3.6))
    for trial in study.trials:
        steps = sorted(trial.intermediate_values)
        if not steps:
            continue
        pruned = trial.state.name == "PRUNED"
        curves.plot(steps, [trial.intermediate_values[s] for s in steps], marker="x" if pruned else "o",
                    linestyle="--" if pruned else "-", color="tab:red" if pruned else f"C{trial.number % 10}",
                    label=f"trial {trial.number}{' (pruned)' if pruned else ''}")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_xlabel("step (epoch; folds one after another)")
    curves.set_ylabel("validation macro F1")
    curves.set_title("epochs reported to the median pruner")
    if curves.lines:  # a retry that resumed a finished fold reported no epoch
        curves.legend(fontsize=6, ncol=2)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    values.bar([t.number for t in done], [t.value for t in done], color="tab:blue")
    if done:
        best = max(done, key=lambda t: t.value)
        values.plot([best.number], [best.value], marker="*", markersize=14, color="tab:orange", linestyle="none",
                    label=f"best: trial {best.number}")
        values.legend(fontsize=7)
    values.set_xlabel("trial")
    values.set_ylabel("mean best validation macro F1")
    values.set_title("finished trials")
    fig.suptitle(study.study_name)
    fig.tight_layout()
    return save_png(fig, path)


def tidy(params: dict[str, Value]) -> dict[str, Value]:
    """Parameter values as a person writes them: a float drawn on a grid loses its binary tail (0.30000000000000004
    becomes 0.3)."""
    return {key: float(f"{value:.10g}") if isinstance(value, float) else value for key, value in params.items()}


def write_best_config(study, experiment: str, folds: list[int], base_overrides: list[str], path: Path,
                      command: str) -> Path:
    """The best trial's values as a config delta on top of `experiment`, validated by resolving it."""
    best = study.best_trial
    header = (f"# Tuned with Optuna: {redact(command)}\n"
              f"# Study {study.study_name}: trial {best.number} of {len(study.trials)} scored a mean best validation "
              f"macro F1 of {best.value:.4f} on folds {folds}.\n")
    if base_overrides:
        header += f"# The trials also ran with: {redact(' '.join(base_overrides))}\n"
    delta = {"parent": experiment, "description": f"{experiment} tuned (study {study.study_name}, trial {best.number})",
             **parse_overrides([override(key, value) for key, value in tidy(best.params).items()])}
    write_text(header + yaml.safe_dump(delta, sort_keys=False, allow_unicode=True), path)
    resolve_config(path.stem, config_dir=path.parent)
    return path


def run_tune(experiment: str, space_file: Path, trials: int, folds: list[int], timeout: Optional[float],
             base: RunConfig, outputs: Path, base_overrides: list[str], best_config: Optional[Path], command: str,
             log: Callable[[str], None] = print, storage: Optional[str] = None, study_name: Optional[str] = None,
             heartbeat: int = 60) -> Optional[Path]:
    """Run trials until the study holds `trials` finished (complete or pruned) ones or `timeout` seconds pass, as
    one of any number of workers that open the same study in the same storage (default: a SQLite file under
    OUTPUTS/tune). Every trial is the tuned experiment (`base`, resolved on the data) with the trial's values. The
    worker whose trial completes the study (or a single worker that ends by timeout, or finds it complete) writes
    the table, the picture and the best config. Returns the best config's path (None if none was written)."""
    optuna = require("optuna", "optuna", "tune")
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials

    profile = base.profile
    space = load_space(space_file, experiment, profile, base_overrides)
    study_name = check_name(study_name or f"{experiment}-{space_file.stem}", "--study")
    tune_dir = outputs / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    local = storage is None
    storage = storage or f"sqlite:///{(tune_dir / f'{study_name}.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
    # The pruner looks at every step; on_epoch asks it only from each fold's first prunable epoch on.
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage, heartbeat), direction="maximize",
                                load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=space.pruner_startup_trials))
    states = optuna.trial.TrialState
    finished = (states.COMPLETE, states.PRUNED)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    # Seeded; a resumed study moves the seed on instead of repeating the first proposals, and workers of a shared
    # study each draw their own proposals.
    offset = 0 if local else zlib.crc32(worker.encode())
    study.sampler = optuna.samplers.TPESampler(seed=(space.seed + len(study.trials) + offset) % 2 ** 32,
                                               n_startup_trials=space.random_trials)
    log(f"{study_name}: {count(study, finished)} of {trials} trials finished in {_shown(storage)}; worker {worker} "
        f"tuning {', '.join(space.params)} on folds {folds}")

    owned: Optional[int] = None  # the number of the trial whose objective ended by itself (returned, pruned, lost)

    def objective(trial) -> float:
        nonlocal owned
        owned = None
        try:
            value = run_trial(trial)
        except (optuna.TrialPruned, optuna.exceptions.UpdateFinishedTrialError):
            owned = trial.number
            raise
        owned = trial.number
        return value

    def run_trial(trial) -> float:
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        params = {key: suggest(trial, key, param) for key, param in space.params.items()}
        name = f"{study_name}-t{retried if retried is not None else trial.number:03d}"  # a retry resumes its folds
        trial.set_user_attr("experiment", name)
        trial.set_user_attr("worker", worker)
        cfg, _ = resolve_config(experiment, profile, [*base_overrides, *(override(k, v) for k, v in params.items()),
                                                      override("train.folds", folds)])
        run = base.for_config(cfg.model_copy(update={"name": name}))
        out_dir = tune_dir / study_name / name
        log(f"{name}: {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())}"
            + (f" (trial {trial.number}, retrying trial {retried} of a worker that died)" if retried is not None
               else ""))
        split = shared_folds(run.data, run.cfg.data.n_folds, run.cfg.data.fold_seed, outputs / "folds")
        warmups = {k: warmup_of(run.cfg, fold_train_images(run.data, split, k)) for k in folds}
        # A fold is judged from the first epoch that starts after its lr warm-up (and not before prune_from_epoch).
        prune_from = {k: max(space.prune_from_epoch, -(-warm // steps) + 1) for k, (warm, steps) in warmups.items()}
        log(f"{name}: pruning from " + "; ".join(
            f"epoch {prune_from[k]} of fold {k} (lr warm-up {warm} iterations, {warm / steps:.3g} epochs of {steps})"
            for k, (warm, steps) in warmups.items()) + f"; prune_from_epoch {space.prune_from_epoch}")

        def on_epoch(fold: int, record: dict) -> None:
            epoch = int(record["epoch"])
            trial.report(record["val_macro_f1"], folds.index(fold) * run.cfg.train.epochs + epoch)
            if epoch >= prune_from[fold] and trial.should_prune():
                log(f"{name}: pruned at epoch {epoch} of fold {fold}: val macro F1 "
                    f"{record['val_macro_f1']:.4f} is below the median of earlier trials at this step")
                raise optuna.TrialPruned()

        try:
            run_experiment(run, outputs, tune_dir / study_name / "submissions",
                           extra_info={"overrides": base_overrides, "command": command, "study": study_name,
                                       "trial": trial.number, "params": params},
                           log=log, out_dir=out_dir, on_epoch=on_epoch)
        except optuna.TrialPruned:
            discard_checkpoints(name, out_dir)
            raise
        discard_checkpoints(name, out_dir)
        trained = ExperimentDir(out_dir)
        return float(np.mean([trained.fold(k).done_record()["best_macro_f1"] for k in folds]))

    def discard_checkpoints(name: str, out_dir: Path) -> None:
        removed = drop_checkpoints(out_dir, folds)
        if removed:
            log(f"{name}: removed {removed / 2 ** 20:,.0f} MiB of checkpoints (a trial that ended keeps no last.pt; a "
                "finished fold keeps best.pt)")

    completed_it = False

    def report(study, trial) -> None:
        nonlocal completed_it
        value = (f"value {trial.value:.4f}" if trial.state == states.COMPLETE else
                 f"{trial.state.name.lower()} after {len(trial.intermediate_values)} epochs")
        best = f"; best so far trial {study.best_trial.number} ({study.best_value:.4f})" if any(
            t.state == states.COMPLETE for t in study.trials) else ""
        log(f"{study_name}: trial {trial.number} {value}{best}")
        finished_by_then = [t for t in study.get_trials(deepcopy=False, states=finished)
                            if t.datetime_complete <= trial.datetime_complete]
        completed_it = completed_it or len(finished_by_then) == trials

    started, complete_on_arrival, ran = time.time(), count(study, finished) >= trials, 0
    while count(study, finished) < trials and (timeout is None or time.time() - started < timeout):
        if count(study, (*finished, states.RUNNING)) >= trials and not count(study, (states.WAITING,)):
            fail_stale_trials(study)  # the last trials run elsewhere; a dead worker's are failed and enqueued again
            time.sleep(min(5.0, heartbeat / 2))
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(UserError,), callbacks=[report])
        except Exception:
            lost = next((t for t in study.get_trials(deepcopy=False) if t.number == owned), None)
            if lost is None or lost.state != states.FAIL:
                raise
            log(f"{study_name}: trial {lost.number} was failed by another worker while this one ran it (its "
                "heartbeat looked stale there, which queues its retry); this worker goes on")
        ran += 1
    if not (completed_it or complete_on_arrival or (count(study, finished) < trials and ran)):
        log(f"{study_name}: {count(study, finished)} of {trials} trials finished; the worker that finishes the "
            "study writes its table and best config")
        return None
    return write_report(study, experiment, folds, base_overrides, tune_dir / study_name,
                        best_config or CONFIG_DIR / f"{study_name.replace('-', '_')}_tuned.yaml", command, started, log)


def count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _shown(storage: str) -> str:
    """The storage as the log shows it: a local SQLite file as its path, a password in a URL hidden."""
    return redact(storage.removeprefix("sqlite:///"))


def write_report(study, experiment: str, folds: list[int], base_overrides: list[str], study_dir: Path,
                 best_config: Path, command: str, started: float, log: Callable[[str], None]) -> Optional[Path]:
    """trials.csv, trials.md and trials.png under `study_dir`, and the best trial as a config delta."""
    table = trials_table(study)
    write_csv(table, study_dir / "trials.csv")
    write_text(to_markdown(table), study_dir / "trials.md")
    picture = plot_trials(study, study_dir / "trials.png")
    log(f"wrote {study_dir / 'trials.csv'}, {study_dir / 'trials.md'}, {picture}")
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        log(f"{study.study_name}: no trial finished yet, so there is no best config; run more trials")
        return None
    path = write_best_config(study, experiment, folds, base_overrides, best_config, command)
    log(f"{study.study_name}: best trial {study.best_trial.number}, mean best val macro F1 {study.best_value:.4f}: "
        f"{tidy(study.best_trial.params)}; wrote {path} (bash run.sh {path.stem}) | "
        f"{(time.time() - started) / 60:.1f} min")
    return path


def command_tune(args: argparse.Namespace) -> None:
    from ..pipeline.resolve import log, resolve_run

    if args.storage:  # a storage nobody can use stops before the data is read and any trial trains
        open_storage(args.storage, args.heartbeat)
    base = resolve_run(args.experiment, args.profile, args.overrides, args.data)
    run_tune(args.experiment, space_path(args.space, base.cfg, log), args.trials, args.folds, args.timeout, base,
             Path(args.outputs), list(args.overrides), Path(args.best_config) if args.best_config else None,
             " ".join(["bash run.sh tune", *sys.argv[2:]]), log=log, storage=args.storage, study_name=args.study,
             heartbeat=args.heartbeat)
