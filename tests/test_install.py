"""What `bash run.sh` installs before a command (src/environment.py): nothing in a Python whose packages are in the
tested ranges, only what is missing otherwise (into a .venv that sees the system's packages, else the user site),
never a second torch, one line when offline, a folder of wheels instead of an index; the requirement files agree
with the lock; exp00 runs on the floors of the ranges' pure-Python packages.

The run.sh tests use a copy of the repository and a Python as a platform ships it: this machine's base interpreter
seeing the test environment's packages through PYTHONPATH (as a venv sees system site-packages), its calls logged,
pip pointed at an index that does not answer."""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import yaml

from src import environment
from src.core import requirements as req

from .conftest import TINY_RUN

REPO = Path(__file__).resolve().parent.parent
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
SITE_DIRS = site.getsitepackages()  # the packages of the environment running the tests (the lock's, in CI)
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"
WRAPPER = """#!/bin/sh
# A platform's Python: the base interpreter, every call logged. With NO_ENSUREPIP set, venv fails as on Colab, whose
# Python lacks ensurepip: it leaves the folder behind, without pip.
echo "$*" >> "{log}"
if [ -n "$NO_ENSUREPIP" ] && [ "$1" = -m ] && [ "$2" = venv ]; then
  shift 2
  "{base}" -m venv --without-pip "$@"
  echo "The virtual environment was not created successfully because ensurepip is not available." >&2
  exit 1
fi
exec "{base}" "$@"
"""


@dataclass
class Sandbox:
    repo: Path
    python: Path
    log: Path
    userbase: Path
    env: dict

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "run.sh", *args], cwd=self.repo, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=600)

    def calls(self) -> list[str]:
        """What each call of the platform's Python was asked to run, e.g. '-m pip install ...'."""
        return self.log.read_text().splitlines() if self.log.exists() else []

    def require(self, line: str, locked: str) -> None:
        """One more core requirement, with its lock line: a package this Python lacks."""
        with open(self.repo / "requirements.txt", "a") as file:
            file.write(f"{line}\n")
        with open(self.repo / "requirements" / "lock.txt", "a") as file:
            file.write(f"{locked}\n")

    @property
    def venv_site(self) -> Path:
        return self.repo / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    repo = tmp_path / "clone"
    for item in ("src", "configs", "requirements"):
        shutil.copytree(REPO / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("run.sh", "requirements.txt"):
        shutil.copy2(REPO / item, repo / item)
    log, python = tmp_path / "calls.log", tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.write_text(WRAPPER.format(log=log, base=BASE_PYTHON))
    python.chmod(0o755)
    env = {"PATH": f"{python.parent}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path / "home"),
           "PYTHON": str(python), "PYTHONPATH": os.pathsep.join(SITE_DIRS), "PYTHONUSERBASE": str(tmp_path / "user"),
           "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": UNREACHABLE_INDEX, "PIP_RETRIES": "0"}
    return Sandbox(repo, python, log, tmp_path / "user", env)


def fake_installed(folder: Path, versions: dict[str, str]) -> Path:
    """Distribution metadata that says these versions are installed (it shadows the real packages' metadata)."""
    for name, version in versions.items():
        info = folder / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def tiny_wheel(folder: Path, name: str = "tinypkg", version: str = "1.0") -> Path:
    """A pure-Python wheel of one module, as PEP 427 lays one out."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: the test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return wheel


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one error line a failed run.sh ends in (and there is no other)."""
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], done.stderr
    return lines[-1]


# --- the requirement files ---

def test_every_group_package_has_a_lock_line_inside_its_range_and_every_lock_line_a_group():
    locked = req.lock()
    grouped = [requirement for group in req.groups().values() for requirement in group]
    names = [requirement.name for requirement in grouped]
    assert len(names) == len(set(names)), "a package in two groups"
    assert sorted(names) == sorted(locked)
    for requirement in grouped:
        pinned = locked[requirement.name].split("==")[1]
        assert req.in_range(pinned, requirement.spec), f"lock {locked[requirement.name]} outside {requirement.line}"
    assert list(req.groups()) == ["core", "explain", "style", "tests", "tracking", "tuning"]
    assert "torch" in {requirement.name for requirement in req.groups()["core"]}


@pytest.mark.parametrize("version, spec, inside", [
    ("2.14.1+cu130", "==2.14.1", True),          # a local build is its release
    ("2.11.0a0+git6f1d6c2", ">=2.11,<3", True),  # NGC's torch: a pre-release of the floor counts as the floor
    ("2.11.0+cu128", ">=2.11,<3", True),          # Colab's
    ("2.10.1", ">=2.11,<3", False),
    ("3.0.0rc1", ">=2.11,<3", False),
    ("1.0.28", ">=1.0.28,<2", True),
    ("not-a-version", ">=1", False),
])
def test_an_installed_version_is_placed_in_a_range_by_its_release(version, spec, inside):
    assert req.in_range(version, spec) is inside


def test_each_command_needs_its_groups():
    assert environment.needs_of(["exp00", "train.epochs=1"]) == ("core",)
    assert environment.needs_of(["predict", "exp00"]) == ("core",)
    assert environment.needs_of(["tune", "exp00"]) == ("core", "tuning")
    assert environment.needs_of(["style"]) == ("core", "style")
    assert {r.group for r in req.needed(environment.needs_of(["test"]))} == set(req.groups())


def test_the_install_follows_the_lock_except_beside_a_torch_that_is_not_the_locks(monkeypatch):
    core = req.needed(("core",))
    versions = {requirement.name: req.lock()[requirement.name].split("==")[1] for requirement in core}
    versions.update({"torch": "2.14.1+cu130", "numpy": "2.0.2"})
    del versions["timm"]

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, "version", version)
    missing = req.unmet(core)
    assert [(requirement.name, installed) for requirement, installed in missing] == [("timm", None)]
    requests, held = environment.install_plan(core, missing)
    assert requests == ["timm==1.0.29"] and {"torch==2.14.1+cu130", "numpy==2.0.2"} <= set(held)
    requests, held = environment.install_plan(core, missing, own_venv=True)  # a .venv shadows: the lock's numpy
    assert requests == ["timm==1.0.29", "numpy==2.4.6"] and "torch==2.14.1+cu130" in held
    versions["torch"] = "2.11.0+cu128"  # Colab's: the ranges, for pip to pick what fits it; torch stays
    for own_venv in (False, True):
        requests, held = environment.install_plan(core, missing, own_venv)
        assert requests == ["timm>=1.0.28,<2"] and {"torch==2.11.0+cu128", "numpy==2.0.2"} <= set(held)


# --- run.sh ---

@pytest.mark.slow
def test_a_python_in_range_but_not_at_the_lock_is_used_as_it_is(sandbox, tmp_path):
    platform = fake_installed(tmp_path / "platform", {"torch": "2.11.0+cu128", "timm": "1.0.28", "numpy": "2.0.2"})
    pythonpath = os.pathsep.join([str(platform), *SITE_DIRS])
    seen = subprocess.run([BASE_PYTHON, "-c", "from importlib.metadata import version as v; "
                           "print(v('torch'), v('timm'), v('numpy'))"], env={**sandbox.env, "PYTHONPATH": pythonpath},
                          capture_output=True, text=True)
    assert seen.stdout.split() == ["2.11.0+cu128", "1.0.28", "2.0.2"]  # none at the lock, all in range
    done = sandbox.run("show", "exp00", PYTHONPATH=pythonpath)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# exp00") and done.stderr == ""
    assert sandbox.calls() == [f"-m src.environment --python {sandbox.python} -- show exp00", "-m src.cli show exp00"]
    assert not (sandbox.repo / ".venv").exists() and not sandbox.userbase.exists()


@pytest.mark.slow
def test_an_installed_torch_outside_the_range_is_never_replaced(sandbox, tmp_path):
    platform = fake_installed(tmp_path / "platform", {"torch": "2.4.1+cu121"})
    done = sandbox.run("exp00", PYTHONPATH=os.pathsep.join([str(platform), *SITE_DIRS]))
    assert done.returncode == 1
    assert error_line(done).startswith("error: ") and "has torch 2.4.1+cu121, outside the tested range >=2.11,<3, " \
        "and an installed torch is never replaced here" in error_line(done)
    assert sandbox.calls() == [f"-m src.environment --python {sandbox.python} -- exp00"]


@pytest.mark.slow
def test_without_ensurepip_the_missing_package_goes_to_the_user_site(sandbox, tmp_path):
    sandbox.require("tinypkg>=1.0,<2", "tinypkg==1.0")
    wheels = tiny_wheel(tmp_path / "index").parent  # pip's own settings name where it comes from
    done = sandbox.run("show", "exp00", NO_ENSUREPIP="1", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# exp00")
    assert "cannot make a virtual environment (The virtual environment was not created successfully because " \
           "ensurepip is not available.)" in done.stderr
    assert list(sandbox.userbase.glob("lib/python*/site-packages/tinypkg/__init__.py"))
    assert not (sandbox.repo / ".venv").exists(), "the half-made .venv stays"
    installs = [call for call in sandbox.calls() if call.startswith("-m pip install")]
    assert len(installs) == 1 and "--user" in installs[0].split() and "tinypkg==1.0" in installs[0].split()
    calls = len(sandbox.calls())
    assert sandbox.run("show", "exp00", NO_ENSUREPIP="1").returncode == 0  # now it has it: nothing more to do
    assert [call.split()[:2] for call in sandbox.calls()[calls:]] == [["-m", "src.environment"], ["-m", "src.cli"]]


@pytest.mark.slow
def test_offline_with_a_package_missing_stops_with_one_line_and_installs_nothing(sandbox):
    sandbox.require("tinypkg>=1.0,<2", "tinypkg==1.0")
    done = sandbox.run("exp00", "train.epochs=1")
    assert done.returncode == 1 and done.stdout == ""
    message = error_line(done)
    assert message.startswith("error: cannot reach a package index to install tinypkg (pip's log: ")
    assert (f"python{sys.version_info.major}.{sys.version_info.minor} -m pip download --no-deps -d wheels "
            "tinypkg==1.0, copy wheels/ here") in message
    assert message.endswith("run: bash run.sh --wheels wheels exp00 train.epochs=1")
    assert "Retrying" not in done.stderr and "ERROR:" not in done.stderr  # pip's own output stays in its log
    assert not (sandbox.repo / ".venv").exists() and not sandbox.userbase.exists()


@pytest.mark.slow
def test_a_wheel_folder_fills_a_venv_that_reuses_the_systems_torch(sandbox, tmp_path):
    sandbox.require("tinypkg>=1.0,<2", "tinypkg==1.0")
    empty = tmp_path / "empty-wheels"
    empty.mkdir()
    done = sandbox.run("show", "exp00", ARTIST_WHEELS=str(empty))
    assert done.returncode == 1
    assert error_line(done).startswith(f"error: --wheels {empty} lacks tinypkg==1.0 (pip looked nowhere else)")
    assert not (sandbox.repo / ".venv").exists()

    wheels = tiny_wheel(tmp_path / "wheels").parent
    done = sandbox.run("--wheels", str(wheels), "show", "exp00")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# exp00")
    assert f"Installing tinypkg==1.0 into {sandbox.repo / '.venv'} (it sees {sandbox.python}'s packages) from " \
        f"{wheels}" in done.stderr
    log = (sandbox.repo / "outputs" / "install.log").read_text()
    assert f"--no-index --find-links {wheels}\n" in log and "Looking in indexes" not in log
    assert "include-system-site-packages = true" in (sandbox.repo / ".venv" / "pyvenv.cfg").read_text()
    assert (sandbox.venv_site / "tinypkg" / "__init__.py").is_file()
    assert not list(sandbox.venv_site.glob("torch*")), "a second torch in .venv"
    again = sandbox.run("show", "exp00")  # from .venv now, which has everything: nothing to say or install
    assert again.returncode == 0 and again.stderr == ""


# --- the floors ---

@pytest.mark.slow
def test_exp00_on_the_floor_versions_of_the_pure_python_packages(finished_run, tmp_path):
    """timm, albumentations and tensorboard at their ranges' floors (what Colab ships), beside the lock's other
    packages: exp00's fold 0 predicts what it predicts on the lock."""
    core = {requirement.name: requirement for requirement in req.groups()["core"]}
    floors = {name: core[name].spec.split(">=")[1].split(",")[0] for name in ("timm", "albumentations", "tensorboard")}
    wanted = [f"{name}=={floor}" for name, floor in floors.items() if metadata.version(name) != floor]
    target = tmp_path / "floors"
    if wanted:
        fetched = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                                  "--disable-pip-version-check", *wanted], capture_output=True, text=True, timeout=300)
        if fetched.returncode and not environment.index_reachable(sys.executable):
            pytest.skip(f"no package index answers here, so {' '.join(wanted)} cannot be fetched")
        assert fetched.returncode == 0, fetched.stderr[-2000:]
    outputs = tmp_path / "outputs"
    done = subprocess.run([sys.executable, "-m", "src.cli", "run", "exp00", "--data", str(finished_run["root"]),
                           "--outputs", str(outputs), "--submissions", str(tmp_path / "submissions"), *TINY_RUN,
                           "train.folds=[0]"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-3000:]
    packages = yaml.safe_load((outputs / "exp00" / "config.yaml").read_text())["run"]["packages"]
    assert all(req.in_range(packages[name], f"=={floor}") for name, floor in floors.items()), packages
    floor_probs = pd.read_csv(outputs / "exp00" / "fold0" / "val_probs.csv")
    lock_probs = pd.read_csv(finished_run["exp"] / "fold0" / "val_probs.csv")
    pd.testing.assert_frame_equal(floor_probs, lock_probs, check_exact=False, atol=1e-6, rtol=0)
