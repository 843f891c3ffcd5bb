"""Experiment tracking: one interface that the training loop and `run_experiment` call, and three backends behind it.

An experiment is one group of tracked runs, whatever the launch mode (one process, --gpus, --ddp, a resumed run):
- one run per fold, opened by the process that trains the fold, with every history.csv column per epoch; a fold
  that resumes continues its run;
- one experiment run, opened by the process that publishes once every fold is done, with the resolved config, the
  result of every fold (trained now or earlier), the OOF scores and the result files.

- TensorBoard (`tracking.tensorboard`, on by default): OUTPUTS/EXP/tb/fold{k} per fold and OUTPUTS/EXP/tb/experiment
  with the config, the folds' results and the hparams (the result-relevant config keys against the OOF scores).
- Weights & Biases (`tracking.wandb`): runs grouped under the experiment's name (job type fold or experiment, the
  fold as a tag), with ids derived from the experiment and its result fingerprint; offline by default.
- MLflow (`tracking.mlflow`): the experiment run with one nested run per fold, found again by tags, in the file store
  OUTPUTS/mlruns unless `tracking.mlflow_uri` names another store or a server.

Fold files are written before the trackers hear of them, so a tracker that fails (a missing package, a server that
does not answer) stops the run with one line and never costs a finished fold or epoch: rerunning resumes.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..core.config import flatten, result_settings
from ..core.errors import UserError, first_line
from ..core.layout import ExperimentDir
from ..core.redact import redact
from ..core.requirements import pip_line
from ..core.schema import ExperimentConfig
from .locks import locked

MLRUNS_DIR = "mlruns"
# The distribution each backend needs (the message of a missing one names its line of the requirement files).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
# MLflow retries an unreachable server for minutes by default; a run should say so at once instead.
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RUN_TAG = "artist_run"  # MLflow tag that names a tracked run: EXP/FINGERPRINT for the experiment, .../foldK for a fold


def _require(package: str, key: str):
    """Import a backend's package, or stop with the line to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"tracking.{key} is on but the package {package} is not installed; run: "
                        f"{pip_line(PACKAGES[key])} (or set tracking.{key}=false)") from None


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

    def start(self) -> None:
        """Before anything trains: check that the backend answers (a server, a store), so a run that cannot be
        tracked stops at once, not after its first fold."""

    def epoch(self, fold: int, record: dict) -> None:
        """An epoch of `fold` ended: `record` is its row of history.csv (epoch, lr, losses, scores, speed)."""

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        """`fold` finished in this process: its result (best_macro_f1, best_epoch, epochs_run)."""

    def experiment_end(self, folds: dict[int, dict[str, float]], scores: dict[str, float],
                       artifacts: list[Path]) -> None:
        """Every fold is done: each fold's result (from its done.json), the OOF scores and the files to keep."""

    def close(self) -> None:
        """Flush and end whatever run is open."""


def run_key(cfg: ExperimentConfig, fingerprint: str, fold: int | None = None) -> str:
    return f"{cfg.name}/{fingerprint}" + ("" if fold is None else f"/fold{fold}")


class TensorBoardTracker(Tracker):
    name = "TensorBoard"
    remedy = "set tracking.tensorboard=false to run without it"

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, config: dict):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer_class = SummaryWriter
        self.cfg, self.config = cfg, config
        self.root = ExperimentDir(out_dir).tensorboard
        self.where = f"TensorBoard in {self.root}"
        self.folds: dict[int, Any] = {}

    def epoch(self, fold: int, record: dict) -> None:
        if fold not in self.folds:
            self.folds[fold] = self.writer_class(str(self.root / f"fold{fold}"))
        writer = self.folds[fold]
        for key, value in numeric(record).items():
            writer.add_scalar(key, value, global_step=int(record["epoch"]))
        writer.flush()

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        if fold in self.folds:
            self.folds.pop(fold).close()

    def experiment_end(self, folds: dict[int, dict[str, float]], scores: dict[str, float],
                       artifacts: list[Path]) -> None:
        summary = self.writer_class(str(self.root / "experiment"))
        text = yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True)
        summary.add_text("config", "    " + text.replace("\n", "\n    "))  # an indented block: shown verbatim
        for fold, result in sorted(folds.items()):
            for key, value in result.items():
                summary.add_scalar(f"fold_{key}", value, global_step=fold)
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in result_settings(self.cfg).items()}
        summary.add_hparams(hparams, {f"hparam/{key}": value for key, value in scores.items()}, run_name=".")
        summary.close()

    def close(self) -> None:
        for writer in self.folds.values():
            writer.close()
        self.folds.clear()


class WandbTracker(Tracker):
    name = "Weights & Biases"
    keeps_files = True

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, config: dict, fingerprint: str):
        self.wandb = _require("wandb", "wandb")
        self.cfg, self.out_dir, self.config, self.fingerprint = cfg, out_dir, config, fingerprint
        self.mode = os.environ.get("WANDB_MODE") or cfg.tracking.wandb_mode
        self.remedy = ("set tracking.wandb=false to run without it" if self.mode == "offline" else
                       "run `wandb login` (or set WANDB_API_KEY), or set tracking.wandb_mode=offline")
        self.where = (f"W&B offline in {out_dir / 'wandb'} (upload: wandb sync {out_dir / 'wandb'}/offline-run-*)"
                      if self.mode == "offline" else f"W&B project {cfg.tracking.wandb_project}")
        self.runs: dict[int | None, Any] = {}  # fold (None: the experiment) -> its open run

    def run_id(self, fold: int | None) -> str:
        """The same id for the same experiment, config and data in any process, so a resumed fold continues its run
        (W&B ids: letters, digits, - and _)."""
        return re.sub(r"[^A-Za-z0-9_-]", "-", run_key(self.cfg, self.fingerprint, fold))[:128]

    def _open(self, fold: int | None):
        if fold not in self.runs:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            settings = self.wandb.Settings(console="off", silent=True, init_timeout=60)
            name = self.cfg.name if fold is None else f"{self.cfg.name} fold {fold}"
            self.runs[fold] = self.wandb.init(
                project=self.cfg.tracking.wandb_project, id=self.run_id(fold), resume="allow", name=name,
                group=self.cfg.name, job_type="experiment" if fold is None else "fold",
                tags=[] if fold is None else [f"fold{fold}"], mode=self.mode, dir=str(self.out_dir),
                config=self.config, settings=settings, reinit="create_new")
            if fold is not None:
                self.runs[fold].define_metric("epoch")
                self.runs[fold].define_metric("*", step_metric="epoch")
        return self.runs[fold]

    def _finish(self, fold: int | None) -> None:
        run = self.runs.pop(fold, None)
        if run is not None:
            run.finish()

    def epoch(self, fold: int, record: dict) -> None:
        self._open(fold).log({"epoch": int(record["epoch"]), **numeric(record)})

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        self._open(fold).summary.update(result)
        self._finish(fold)

    def experiment_end(self, folds: dict[int, dict[str, float]], scores: dict[str, float],
                       artifacts: list[Path]) -> None:
        run = self._open(None)
        run.summary.update({f"fold{fold}/{key}": value for fold, result in folds.items()
                            for key, value in result.items()})
        run.summary.update(scores)
        pictures = {path.stem: self.wandb.Image(str(path)) for path in artifacts if path.suffix == ".png"}
        if pictures:
            run.log(pictures)
        artifact = self.wandb.Artifact(f"{self.cfg.name}-results", type="results")
        for path in artifacts:
            artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)
        self._finish(None)

    def close(self) -> None:
        for fold in list(self.runs):
            self._finish(fold)


class MlflowTracker(Tracker):
    name = "MLflow"
    keeps_files = True

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, outputs: Path, config: dict, fingerprint: str):
        _require("mlflow", "mlflow")
        for key, value in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(key, value)
        self.uri = cfg.tracking.mlflow_uri
        if self.uri is None:
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a database or a server is the
            # alternative (tracking.mlflow_uri=sqlite:///outputs/mlruns.db).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.uri = (outputs / MLRUNS_DIR).resolve().as_uri()
        shown = redact(self.uri)  # the client gets self.uri itself
        self.remedy = (f"check the MLflow server at {shown} (tracking.mlflow_uri) or set tracking.mlflow=false"
                       if self.uri.startswith(("http:", "https:")) else "set tracking.mlflow=false to run without it")
        self.where = f"MLflow at {shown} (experiment {cfg.tracking.mlflow_experiment}, run {cfg.name})"
        self.cfg, self.out_dir, self.config, self.fingerprint = cfg, out_dir, config, fingerprint
        self.client = None
        self.runs: dict[int | None, str] = {}  # fold (None: the experiment) -> run id

    def _client(self):
        if self.client is None:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            client, name = MlflowClient(tracking_uri=self.uri), self.cfg.tracking.mlflow_experiment
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    self.experiment_id = client.create_experiment(name)
                except MlflowException:  # another process (a --gpus fold job) created it meanwhile
                    experiment = client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
            if experiment is not None:
                self.experiment_id = experiment.experiment_id
            self.client = client
        return self.client

    def start(self) -> None:
        self._client()

    def _run(self, fold: int | None) -> str:
        """The run of the experiment (fold None) or of a fold: found by its tag, else created (a fold's nested in
        the experiment's). Looked up and created under a lock, so processes that start together make one run."""
        if fold in self.runs:
            return self.runs[fold]
        from mlflow.entities import Param

        client, key = self._client(), run_key(self.cfg, self.fingerprint, fold)
        with locked(ExperimentDir(self.out_dir).lock("tracking"), f"tracking {self.cfg.name}", wait=True):
            found = client.search_runs([self.experiment_id], filter_string=f"tags.{RUN_TAG} = '{key}'", max_results=1)
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                tags = {RUN_TAG: key, "experiment": self.cfg.name}
                if fold is not None:
                    tags.update({"fold": str(fold), "mlflow.parentRunId": self._run(None)})
                name = self.cfg.name if fold is None else f"{self.cfg.name} fold {fold}"
                run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in flatten(self.config).items()]
                for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                    client.log_batch(run_id, params=params[first:first + 100])
        self.runs[fold] = run_id
        return run_id

    def _metrics(self, fold: int | None, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client().log_batch(self._run(fold), metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def _finish(self, fold: int | None) -> None:
        run_id = self.runs.pop(fold, None)
        if run_id is not None:
            self.client.set_terminated(run_id)

    def epoch(self, fold: int, record: dict) -> None:
        self._metrics(fold, numeric(record), int(record["epoch"]))

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        self._metrics(fold, result, 0)
        self._finish(fold)

    def experiment_end(self, folds: dict[int, dict[str, float]], scores: dict[str, float],
                       artifacts: list[Path]) -> None:
        self._metrics(None, {f"fold{fold}/{key}": value for fold, result in folds.items()
                             for key, value in result.items()} | scores, 0)
        for path in artifacts:
            self.client.log_artifact(self.runs[None], str(path))
        self._finish(None)

    def close(self) -> None:
        for fold in list(self.runs):
            self._finish(fold)


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
                failure = redact(first_line(error, 200))
                raise UserError(f"tracking: {backend.name} failed ({failure}); {backend.remedy}; finished folds and "
                                "epochs are kept, rerun the same command to continue") from None

    def start(self) -> None:
        self._each(lambda backend: backend.start())

    def epoch(self, fold: int, record: dict) -> None:
        self._each(lambda backend: backend.epoch(fold, record))

    def fold_end(self, fold: int, result: dict[str, float]) -> None:
        self._each(lambda backend: backend.fold_end(fold, result))

    def experiment_end(self, folds: dict[int, dict[str, float]], scores: dict[str, float],
                       artifacts: list[Path]) -> None:
        self._each(lambda backend: backend.experiment_end(folds, scores, artifacts))

    def close(self) -> None:
        self._each(lambda backend: backend.close())


NO_TRACKING = Tracker()


def open_trackers(cfg: ExperimentConfig, out_dir: Path, outputs: Path, config: dict, fingerprint: str) -> Trackers:
    """The backends `cfg.tracking` turns on, each checked (package installed) before anything trains. `config` is
    the resolved config as config.yaml holds it; `fingerprint` the result fingerprint, which names the runs."""
    backends: list[Tracker] = []
    if cfg.tracking.tensorboard:
        backends.append(TensorBoardTracker(cfg, out_dir, config))
    if cfg.tracking.wandb:
        backends.append(WandbTracker(cfg, out_dir, config, fingerprint))
    if cfg.tracking.mlflow:
        backends.append(MlflowTracker(cfg, out_dir, outputs, config, fingerprint))
    return Trackers(backends)
