"""What a platform may lack or get wrong, said in one line: a GPU this torch cannot use (the driver's presence and
CUDA's absence simulated), a missing optional package, and albumentations' network check on import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from src.core import runtime
from src.core.errors import UserError
from src.core.requirements import require
from src.inference.tta import with_tta
from src.pipeline.resolve import choose_profile

from .conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
CU128_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine whose NVIDIA driver is what `driver(...)` says (its /proc file, or nvidia-smi on PATH) and whose
    torch sees no CUDA device, as on a driver too old for the torch build."""
    proc = tmp_path / "proc-driver-nvidia-version"
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_FILE", proc)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def driver(version: str, via: str = "proc") -> None:
        if via == "proc":
            proc.write_text(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {version}  Sat Aug 19 01:15:15 UTC "
                            "2023\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
        else:
            smi = tmp_path / "bin" / "nvidia-smi"
            smi.parent.mkdir(exist_ok=True)
            smi.write_text(f"#!/bin/sh\n[ \"$1\" = --query-gpu=driver_version ] && printf '{version}\\n{version}\\n'\n")
            smi.chmod(0o755)
    return driver


def test_a_gpu_the_torch_build_cannot_use_stops_auto_and_none_with_what_to_install(machine):
    machine("535.104.05")
    expected = ("an NVIDIA GPU is here (driver 535.104.05) but torch cannot use it: torch 2.14.1+cu130 is built for "
                "CUDA 13.0, which needs driver 580 or newer; pip install torch torchvision --index-url "
                "https://download.pytorch.org/whl/cu128 (a CUDA 12 build that driver runs; "
                "https://pytorch.org/get-started/locally/), or pass --profile demo to train the CPU demo profile on "
                "purpose")
    for requested in ("auto", "none"):
        with pytest.raises(UserError) as stop:
            choose_profile(requested)
        assert str(stop.value) == expected
    assert choose_profile("demo") == "demo"  # the CPU profile, chosen on purpose


def test_the_command_line_stops_with_the_one_line_and_runs_with_profile_demo(machine, capsys):
    machine("535.104.05")
    capsys.readouterr()
    assert run_cli("show", "exp00") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: an NVIDIA GPU is here (driver 535.104.05)") and err.count("\n") == 1
    assert run_cli("show", "exp00", "--profile", "demo") == 0
    assert "model.backbone: efficientnet_b2 -> tf_efficientnet_lite0" in capsys.readouterr().out


def test_nvidia_smi_names_the_driver_when_there_is_no_proc_file(machine):
    machine("470.82.01", via="nvidia-smi")
    assert runtime.nvidia_driver_version() == "470.82.01"
    message = runtime.gpu_problem()
    assert "driver 470.82.01" in message and "update the driver to 525 or newer" in message


def test_a_cpu_build_of_torch_beside_a_driver_is_named(machine, monkeypatch):
    machine("580.65.06")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert runtime.gpu_problem() == (
        "an NVIDIA GPU is here (driver 580.65.06) but torch cannot use it: torch 2.13.0+cpu is a CPU build; pip "
        "install torch torchvision --index-url https://download.pytorch.org/whl/cu130 (a CUDA 13 build that driver "
        "runs; https://pytorch.org/get-started/locally/), or pass --profile demo to train the CPU demo profile on "
        "purpose")


def test_no_driver_or_gpus_hidden_on_purpose_mean_the_demo_profile(machine, monkeypatch):
    assert choose_profile("auto") == "demo"  # no /proc file, no nvidia-smi: a CPU machine
    machine("535.104.05")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert choose_profile("auto") == "demo"


@pytest.mark.parametrize("capability, arches, runs", [
    ((6, 0), CU128_ARCHES, False),   # Kaggle's P100 beside a torch built without Pascal
    ((8, 9), CU128_ARCHES, True),    # an L4 runs sm_86 code (same major, higher minor)
    ((7, 0), ["sm_75"], False),      # a V100 does not run sm_75 code (lower minor)
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_90a"], False),    # arch-specific code runs only on its own capability
    ((10, 0), ["compute_90"], True),  # PTX is compiled by the driver for every later capability
    ((8, 6), ["compute_90"], False),
])
def test_which_gpus_a_torch_build_runs_on(capability, arches, runs):
    assert runtime.runs_on(capability, arches) is runs


def test_a_gpu_older_than_the_build_stops_even_though_cuda_is_available(machine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU128_ARCHES)
    with pytest.raises(UserError, match=r"^GPU 0 \(Tesla P100-PCIE-16GB, compute capability 6\.0\) is not among the "
                                        r"GPUs torch 2\.14\.1\+cu130 is built for \(sm_75 sm_80 sm_86 sm_90 sm_100 "
                                        r"sm_120\): install a torch built for it"):
        choose_profile("auto")


def test_a_missing_package_is_one_line_with_its_pip_command_and_a_broken_one_is_not_hidden(tmp_path, monkeypatch):
    with pytest.raises(UserError) as stop:
        require("no_such_module_here", "no-such-package", "feature x")
    assert str(stop.value) == ("feature x needs the package no-such-package, which is not installed; run: pip "
                               "install no-such-package")
    (tmp_path / "broken_here.py").write_text("import another_missing_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="another_missing_module"):
        require("broken_here", "broken-here", "feature y")


def test_predicting_without_tta_needs_no_ttach_and_tta_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ttach", None)  # import fails as if it were not installed
    model = nn.Linear(2, 2)
    assert with_tta(model, "none") is model
    with pytest.raises(UserError, match=r"^TTA 'hflip' needs the package ttach, which is not installed; run: pip "
                                        r"install 'ttach>=0\.0\.3,<0\.1'$"):
        with_tta(model, "hflip")


ASKS = '''import sys
import urllib.request


def _asked(self, url, *args, **kwargs):
    print("ASKED", getattr(url, "full_url", url), file=sys.stderr)
    raise OSError("network blocked by the test")


urllib.request.OpenerDirector.open = _asked
'''


@pytest.mark.parametrize("first", ["import src; ", ""])
def test_importing_the_package_keeps_albumentations_off_the_network(tmp_path, first):
    (tmp_path / "sitecustomize.py").write_text(ASKS)
    env = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", f"{first}import albumentations"], cwd=REPO, capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    asked = "ASKED https://pypi.org/pypi/albumentations/json" in done.stderr
    assert asked is (first == ""), done.stderr  # without the package first, albumentations does ask: the probe works
