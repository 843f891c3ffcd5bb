"""Experiment tracking: what TensorBoard, MLflow and Weights & Biases hold, read back through each library's own
reader, equals history.csv, done.json and the OOF scores; missing packages and unreachable servers stop with one
line and keep finished folds; tracking keys never change the result fingerprint."""
from __future__ import annotations

import json
import shutil
import struct
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from src.tools.board import board_command
from src.core.config import resolve_config
from src.data.competition import load_competition_data
from src.core.errors import UserError
from src.core.metrics import scores

from .conftest import TINY_RUN, run_cli

HISTORY_NUMBERS = ["lr", "train_loss", "val_loss", "val_macro_f1", "val_accuracy", "val_macro_f1_paintings",
                   "seconds", "train_images_per_s", "data_wait_share"]


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def assert_tensorboard_matches_history(fold_dir: Path, tb_dir: Path) -> None:
    history = pd.read_csv(fold_dir / "history.csv")
    logged = events(tb_dir)
    assert sorted(logged.Tags()["scalars"]) == sorted(HISTORY_NUMBERS)
    for column in HISTORY_NUMBERS:
        points = logged.Scalars(column)
        assert [p.step for p in points] == history["epoch"].tolist(), column
        np.testing.assert_allclose([p.value for p in points], history[column], rtol=1e-6, err_msg=column)


def oof_scores(exp_dir: Path, root: Path) -> dict[str, float]:
    data = load_competition_data(root, log=lambda _: None)
    oof = pd.read_csv(exp_dir / "oof.csv", dtype={"id": str})
    labels = oof["artist"].map({artist: i for i, artist in enumerate(data.classes)}).to_numpy()
    return scores(labels, oof[data.classes].to_numpy())


@pytest.mark.slow
def test_tensorboard_logs_every_fold_epoch_like_history_and_the_oof_score_as_hparams(finished_run):
    exp = finished_run["exp"]
    for fold in range(5):
        assert_tensorboard_matches_history(exp / f"fold{fold}", exp / "tb" / f"fold{fold}")
    summary = events(exp / "tb" / "experiment")
    best = [json.loads((exp / f"fold{k}" / "done.json").read_text())["best_macro_f1"] for k in range(5)]
    latest = summary.Scalars("fold_best_macro_f1")[-5:]  # every publication logs every fold (a rerun publishes again)
    assert [p.step for p in latest] == list(range(5))
    np.testing.assert_allclose([p.value for p in latest], best, rtol=1e-6)
    oof = oof_scores(exp, finished_run["root"])
    assert summary.Scalars("hparam/cv_macro_f1")[-1].value == pytest.approx(oof["macro_f1"], rel=1e-6)
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        summary.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["model.backbone"].string_value == "tf_efficientnet_lite0"
    assert hparams["input.img_size"].number_value == 48 and "tracking.wandb" not in hparams
    # the latest run's config: a rerun of a finished experiment (another test does one) logs it again
    config_text = summary.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(textwrap.dedent(config_text)) == yaml.safe_load((exp / "config.yaml").read_text())


def wandb_records(run_dir: Path) -> list:
    """The records of a W&B offline run file (run-ID.wandb), decoded with W&B's own protobuf classes. wandb 0.31 no
    longer ships a Python reader for these files, so the framing (LevelDB's log format with W&B's header: 32 KiB
    blocks of records, each a CRC-32, a length, a type and its bytes) is undone here, checksums verified."""
    from wandb.proto import wandb_internal_pb2

    blob = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert blob[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    records, position, pending = [], 7, b""
    while position + 7 <= len(blob):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", blob[position:position + 7])
        data = blob[position + 7:position + 7 + length]
        assert checksum == zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        position += 7 + length
        pending += data
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_key(item) -> str:
    """A history or summary item's key: W&B writes it as `key`, or as the path `nested_key`."""
    return item.key or "/".join(item.nested_key)


def finished_copy(finished_run, work: Path, keep_fold0: bool = True) -> Path:
    """A copy of the finished exp00's fold results (without fold 0 when asked, so that fold retrains)."""
    outputs = work / "outputs"
    shutil.copytree(finished_run["outputs"] / "folds", outputs / "folds")
    for fold in range(5) if keep_fold0 else range(1, 5):
        shutil.copytree(finished_run["exp"] / f"fold{fold}", outputs / "exp00" / f"fold{fold}",
                        ignore=shutil.ignore_patterns("last.pt"))
    return outputs


def mlflow_runs(outputs: Path) -> tuple:
    """The experiment runs and the fold runs (nested in one of them) of the MLflow file store under `outputs`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(outputs / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("artist-classification").experiment_id])
    experiments = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    folds = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return client, experiments, folds


def wandb_runs(exp_dir: Path) -> dict[str, list]:
    """Every W&B offline run under the experiment, by display name: its records."""
    runs = {}
    for run_dir in (exp_dir / "wandb").glob("offline-run-*"):
        records = wandb_records(run_dir)
        [header] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs.setdefault(header.display_name, []).append((header, records))
    return runs


def wandb_summary(records: list) -> dict:
    return {wandb_key(item): json.loads(item.value_json) for r in records
            if r.WhichOneof("record_type") == "summary" for item in r.summary.update}


@pytest.mark.slow
def test_wandb_offline_and_mlflow_hold_one_experiment_run_and_a_run_per_fold(finished_run, tmp_path, monkeypatch):
    """Fold 0 trains, folds 1-4 are reused from an earlier run: the fold run holds fold 0's history; the experiment
    run the config, every fold's result (the reused ones too) and the OOF scores; a rerun adds no run."""
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    outputs = finished_copy(finished_run, tmp_path, keep_fold0=False)  # fold 0 trains, folds 1-4 are reused
    command = ["run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
               tmp_path / "submissions", *TINY_RUN, "tracking.wandb=true", "tracking.mlflow=true"]
    assert run_cli(*command) == 0
    exp = outputs / "exp00"
    history = pd.read_csv(exp / "fold0" / "history.csv")
    done = [json.loads((exp / f"fold{k}" / "done.json").read_text()) for k in range(5)]
    oof = oof_scores(exp, finished_run["root"])
    fingerprint = yaml.safe_load((exp / "config.yaml").read_text())["run"]["result_fingerprint"]
    assert_tensorboard_matches_history(exp / "fold0", exp / "tb" / "fold0")

    client, [experiment], [fold0] = mlflow_runs(outputs)
    assert (experiment.info.run_name, fold0.info.run_name) == ("exp00", "exp00 fold 0")
    assert fold0.data.tags["mlflow.parentRunId"] == experiment.info.run_id and fold0.data.tags["fold"] == "0"
    for run in (experiment, fold0):
        assert run.info.status == "FINISHED" and run.data.params["model.backbone"] == "tf_efficientnet_lite0"
        assert run.data.params["input.img_size"] == "48"
    for column in HISTORY_NUMBERS:
        points = client.get_metric_history(fold0.info.run_id, column)
        assert [p.step for p in points] == history["epoch"].tolist(), column
        np.testing.assert_allclose([p.value for p in points], history[column], rtol=1e-9, err_msg=column)
    assert fold0.data.metrics["best_macro_f1"] == pytest.approx(done[0]["best_macro_f1"])
    for k in range(5):
        assert experiment.data.metrics[f"fold{k}/best_macro_f1"] == pytest.approx(done[k]["best_macro_f1"])
    assert experiment.data.metrics["cv_macro_f1"] == pytest.approx(oof["macro_f1"])
    assert {a.path for a in client.list_artifacts(experiment.info.run_id)} == {"exp00.csv", "oof.csv",
                                                                               "training_curves.png"}

    runs = wandb_runs(exp)
    assert sorted(runs) == ["exp00", "exp00 fold 0"]
    [(header, records)] = runs["exp00 fold 0"]
    assert (header.run_id, header.run_group, header.job_type, list(header.tags)) == \
        (f"exp00-{fingerprint}-fold0", "exp00", "fold", ["fold0"])
    config = {item.key: json.loads(item.value_json) for item in header.config.update}
    assert config["model"]["backbone"] == "tf_efficientnet_lite0" and config["input"]["img_size"] == 48
    rows = [{wandb_key(item): json.loads(item.value_json) for item in r.history.item} for r in records
            if r.WhichOneof("record_type") == "history"]
    assert [row["epoch"] for row in rows] == history["epoch"].tolist()
    for column in HISTORY_NUMBERS:
        np.testing.assert_allclose([row[column] for row in rows], history[column], rtol=1e-12, err_msg=column)
    assert wandb_summary(records)["best_macro_f1"] == pytest.approx(done[0]["best_macro_f1"])
    [(header, records)] = runs["exp00"]
    assert (header.run_id, header.run_group, header.job_type) == (f"exp00-{fingerprint}", "exp00", "experiment")
    summary = wandb_summary(records)
    assert [summary[f"fold{k}/best_macro_f1"] for k in range(5)] == pytest.approx([d["best_macro_f1"] for d in done])
    assert summary["cv_macro_f1"] == pytest.approx(oof["macro_f1"])
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert {entry.path for entry in artifacts[0].manifest.contents} == {"exp00.csv", "oof.csv",
                                                                        "training_curves.png"}

    assert run_cli(*command) == 0  # every fold done: publishes again, into the same experiment run
    _, [again], [fold0_again] = mlflow_runs(outputs)
    assert (again.info.run_id, fold0_again.info.run_id) == (experiment.info.run_id, fold0.info.run_id)
    assert {header.run_id for header, _ in wandb_runs(exp)["exp00"]} == {f"exp00-{fingerprint}"}


@pytest.mark.slow
@pytest.mark.parametrize("key, package, install", [("wandb", "wandb", "'wandb>=0.31,<1'"),
                                                   ("mlflow", "mlflow", "'mlflow-skinny>=3.17.2,<4'"),
                                                   ("tensorboard", "tensorboard", "'tensorboard>=2.19,<3'")])
def test_a_missing_tracker_package_stops_with_one_line_and_keeps_finished_folds(finished_run, tmp_path, monkeypatch,
                                                                                capsys, key, package, install):
    outputs = finished_copy(finished_run, tmp_path)
    before = {path: path.stat().st_mtime_ns for path in (outputs / "exp00").rglob("*")}
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    capsys.readouterr()
    assert run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   tmp_path / "submissions", *TINY_RUN, f"tracking.{key}=true") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: tracking.{key} is on but the package {package} is not installed; run: pip install "
                   f"{install} (or set tracking.{key}=false)")
    assert all(path.stat().st_mtime_ns == when for path, when in before.items())


@pytest.mark.slow
def test_an_unreachable_mlflow_server_stops_with_one_line_and_keeps_finished_folds(finished_run, tmp_path, capsys):
    outputs = finished_copy(finished_run, tmp_path)
    before = {path: path.stat().st_mtime_ns for path in (outputs / "exp00").glob("fold*/*")}
    capsys.readouterr()
    assert run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   tmp_path / "submissions", *TINY_RUN, "tracking.mlflow=true",
                   "tracking.mlflow_uri=http://127.0.0.1:9") == 2  # the discard port: nothing listens
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: tracking: MLflow failed (")
    assert err.endswith("check the MLflow server at http://127.0.0.1:9 (tracking.mlflow_uri) or set "
                        "tracking.mlflow=false; finished folds and epochs are kept, rerun the same command to continue")
    assert all(path.stat().st_mtime_ns == when for path, when in before.items())
    assert not (outputs / "exp00" / "oof.csv").exists()


@pytest.mark.slow
def test_board_shows_all_experiments_or_the_named_ones(finished_run):
    outputs = finished_run["outputs"]
    assert board_command(outputs, [], 6006)[-4:] == ["--logdir", str(outputs), "--port", "6006"]
    assert board_command(outputs, ["exp00"], 7000)[-4:] == ["--logdir_spec", f"exp00:{outputs / 'exp00' / 'tb'}",
                                                           "--port", "7000"]
    with pytest.raises(Exception, match="no TensorBoard logs for nothere"):
        board_command(outputs, ["nothere"], 6006)


@pytest.mark.parametrize("override, message", [
    ("tracking.wandb_mod=offline", "command-line override: unknown config key 'tracking.wandb_mod'"),
    ("tracking.wandb_mode=cloud", "'tracking.wandb_mode': Input should be 'offline' or 'online'"),
    ("tracking.tensorboard=maybe", "'tracking.tensorboard': Input should be a valid boolean"),
])
def test_tracking_keys_are_typed_and_unknown_ones_are_errors(override, message):
    with pytest.raises(UserError) as info:
        resolve_config("exp00", overrides=[override])
    assert message in str(info.value) and "\n" not in str(info.value)
