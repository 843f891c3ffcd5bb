"""Every rung of the ladder runs end to end in the CPU demo profile and writes exp00's outputs."""
from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
import yaml

from src.config import CONFIG_DIR
from src.data import STYLE_CSV, style_images_for_fold
from src.errors import UserError

from .conftest import TINY_RUN, run_cli

LADDER = sorted(p.stem for p in CONFIG_DIR.glob("exp*.yaml"))


@pytest.fixture(scope="module")
def root_with_style_images(tiny_root, tmp_path_factory):
    """The tiny data plus real style-transfer images: two for each of the two rarest artists (tiny and few steps)."""
    root = shutil.copytree(tiny_root, tmp_path_factory.mktemp("style") / "data")
    assert run_cli("style", "--data", root, "--rarest", 2, "--per-artist", 2, "--size", 32, "--steps", 2) == 0
    return root


@pytest.mark.parametrize("name", LADDER[1:])
def test_rung_runs_end_to_end(name, root_with_style_images, tmp_path, capsys):
    code = run_cli("run", name, "--data", root_with_style_images, "--outputs", tmp_path / "outputs",
                   "--submissions", tmp_path / "submissions", *TINY_RUN)
    assert code == 0
    out = tmp_path / "outputs" / name
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    train = pd.read_csv(root_with_style_images / "train.csv", dtype={"id": str})
    assert sorted(oof["id"]) == sorted(train["id"])  # generated images never reach the OOF
    assert (out / "test_probs.csv").is_file() and (tmp_path / "submissions" / f"{name}.csv").is_file()
    assert all((out / f"fold{k}" / "history.csv").is_file() for k in range(5))
    # fold k trains on the other folds' paintings plus the generated images neither of whose sources it validates
    uses_style = yaml.safe_load((out / "config.yaml").read_text())["data"]["style_transfer"]
    style = pd.read_csv(root_with_style_images / STYLE_CSV, dtype=str)
    folds = pd.read_csv(next((tmp_path / "outputs" / "folds").glob("*.csv")), dtype={"id": str})
    logged = dict(re.findall(rf"{name} fold (\d): (\d+) train / \d+ val images", capsys.readouterr().out))
    dropped = 0
    for k in range(5):
        val_ids = set(folds.loc[folds["fold"] == k, "id"])
        kept = style_images_for_fold(style, val_ids) if uses_style else style.iloc[:0]
        assert int(logged[str(k)]) == len(train) - len(val_ids) + len(kept)
        assert not (set(kept["style_source_id"]) | set(kept["content_source_id"])) & val_ids
        dropped += len(style) - len(kept)
    if uses_style:
        assert dropped >= len(style)  # each image's style source is validated by some fold, which must skip it


def test_style_rung_without_images_stops_with_instructions(tiny_root, tmp_path, capsys):
    code = run_cli("run", "exp09", "--data", tiny_root, "--outputs", tmp_path / "o", "--submissions", tmp_path / "s",
                   *TINY_RUN)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "style_transfer.csv" in err[0] and "bash run.sh style" in err[0]


def test_ladder_runs_in_turn_and_reports_failures(tiny_root, tmp_path, capsys):
    code = run_cli("ladder", "exp01", "exp09", "--data", tiny_root, "--outputs", tmp_path / "o",
                   "--submissions", tmp_path / "s", *TINY_RUN)
    captured = capsys.readouterr()
    assert code == 2
    assert (tmp_path / "o" / "exp01" / "oof.csv").is_file()
    assert "1 of 2 experiments failed: exp09" in captured.err


def test_ladder_patterns_name_configs_under_configs(tmp_path):
    from src.cli import expand_experiments

    for name in ("aug_blur", "aug_hue", "exp00", "exp01", "feat01"):
        (tmp_path / f"{name}.yaml").write_text("parent: exp00\n")
    assert expand_experiments(["aug_*"], tmp_path) == ["aug_blur", "aug_hue"]
    assert expand_experiments(["exp01", "exp*", "configs/feat01.yaml"], tmp_path) == ["exp01", "exp00", "feat01"]
    with pytest.raises(UserError, match="no config .* matches 'nothing_\\*'"):
        expand_experiments(["nothing_*"], tmp_path)


def test_ladder_expands_the_unexpanded_shell_glob(tiny_root, tmp_path, capsys):
    """`bash run.sh ladder aug_*` reaches the CLI as the literal 'aug_*' when nothing in the current folder matches;
    here every matched config fails fast (an unknown backbone), which shows each was run in turn."""
    code = run_cli("ladder", "aug_*", "--data", tiny_root, "--outputs", tmp_path / "o", "--submissions",
                   tmp_path / "s", *TINY_RUN, "model.backbone=no_such_net")
    err = capsys.readouterr().err
    assert code == 2 and "7 of 7 experiments failed: aug_blur" in err and "aug_saturation" in err
