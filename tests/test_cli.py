"""The command line: one table of commands behind run.sh, help before anything is installed, `show` without running,
and key=value overrides only where a command takes them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.cli import COMMANDS, help_text, main
from src.core.config import resolve_config

REPO = Path(__file__).resolve().parent.parent


def test_help_says_what_the_project_is_and_lists_every_command_from_the_one_table():
    text = help_text()
    assert text.startswith("Artist classification (Dacon 236006)")
    for name, command in COMMANDS.items():
        assert f"  {name} {command.usage}" in text
    assert "exp00" in text and "exp21" in text


def test_run_sh_help_needs_no_installed_package(tmp_path):
    """A Python with nothing installed (a bare virtual environment) prints the help and exits 0."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
                    str(tmp_path / "bare")], check=True, timeout=120)
    done = subprocess.run(["bash", "run.sh", "help"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "bare" / "bin" / "python")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Artist classification") and "demo-data" in done.stdout


def test_every_command_names_an_importable_handler():
    import importlib

    for name, command in COMMANDS.items():
        module, function = command.handler.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_an_unknown_command_and_overrides_where_none_are_taken_are_errors(capsys):
    assert main(["no_such_thing"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown command or experiment 'no_such_thing' (see: bash "
                                               "run.sh help)")
    with pytest.raises(SystemExit) as stop:
        main(["score", "train.epochs=3"])
    assert stop.value.code == 2
    assert "unrecognised arguments: train.epochs=3 (score takes no key=value config overrides)" in \
        capsys.readouterr().err


def test_show_prints_the_resolved_config_as_yaml_with_its_chain_and_what_changed(capsys):
    assert main(["show", "exp20", "--profile", "none"]) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("#")]
    assert header[0].startswith("# exp20: timm's recipe")
    assert header[1] == "# parent chain: exp00 -> exp01 -> exp02 -> exp03 -> exp04 -> exp05 -> exp20"
    assert yaml.safe_load(out) == resolve_config("exp20")[0].model_dump(mode="json")

    assert main(["show", "exp21", "--profile", "demo", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "#   model.backbone: tiny_vit_21m_384.dist_in22k_ft_in1k -> tf_efficientnet_lite0" in out
    assert "# the overrides changed:\n#   train.epochs: 4 -> 2" in out
    assert "#   speed.image_cache: jpg -> none" in out  # the values in effect, defaults included
    assert "# 'auto' (augment.mimic_scale, validation.crop_area): measured from the data's image sizes" in out
    assert yaml.safe_load(out)["train"]["epochs"] == 2
