"""Experiment tracking: one interface that the training loop and `run_experiment` call, and three backends behind it.

- TensorBoard (`tracking.tensorboard`, on by default): one run per fold in OUTPUTS/EXP/tb/fold{k} with every
  history.csv column per epoch, and OUTPUTS/EXP/tb/experiment with the resolved config, the folds' results and the
  hparams (the result-relevant config keys against the OOF macro F1).
- Weights & Biases (`tracking.wandb`): one run per experiment (grouped under its name), offline by default.
- MLflow (`tracking.mlflow`): one run per experiment, in the file store OUTPUTS/mlruns unless `tracking.mlflow_uri`
  names another store or a server.

Fold files are written before the trackers hear of them, so a tracker that fails (a missing package, a server that
does not answer) stops the run with one line and never costs a finished fold or epoch: rerunning resumes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import NON_RESULT_KEYS, ExperimentConfig, flatten
from .errors import UserError

TENSORBOARD_DIR = "tb"
MLRUNS_DIR = "mlruns"
# What each backend needs, as requirements.txt pins it (the message of a missing package names the line).
PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0", "mlflow": "mlflow-skinny==3.17.2"}
# MLflow retries an unreachable server for minutes by default; a run should say so at once instead.
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _require(package: str, key: str):
    """Import a backend's package, or stop with the line to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"tracking.{key} is on but the package {package} is not installed; run: pip install "
                        f"{PACKAGES[key]} (or set tracking.{key}=false)") from None


def numeric(record: dict) -> dict[str, float]:
    """The numbers of a history row (NaN-free), without the epoch itself."""
    return {key: float(value) for key, value in record.items()
            if key != "epoch" and isinstance(value, (int, float)) and value == value}


class Tracker:
    """What a run reports. This base class ignores everything: the null tracker."""

    name = "none"
    remedy = ""
    where = ""  # where the run's records go, for the log
    keeps_files = False  # whether experiment_end's files are stored (the picture is only drawn for such a tracker)

    def start(self, config: dict) -> None:
        """The run begins: `config` is the resolved config as written to config.yaml (provenance under 'run')."""

    def epoch(self, fold: int, record: dict) -> None:
        """An epoch of `fold` ended: `record` is its row of history.csv (epoch, lr, losses, scores, speed)."""

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        """`fold` finished: the numbers of its done.json (best_macro_f1; best_epoch and epochs_run when trained)."""

    def experiment_end(self, scores: dict[str, float], artifacts: list[Path]) -> None:
        """Every fold is done: the OOF scores and the files to keep (submission, OOF, pictures)."""

    def close(self) -> None:
        """Flush and end the run."""


class TensorBoardTracker(Tracker):
    name = "TensorBoard"
    remedy = "set tracking.tensorboard=false to run without it"

    def __init__(self, cfg: ExperimentConfig, out_dir: Path):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer_class = SummaryWriter
        self.cfg = cfg
        self.root = out_dir / TENSORBOARD_DIR
        self.where = f"TensorBoard in {self.root}"
        self.folds: dict[int, Any] = {}
        self.summary = None

    def _fold_writer(self, fold: int):
        if fold not in self.folds:
            self.folds[fold] = self.writer_class(str(self.root / f"fold{fold}"))
        return self.folds[fold]

    def start(self, config: dict) -> None:
        self.summary = self.writer_class(str(self.root / "experiment"))
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        self.summary.add_text("config", "    " + text.replace("\n", "\n    "))  # an indented block: shown verbatim
        self.summary.flush()

    def epoch(self, fold: int, record: dict) -> None:
        writer = self._fold_writer(fold)
        for key, value in numeric(record).items():
            writer.add_scalar(key, value, global_step=int(record["epoch"]))
        writer.flush()

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        if fold in self.folds:
            self.folds.pop(fold).close()
        for key, value in result.items():
            self.summary.add_scalar(f"fold_{key}", value, global_step=fold)
        self.summary.flush()

    def experiment_end(self, scores: dict[str, float], artifacts: list[Path]) -> None:
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in result_settings(self.cfg).items()}
        self.summary.add_hparams(hparams, {f"hparam/{key}": value for key, value in scores.items()}, run_name=".")
        self.summary.flush()

    def close(self) -> None:
        for writer in [*self.folds.values(), self.summary]:
            if writer is not None:
                writer.close()
        self.folds.clear()


class WandbTracker(Tracker):
    name = "Weights & Biases"
    keeps_files = True

    def __init__(self, cfg: ExperimentConfig, out_dir: Path):
        self.wandb = _require("wandb", "wandb")
        self.cfg = cfg
        self.out_dir = out_dir
        self.mode = os.environ.get("WANDB_MODE") or cfg.tracking.wandb_mode
        self.remedy = ("set tracking.wandb=false to run without it" if self.mode == "offline" else
                       "run `wandb login` (or set WANDB_API_KEY), or set tracking.wandb_mode=offline")
        self.where = (f"W&B offline in {out_dir / 'wandb'} (upload: wandb sync {out_dir / 'wandb'}/offline-run-*)"
                      if self.mode == "offline" else f"W&B project {cfg.tracking.wandb_project}")
        self.run = None
        self.folds: set[int] = set()

    def start(self, config: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        settings = self.wandb.Settings(console="off", silent=True, init_timeout=60)
        self.run = self.wandb.init(project=self.cfg.tracking.wandb_project, name=self.cfg.name, group=self.cfg.name,
                                   job_type="train", mode=self.mode, dir=str(self.out_dir), config=config,
                                   settings=settings)

    def epoch(self, fold: int, record: dict) -> None:
        if fold not in self.folds:  # each fold's curves against its own epochs
            self.run.define_metric(f"fold{fold}/epoch")
            self.run.define_metric(f"fold{fold}/*", step_metric=f"fold{fold}/epoch")
            self.folds.add(fold)
        self.run.log({f"fold{fold}/epoch": int(record["epoch"]),
                      **{f"fold{fold}/{key}": value for key, value in numeric(record).items()}})

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        self.run.summary.update({f"fold{fold}/{key}": value for key, value in result.items()})

    def experiment_end(self, scores: dict[str, float], artifacts: list[Path]) -> None:
        self.run.summary.update(scores)
        pictures = {path.stem: self.wandb.Image(str(path)) for path in artifacts if path.suffix == ".png"}
        if pictures:
            self.run.log(pictures)
        artifact = self.wandb.Artifact(f"{self.cfg.name}-results", type="results")
        for path in artifacts:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowTracker(Tracker):
    name = "MLflow"
    keeps_files = True

    def __init__(self, cfg: ExperimentConfig, outputs: Path):
        _require("mlflow", "mlflow")
        for key, value in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(key, value)
        self.uri = cfg.tracking.mlflow_uri
        if self.uri is None:
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a database or a server is the
            # alternative (tracking.mlflow_uri=sqlite:///outputs/mlruns.db).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.uri = (outputs / MLRUNS_DIR).resolve().as_uri()
        self.remedy = (f"check the MLflow server at {self.uri} (tracking.mlflow_uri) or set tracking.mlflow=false"
                       if self.uri.startswith(("http:", "https:")) else "set tracking.mlflow=false to run without it")
        self.where = f"MLflow at {self.uri} (experiment {cfg.tracking.mlflow_experiment}, run {cfg.name})"
        self.cfg = cfg
        self.client = None
        self.run_id = None

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def start(self, config: dict) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(self.cfg.tracking.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(self.cfg.tracking.mlflow_experiment))
        run = self.client.create_run(experiment_id, run_name=self.cfg.name, tags={"experiment": self.cfg.name})
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[first:first + 100])

    def epoch(self, fold: int, record: dict) -> None:
        self._metrics({f"fold{fold}/{key}": value for key, value in numeric(record).items()}, int(record["epoch"]))

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        self._metrics({f"fold{fold}/{key}": value for key, value in result.items()}, 0)

    def experiment_end(self, scores: dict[str, float], artifacts: list[Path]) -> None:
        self._metrics(scores, 0)
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


class Trackers(Tracker):
    """The configured backends, called in turn. A backend that raises stops the run with one line naming it and
    what to do; the caller has written its files before calling, so nothing finished is lost."""

    def __init__(self, backends: list[Tracker]):
        self.backends = backends
        self.keeps_files = any(backend.keeps_files for backend in backends)
        self.where = "; ".join(backend.where for backend in backends)

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for backend in self.backends:
            try:
                call(backend)
            except UserError:
                raise
            except Exception as error:  # noqa: BLE001 - each library fails in its own types (HTTP, IO, protobuf)
                raise UserError(f"tracking: {backend.name} failed ({_first_line(error)}); {backend.remedy}; finished "
                                "folds and epochs are kept, rerun the same command to continue") from None

    def start(self, config: dict) -> None:
        self._each(lambda backend: backend.start(config))

    def epoch(self, fold: int, record: dict) -> None:
        self._each(lambda backend: backend.epoch(fold, record))

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        self._each(lambda backend: backend.fold_end(fold, result))

    def experiment_end(self, scores: dict[str, float], artifacts: list[Path]) -> None:
        self._each(lambda backend: backend.experiment_end(scores, artifacts))

    def close(self) -> None:
        self._each(lambda backend: backend.close())


NO_TRACKING = Tracker()


def result_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config keys that change what a fold learns (the hparams of a run)."""
    return {key: value for key, value in flatten(cfg.model_dump(mode="json")).items() if key not in NON_RESULT_KEYS}


def open_trackers(cfg: ExperimentConfig, out_dir: Path, outputs: Path) -> Trackers:
    """The backends `cfg.tracking` turns on, each checked (package installed) before anything trains."""
    backends: list[Tracker] = []
    if cfg.tracking.tensorboard:
        backends.append(TensorBoardTracker(cfg, out_dir))
    if cfg.tracking.wandb:
        backends.append(WandbTracker(cfg, out_dir))
    if cfg.tracking.mlflow:
        backends.append(MlflowTracker(cfg, outputs))
    return Trackers(backends)
