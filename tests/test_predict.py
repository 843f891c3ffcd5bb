"""Predict from saved fold checkpoints with no training data, and the offline export: unzipped into an empty folder
and run with the network blocked, it predicts what the experiment itself wrote to test_probs.csv."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest
import torch

from src.core import requirements
from src.pipeline import export, predict
from src.pipeline.wheels import wheel_of_installed
from src.pipeline.submission import validate_submission

from .conftest import run_cli

BLOCK_NETWORK = '''import socket


def _refuse(*args, **kwargs):
    raise OSError("network blocked by the test")


socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
'''


def without_train_data(root: Path, work: Path) -> Path:
    """The test half of a data root: test.csv, sample_submission.csv and the test images, no train data."""
    target = work / "test-only"
    shutil.copytree(root / "test", target / "test")
    for name in ("test.csv", "sample_submission.csv"):
        shutil.copy2(root / name, target / name)
    return target


def models_only(exp: Path, outputs: Path) -> Path:
    """An experiment's resolved config and fold checkpoints, nothing else (no OOF, no last.pt, no history)."""
    target = outputs / exp.name
    for fold in range(5):
        (target / f"fold{fold}").mkdir(parents=True)
        shutil.copy2(exp / f"fold{fold}" / "best.pt", target / f"fold{fold}" / "best.pt")
    shutil.copy2(exp / "config.yaml", target / "config.yaml")
    return outputs


def probabilities(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str}).set_index("id")


@pytest.mark.slow
def test_predict_from_checkpoints_equals_the_experiments_test_probs(finished_run, tmp_path):
    outputs = models_only(finished_run["exp"], tmp_path / "outputs")
    data = without_train_data(finished_run["root"], tmp_path)
    out = tmp_path / "sub.csv"
    assert run_cli("predict", "exp00", "--data", data, "--outputs", outputs, "--out", out) == 0
    expected = probabilities(finished_run["exp"] / "test_probs.csv")
    got = probabilities(tmp_path / "sub_probs.csv")
    assert got.index.tolist() == expected.index.tolist()
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=1e-6)
    submission = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert submission.equals(pd.read_csv(finished_run["submissions"] / "exp00.csv", dtype=str, keep_default_na=False))


@pytest.mark.slow
def test_predict_a_plain_folder_of_images(finished_run, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    test = pd.read_csv(finished_run["root"] / "test.csv", dtype=str)
    for row in test.head(3).itertuples():
        shutil.copy2(finished_run["root"] / row.img_path, folder / f"{row.id}{Path(row.img_path).suffix}")
    out = tmp_path / "folder.csv"
    assert run_cli("predict", "exp00", "--data", folder, "--outputs", finished_run["outputs"], "--out", out) == 0
    submission = pd.read_csv(out, dtype=str)
    assert submission["id"].tolist() == sorted(test["id"].head(3))
    expected = probabilities(finished_run["exp"] / "test_probs.csv").loc[submission["id"]]
    np.testing.assert_allclose(probabilities(tmp_path / "folder_probs.csv").to_numpy(), expected.to_numpy(),
                               atol=1e-6)
    assert submission["artist"].tolist() == expected.idxmax(axis=1).tolist()
    (folder / "notes.txt").write_text("not an image")
    (folder / f"{test['id'][0]}.png").write_bytes((folder / f"{test['id'][0]}.jpg").read_bytes())
    capsys.readouterr()
    assert run_cli("predict", "exp00", "--data", folder, "--outputs", finished_run["outputs"], "--out", out) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --data {folder}: {test['id'][0]}.jpg and {test['id'][0]}.png have the same id (an image's id is "
        "its file name without the extension); rename one")


def core_python_without_ttach(folder: Path) -> Path:
    """A virtual environment with the core packages alone, and not ttach (as Kaggle's image): links to this
    environment's packages, less ttach and every optional group's."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(folder)],
                   check=True, timeout=120)
    packages = folder / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    left_out = {"ttach", *(requirement.name for group, members in requirements.groups().items()
                           if group != requirements.CORE for requirement in members)}
    hidden = {"__pycache__"}
    for name in left_out:
        files = metadata.distribution(name).files or []
        hidden |= {Path(str(path)).parts[0] for path in files if not str(path).startswith("..")}
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            if entry.name not in hidden and not (packages / entry.name).exists():
                (packages / entry.name).symlink_to(entry)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def kaggle(finished_run, tmp_path_factory):
    """exp00 exported and unzipped as a Kaggle dataset, a Python with the core packages but not ttach, the test
    half of the data and an environment whose network is blocked (and which does not set
    NO_ALBUMENTATIONS_UPDATE: the bundle must)."""
    work = tmp_path_factory.mktemp("kaggle")
    export = work / "export"
    assert run_cli("export", "exp00", "--outputs", finished_run["outputs"], "--out", export, "--precision", "fp32") == 0
    unpacked = work / "input"
    unpacked.mkdir(parents=True)
    with zipfile.ZipFile(export / "exp00.zip") as archive:
        archive.extractall(unpacked)
    python = core_python_without_ttach(work / "core-only")
    absent = subprocess.run([python, "-c", "import ttach"], capture_output=True, text=True)
    assert "No module named 'ttach'" in absent.stderr
    blocker = work / "no-network"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_NETWORK)
    env = {**{key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"},
           "PYTHONPATH": str(blocker)}
    probe = subprocess.run([python, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "network blocked by the test" in probe.stderr
    working = work / "working"
    working.mkdir()
    return {"bundle": unpacked, "python": python, "env": env, "working": working,
            "data": without_train_data(finished_run["root"], work)}


def predict_py(kaggle, *args: str, bundle: Optional[Path] = None) -> subprocess.CompletedProcess:
    """The bundle's predict.py in the core-only Python, in Kaggle's working folder, without a network."""
    entry = (bundle or kaggle["bundle"]) / "predict.py"
    return subprocess.run([str(kaggle["python"]), str(entry), "--data", str(kaggle["data"]), *args],
                          cwd=kaggle["working"], env=kaggle["env"], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_unzipped_into_an_empty_folder_predicts_offline_like_the_experiment(finished_run, kaggle):
    unpacked = kaggle["bundle"]
    names = sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file())
    expected = {"predict.py", "manifest.json", "run.sh", "requirements.txt", "requirements/lock.txt",
                "src/pipeline/predict.py", "configs/exp00.yaml", "models/exp00/config.yaml",
                "wheels/ttach-0.0.3-py3-none-any.whl", *(f"models/exp00/fold{k}/best.pt" for k in range(5))}
    assert expected <= set(names)
    assert not [name for name in names if name.endswith(("last.pt", ".csv")) or "__pycache__" in name]
    manifest = json.loads((unpacked / "manifest.json").read_text())["members"]["exp00"]
    checkpoint = torch.load(unpacked / "models/exp00/fold0/best.pt", weights_only=True)
    assert set(checkpoint) == {"model", "classes", "backbone", "epoch", "val_macro_f1"}
    assert manifest["weights"] == "float32"
    assert {v.dtype for v in checkpoint["model"].values() if v.is_floating_point()} == {torch.float32}

    done = predict_py(kaggle)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "network blocked" not in done.stderr and "Error fetching" not in done.stderr, "it tried the network"
    expected = probabilities(finished_run["exp"] / "test_probs.csv")
    got = probabilities(kaggle["working"] / "submission_probs.csv")
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-6)
    submission = pd.read_csv(kaggle["working"] / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(kaggle["data"] / "sample_submission.csv", dtype=str, keep_default_na=False)
    validate_submission(submission, sample, list(expected.columns))


@pytest.mark.slow
def test_the_bundle_brings_ttach_for_tta_where_it_is_not_installed(finished_run, kaggle, tmp_path):
    done = predict_py(kaggle, "--tta", "hflip", "--out", "hflip.csv")
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_cli("predict", "exp00", "--data", kaggle["data"], "--outputs", finished_run["outputs"], "--tta", "hflip",
                   "--out", tmp_path / "here.csv") == 0
    expected = probabilities(tmp_path / "here_probs.csv")
    got = probabilities(kaggle["working"] / "hflip_probs.csv").loc[expected.index]
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=1e-6)
    plain = probabilities(finished_run["exp"] / "test_probs.csv").loc[expected.index]
    assert np.abs(got.to_numpy() - plain.to_numpy()).max() > 1e-4, "TTA changed nothing"

    without_wheels = shutil.copytree(kaggle["bundle"], tmp_path / "bundle", ignore=shutil.ignore_patterns("wheels"))
    done = predict_py(kaggle, "--out", "plain.csv", bundle=without_wheels)  # no ttach anywhere: no TTA, no ttach
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(probabilities(kaggle["working"] / "plain_probs.csv").loc[expected.index].to_numpy(),
                               plain.to_numpy(), atol=1e-6)
    done = predict_py(kaggle, "--tta", "hflip", "--out", "hflip.csv", bundle=without_wheels)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: TTA 'hflip' needs the package ttach, which is not installed; run: pip "
                                   "install 'ttach>=0.0.3,<0.1'")


def test_a_wheel_rebuilt_from_an_installed_package_holds_its_files_as_installed(tmp_path):
    wheel = wheel_of_installed("ttach", tmp_path)
    assert wheel.name == "ttach-0.0.3-py3-none-any.whl"
    installed = {line.split(",")[0]: line.split(",")[1] for line in
                 metadata.distribution("ttach").read_text("RECORD").splitlines() if line.count(",") == 2}
    with zipfile.ZipFile(wheel) as archive:
        record = archive.read("ttach-0.0.3.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:
            path, digest, size = line.split(",")
            data = archive.read(path)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data) and digest == installed[path], path
        assert sorted(archive.namelist()) == sorted(line.split(",")[0] for line in record)
    assert {path for path in installed if path.startswith("ttach/") and "__pycache__" not in path} <= \
        {line.split(",")[0] for line in record}


@pytest.mark.slow
def test_half_precision_only_within_the_tolerance(finished_run, tmp_path, monkeypatch, capsys):
    assert export.FP16_TOLERANCE == 1e-3
    monkeypatch.setattr(export, "FP16_TOLERANCE", 1.0)  # the tiny one-epoch models move by about 1e-3
    assert run_cli("export", "exp00", "--outputs", finished_run["outputs"], "--out", tmp_path / "loose") == 0
    member = json.loads((tmp_path / "loose" / "exp00" / "manifest.json").read_text())["members"]["exp00"]
    change = member["max_probability_change_fp16"]
    assert member["weights"] == "float16" and 0 < change < 1
    checkpoint = torch.load(tmp_path / "loose/exp00/models/exp00/fold0/best.pt", weights_only=True)
    assert {v.dtype for v in checkpoint["model"].values() if v.is_floating_point()} == {torch.float16}
    assert "in float16 (float16 changes a probability by at most" in capsys.readouterr().out
    out = tmp_path / "half.csv"
    assert run_cli("predict", "exp00", "--data", without_train_data(finished_run["root"], tmp_path), "--outputs",
                   tmp_path / "loose/exp00/models", "--out", out) == 0
    expected = probabilities(finished_run["exp"] / "test_probs.csv")
    moved = np.abs(probabilities(tmp_path / "half_probs.csv").loc[expected.index].to_numpy() - expected.to_numpy())
    assert moved.max() == pytest.approx(change, abs=1e-5), "the recorded change is what the bundle's output moves"

    monkeypatch.undo()  # the real limit, 1e-3, against a change just above it
    monkeypatch.setattr(export, "half_precision_change", lambda *args: 1.1e-3)
    assert run_cli("export", "exp00", "--outputs", finished_run["outputs"], "--out", tmp_path / "strict") == 0
    member = json.loads((tmp_path / "strict" / "exp00" / "manifest.json").read_text())["members"]["exp00"]
    assert member["weights"] == "float32" and member["max_probability_change_fp16"] == 1.1e-3
    assert "5 fold checkpoints in float32 (float16 changes a probability by at most 1.1e-03 on 26 test images; " \
        "limit 0.001)" in capsys.readouterr().out


@pytest.mark.slow
def test_an_ensemble_with_a_tta_member_exports_and_predicts_its_own_test_probs(finished_run, tmp_path, monkeypatch):
    from src.pipeline import ensemble

    outputs = tmp_path / "outputs"
    shutil.copytree(finished_run["outputs"] / "folds", outputs / "folds")
    shutil.copytree(finished_run["exp"], outputs / "exp00", ignore=shutil.ignore_patterns("last.pt", "tb"))
    args = ["--data", finished_run["root"], "--outputs", outputs, "--submissions", tmp_path / "submissions"]
    assert run_cli("tta", "exp00", "--mode", "hflip", *args) == 0
    (tmp_path / "duo.yaml").write_text("members: [exp00, exp00-tta-hflip]\nmethod: soft\nweights: fit\n")
    monkeypatch.setattr(ensemble, "ENSEMBLE_DIR", tmp_path)
    assert run_cli("ensemble", "duo", *args) == 0
    assert run_cli("export", "duo", "--outputs", outputs, "--out", tmp_path / "export", "--precision", "fp32") == 0
    bundle = tmp_path / "export" / "duo"
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["duo", "exp00", "exp00-tta-hflip"]
    shutil.rmtree(outputs / "exp00")  # the bundle alone predicts
    out = tmp_path / "duo.csv"
    assert run_cli("predict", "duo", "--data", without_train_data(finished_run["root"], tmp_path), "--outputs",
                   bundle / "models", "--out", out) == 0
    expected = probabilities(outputs / "duo" / "test_probs.csv")
    np.testing.assert_allclose(probabilities(tmp_path / "duo_probs.csv").loc[expected.index].to_numpy(),
                               expected.to_numpy(), atol=1e-6)


def test_predict_names_what_is_missing(tmp_path, capsys):
    (tmp_path / "outputs").mkdir()
    capsys.readouterr()
    assert run_cli("predict", "nothere", "--data", tmp_path, "--outputs", tmp_path / "outputs") == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'outputs' / 'nothere' / 'config.yaml'} not found; "
                                               "run nothere first (bash run.sh nothere), or point --outputs at the "
                                               "folder that holds it")


@pytest.mark.slow
def test_the_half_precision_check_computes_in_float32_as_the_bundle_does_on_a_cpu(finished_run, tmp_path):
    """An experiment that predicts under bfloat16 autocast: the float16 check must still measure what rounding the
    weights does to float32 predictions, not what is left of it after bfloat16 rounds both sides."""
    import yaml

    from src.core.schema import ExperimentConfig
    from src.data.competition import load_test_set
    from src.data.device_input import DeviceBatches, InputStage
    from src.inference.probabilities import predict_probs
    from src.data.loader import ImageDataset, make_loader
    from src.model.checkpoints import load_checkpoint
    from src.model.networks import build_model, normalisation
    from src.data.transforms import build_eval_transform

    outputs = models_only(finished_run["exp"], tmp_path / "outputs")
    config = outputs / "exp00" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["train"]["amp_dtype"] = "bfloat16"  # CPU autocast computes in bfloat16 when named
    config.write_text(yaml.safe_dump(saved))
    test = load_test_set(finished_run["root"], log=lambda _: None)
    measured = export.half_precision_change(predict.fold_models(outputs, "exp00"), test, tmp_path / "cache")

    cfg = ExperimentConfig.model_validate({k: v for k, v in saved.items() if k != "run"})
    classes = torch.load(outputs / "exp00/fold0/best.pt", weights_only=True)["classes"]

    def fold_average(dtype: torch.dtype, autocast: bool) -> np.ndarray:
        per_fold = []
        for fold in range(5):
            model = build_model(cfg.model.model_copy(update={"pretrained": False}), len(classes))
            load_checkpoint(model, outputs / f"exp00/fold{fold}/best.pt", classes, cfg.model.backbone)
            model.load_state_dict({k: v.to(dtype).float() if v.is_floating_point() else v
                                   for k, v in model.state_dict().items()})
            mean, std = normalisation(model.backbone, cfg.input.mean, cfg.input.std)
            paths = test.images["path"].head(export.FP16_CHECK_IMAGES)
            cpu = torch.device("cpu")
            loader = make_loader(ImageDataset(paths, None, build_eval_transform(cfg, test=True)), 64, 0, cpu,
                                 train=False)
            per_fold.append(predict_probs(model, DeviceBatches(loader, cpu, InputStage(mean, std)), autocast,
                                          "bfloat16")[0])
        return np.mean(np.asarray(per_fold, dtype=np.float64), axis=0)

    in_float32 = float(np.abs(fold_average(torch.float32, False) - fold_average(torch.float16, False)).max())
    in_bfloat16 = float(np.abs(fold_average(torch.float32, True) - fold_average(torch.float16, True)).max())
    assert measured == pytest.approx(in_float32, rel=1e-6, abs=1e-9)
    assert abs(in_bfloat16 - in_float32) > 1e-6  # the experiment's own autocast would have measured another figure
