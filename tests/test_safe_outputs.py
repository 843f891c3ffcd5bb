"""Nothing a user types deletes or silently changes work it should not touch: names are plain names, every delete
goes through src/core/removal.py, --restart removes exactly the folds it trains again (also under --gpus), export
replaces only an earlier bundle, a refused run writes nothing, experiments and ensembles share one namespace, a
finished fold with a damaged file is trained again, and what killed writes left is removed by the next run."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from src.core.config import resolve_config
from src.core.errors import UserError
from src.core.files import TEMPORARY, atomic_path, this_host, writer_gone
from src.core.layout import FoldDir
from src.core.paths import CONFIG_DIR, ENSEMBLE_DIR, REPO, SHARED_OUTPUT_FOLDERS
from src.core.removal import remove_output
from src.model.checkpoints import read_checkpoint
from src.pipeline.ensemble import load_ensemble_config
from src.pipeline.run import fold_status

from .conftest import TINY_RUN, run_cli


def copy_run(finished_run, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the session's finished exp00 (outputs and submissions) that a test may change."""
    return (Path(shutil.copytree(finished_run["outputs"], tmp_path / "outputs")),
            Path(shutil.copytree(finished_run["submissions"], tmp_path / "submissions")))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- 1. names ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "a/b", "ABSOLUTE", "exp00/fold0", ".hidden", "x" * 129])
def test_a_name_that_is_not_a_plain_name_stops_before_anything_is_written(name, tmp_path, capsys):
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    outputs = tmp_path / "outputs"
    assert run_cli("run", "exp00", "--data", tmp_path, "--outputs", outputs, "--submissions", tmp_path / "s",
                   *TINY_RUN, f"name={name}", "train.folds=[]", "--restart") == 2
    assert "'name': not a plain name" in one_error_line(capsys)
    assert not outputs.exists() and not (tmp_path / "elsewhere").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv", [["show", "../x"], ["run", "/tmp/x", "OUT", "DATA"],
                                  ["tta", "../exp00", "OUT", "DATA"], ["ensemble", "../ens01", "OUT", "DATA"], ["predict", "..", "OUT", "DATA"],
                                  ["export", "../../x", "OUT"], ["score", "../x", "OUT"],
                                  ["score", "--detail", "a/b", "OUT"], ["board", "..", "OUT"],
                                  ["tune", "exp00", "--trials", "1", "--study", "../../x", "OUT", "DATA"]])
def test_every_command_that_takes_a_name_refuses_one_that_is_not_plain(argv, tmp_path, capsys):
    """Outputs and data under tmp_path (a data root without train.csv), so a regression writes nothing elsewhere."""
    places = {"OUT": ["--outputs", tmp_path / "outputs"], "DATA": ["--data", tmp_path / "nodata"]}
    assert run_cli(*[part for item in argv for part in places.get(item, [item])]) == 2
    assert "not a plain name" in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", SHARED_OUTPUT_FOLDERS)
def test_a_name_of_a_shared_outputs_folder_is_refused(name, tmp_path, capsys):
    """outputs/folds holds every experiment's folds and outputs/cache the image cache: an experiment named like one
    would mix its folds and --restart into them."""
    outputs = tmp_path / "outputs"
    assert run_cli("run", "exp00", "--data", tmp_path, "--outputs", outputs, *TINY_RUN, f"name={name}") == 2
    assert "a folder OUTPUTS shares between experiments" in one_error_line(capsys)
    assert not outputs.exists()


def test_every_shared_outputs_folder_the_code_writes_is_reserved():
    """Each `outputs / "NAME"` the commands write (and FEATURE_DIR) is in SHARED_OUTPUT_FOLDERS."""
    from src.training.frozen import FEATURE_DIR

    written = {FEATURE_DIR} | {folder for path in (REPO / "src").rglob("*.py")
                               for folder in re.findall(r'utputs\)? / "([A-Za-z_]+)"', path.read_text())}
    assert written <= set(SHARED_OUTPUT_FOLDERS), written - set(SHARED_OUTPUT_FOLDERS)


def test_a_parent_or_an_ensemble_member_that_is_not_a_plain_name_names_its_file(tmp_path):
    (tmp_path / "child.yaml").write_text("parent: ../configs/exp00\n")
    with pytest.raises(UserError, match=r"child.yaml: parent '../configs/exp00': not a plain name"):
        resolve_config("child", config_dir=tmp_path)
    (tmp_path / "ens.yaml").write_text("members: [exp00, ../exp01]\n")
    with pytest.raises(UserError, match=r"ens.yaml: 'members': member '../exp01': not a plain name"):
        load_ensemble_config("ens", tmp_path)


@pytest.mark.slow
def test_name_dotdot_with_restart_leaves_the_repository_in_a_throwaway_clone(tiny_root, tmp_path):
    """`bash run.sh exp00 name=.. train.folds=[] --restart` once ran rmtree(outputs/..): the repository. Run in a
    clone of it (with this working tree's src/), so a regression deletes only the clone."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.rmtree(clone / "src")
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "outputs").mkdir(exist_ok=True)
    before = {path: path.exists() for path in (clone / ".git", clone / "src", clone / "configs", clone / "inputs")}
    done = subprocess.run([sys.executable, "-m", "src.cli", "exp00", "--data", str(tiny_root), "name=..",
                           "train.folds=[]", "--restart", *TINY_RUN], cwd=clone, capture_output=True, text=True)
    assert done.returncode == 2 and "'name': not a plain name" in done.stderr, done.stderr
    assert {path: path.exists() for path in before} == before == dict.fromkeys(before, True)
    assert subprocess.run(["git", "status", "--porcelain", "--", "configs", "inputs", "run.sh"], cwd=clone,
                          capture_output=True, text=True, check=True).stdout == ""


# --- 2. --restart removes exactly the folds it trains again, of the experiment it runs --------------------------

@pytest.mark.slow
def test_gpus_with_a_name_and_restart_removes_that_experiments_folds_and_nothing_else(finished_run, tmp_path,
                                                                                       monkeypatch, capsys):
    from src.pipeline import launch

    outputs, submissions = copy_run(finished_run, tmp_path)
    shutil.copytree(outputs / "exp00", outputs / "X")
    shutil.copy(submissions / "exp00.csv", submissions / "X.csv")
    exp00 = snapshot(outputs / "exp00")
    removed = ("fold1/", "tb/fold1/", "tb/experiment/", "oof.csv", "test_probs.csv")
    kept = {name: digest for name, digest in snapshot(outputs / "X").items()
            if not name.startswith((*removed, "config.yaml", ".locks/"))}
    monkeypatch.setattr(launch, "run_jobs", lambda jobs, *args, **kwargs: [])  # the fold jobs are not the point
    assert run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   submissions, "--gpus", "0", *TINY_RUN, "name=X", "train.folds=[1]", "--restart") == 0
    out = capsys.readouterr().out
    assert f"--restart: removed fold1, tb/fold1, tb/experiment, oof.csv, test_probs.csv, {submissions / 'X.csv'} " \
           f"from {outputs / 'X'}, to train folds [1] again" in out
    assert snapshot(outputs / "exp00") == exp00 and (submissions / "exp00.csv").is_file()
    after = snapshot(outputs / "X")
    assert not [name for name in after if name.startswith(removed)] and not (submissions / "X.csv").exists()
    assert {name: after.get(name) for name in kept} == kept


def test_the_one_delete_refuses_what_is_outside_its_root_or_not_an_output(tmp_path):
    experiment = tmp_path / "outputs" / "exp00"
    (experiment / "fold0").mkdir(parents=True)
    (experiment / "config.yaml").write_text("name: exp00\n")
    (experiment / "notes").mkdir()
    for root, path, message in ((tmp_path / "outputs", tmp_path / "outputs", "not inside"),
                                (experiment, experiment / ".." / "exp00", "not inside"),
                                (tmp_path / "outputs", experiment, "not a fold folder"),
                                (tmp_path / "outputs", experiment / "notes", "not a fold folder"),
                                (tmp_path, tmp_path / "outputs", "not a fold folder")):
        with pytest.raises(UserError, match=f"refusing to delete {re.escape(str(path))}: .*{message}"):
            remove_output(root, path)
    (experiment / "link").symlink_to(experiment / "fold0")
    with pytest.raises(UserError, match="is a symbolic link"):
        remove_output(experiment, experiment / "link")
    remove_output(tmp_path / "outputs", experiment / "fold0")
    assert not (experiment / "fold0").exists() and (experiment / "notes").is_dir()


# --- 3. export replaces an earlier bundle, never an experiment ---------------------------------------------------

@pytest.mark.slow
def test_export_into_the_outputs_folder_refuses_and_keeps_the_experiment(finished_run, tmp_path, capsys):
    outputs, _ = copy_run(finished_run, tmp_path)
    before = snapshot(outputs / "exp00")
    assert run_cli("export", "exp00", "--outputs", outputs, "--out", outputs, "--precision", "fp32") == 2
    assert f"export: {outputs / 'exp00'} exists and is not an export bundle" in one_error_line(capsys)
    assert snapshot(outputs / "exp00") == before
    (tmp_path / "mine" / "exp00").mkdir(parents=True)
    (tmp_path / "mine" / "exp00" / "thesis.tex").write_text("years of work")
    assert run_cli("export", "exp00", "--outputs", outputs, "--out", tmp_path / "mine", "--precision", "fp32") == 2
    assert "is not an export bundle" in one_error_line(capsys)
    assert (tmp_path / "mine" / "exp00" / "thesis.tex").read_text() == "years of work"


# --- 4. a refused run writes nothing -------------------------------------------------------------------------------

def hold_lock(path: Path) -> subprocess.Popen:
    """Another process that holds the lock at `path` (as a run training that fold does) until it is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; handle = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(handle, fcntl.LOCK_EX); handle.write('run A'); handle.flush(); "
                               "print('held', flush=True); time.sleep(300)", str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_run_refused_by_another_runs_lock_leaves_its_config_yaml_alone(finished_run, tmp_path, capsys):
    """Run A trains exp00 (its config.yaml written, fold 1 finished, fold 0's lock held); run B of another input size
    is refused, whether it asks for fold 0 or for a fold A does not hold (with --restart too), and so is A's own
    config under --gpus; config.yaml and fold 1 are still A's."""
    outputs = tmp_path / "outputs"
    (outputs / "exp00").mkdir(parents=True)
    shutil.copy(finished_run["exp"] / "config.yaml", outputs / "exp00" / "config.yaml")
    shutil.copytree(finished_run["exp"] / "fold1", outputs / "exp00" / "fold1")
    before = snapshot(outputs / "exp00")
    holder = hold_lock(outputs / "exp00" / ".locks" / "fold0.lock")
    try:
        args = ["run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions", tmp_path / "s",
                *TINY_RUN, "input.img_size=64"]
        assert run_cli(*args) == 2
        assert "training exp00 fold 0 is in progress in run A" in one_error_line(capsys)
        same_config = [arg for arg in args if arg != "input.img_size=64"]
        assert run_cli(*same_config, "--gpus", "0,0") == 2  # refused before a fold job's log replaces A's
        assert "training exp00 fold 0 is in progress in run A" in one_error_line(capsys)
        for restart in ([], ["--restart"]):
            assert run_cli(*args, "train.folds=[1]", *restart) == 2
            assert f"exp00 is being trained with another config ({outputs / 'exp00' / 'config.yaml'}) by run A" in \
                one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert {name: digest for name, digest in snapshot(outputs / "exp00").items() if ".locks" not in name} == before
    assert not (tmp_path / "s").exists()


# --- 5. experiments, TTA runs and ensembles share one namespace ---------------------------------------------------

@pytest.mark.slow
def test_an_ensemble_named_like_an_experiment_is_refused_and_the_experiment_kept(finished_run, tmp_path, capsys,
                                                                                    monkeypatch):
    from src.core import layout
    from src.pipeline import ensemble

    outputs, submissions = copy_run(finished_run, tmp_path)
    shutil.copytree(outputs / "exp00", outputs / "k2")
    before = snapshot(outputs / "k2")
    ensembles = tmp_path / "ensemble"
    ensembles.mkdir()
    for name in ("k2", "exp01", "ens9"):
        (ensembles / f"{name}.yaml").write_text("members: [exp00, k2]\n")
    monkeypatch.setattr(ensemble, "ENSEMBLE_DIR", ensembles)
    monkeypatch.setattr(layout, "ENSEMBLE_DIR", ensembles)
    common = ["--data", finished_run["root"], "--outputs", outputs, "--submissions", submissions]
    assert run_cli("ensemble", "k2", *common) == 2
    assert f"{outputs / 'k2'} holds an experiment named k2; an ensemble of the same name would overwrite it" in \
        one_error_line(capsys)
    assert snapshot(outputs / "k2") == before
    assert run_cli("ensemble", "exp01", *common) == 2
    assert f"{CONFIG_DIR / 'exp01.yaml'} also names exp01" in one_error_line(capsys)
    assert run_cli("run", "exp00", *common, *TINY_RUN, "name=ens9", "train.folds=[]") == 2
    assert f"{ensembles / 'ens9.yaml'} also names ens9" in one_error_line(capsys)
    assert not (outputs / "ens9").exists()


def test_shipped_experiments_and_ensembles_have_different_names():
    assert not {p.stem for p in CONFIG_DIR.glob("*.yaml")} & {p.stem for p in ENSEMBLE_DIR.glob("*.yaml")}


# --- 11 and 13. a finished fold with a damaged file ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("damage", ["best.pt cut short", "best.pt deleted", "done.json emptied",
                                    "test_probs.csv deleted", "val_probs.csv deleted", "intact"])
def test_a_finished_folds_damaged_file_marks_that_fold_alone_for_training_again(damage, finished_run, tmp_path):
    fold = FoldDir(Path(shutil.copytree(finished_run["exp"] / "fold2", tmp_path / "exp00" / "fold2")))
    fingerprint = fold.done_record()["fingerprint"]
    if damage == "best.pt cut short":
        fold.best.write_bytes(fold.best.read_bytes()[:-100])
    elif damage == "done.json emptied":
        fold.done.write_text("")
    elif damage != "intact":
        (fold.path / damage.split()[0]).unlink()
    expected = {"intact": None, "best.pt cut short": "best.pt is damaged (File is not a zip file)",
                "best.pt deleted": "best.pt is missing", "done.json emptied": "done.json is empty or damaged",
                "test_probs.csv deleted": "test_probs.csv is missing",
                "val_probs.csv deleted": "val_probs.csv is missing"}[damage]
    assert fold.damage() == expected
    assert fold_status(fold, fingerprint) == ("done" if damage == "intact" else "damaged")
    if damage == "best.pt deleted":  # a frozen-feature fold has no weights
        assert fold_status(fold, fingerprint, weights=False) == "done"


@pytest.mark.slow
def test_a_run_trains_again_the_one_fold_whose_best_pt_is_cut_short(finished_run, tmp_path, capsys):
    outputs, submissions = copy_run(finished_run, tmp_path)
    best = outputs / "exp00" / "fold2" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    others = {name: digest for name, digest in snapshot(outputs / "exp00").items() if name.startswith("fold")
              and not name.startswith("fold2")}
    assert run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   submissions, *TINY_RUN) == 0
    out = capsys.readouterr().out
    assert "exp00 fold 2 was finished, but best.pt is damaged (File is not a zip file): training the fold again" in out
    assert out.count("already complete, skipped") == 4 and "exp00 fold 2 epoch 1/1" in out
    assert read_checkpoint(best)["epoch"] == 1
    assert {name: digest for name, digest in snapshot(outputs / "exp00").items() if name in others} == others
    assert "CV macro F1" in out.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["done.json", "test_probs.csv"])
def test_an_emptied_done_json_or_a_deleted_fold_file_is_reported_not_a_traceback(damage, finished_run, tmp_path,
                                                                                 capsys):
    outputs, submissions = copy_run(finished_run, tmp_path)
    path = outputs / "exp00" / "fold3" / damage
    path.write_text("") if damage == "done.json" else path.unlink()
    assert run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   submissions, *TINY_RUN, "train.folds=[]") == 0
    out = capsys.readouterr().out
    reason = "done.json is empty or damaged" if damage == "done.json" else "test_probs.csv is missing"
    assert f"exp00 fold 3 was finished, but {reason}: a run that trains it (train.folds) trains it again" in out
    assert "exp00: folds [3] not trained yet" in out


# --- 12. what killed writes left ------------------------------------------------------------------------------------

def test_a_temporary_name_says_which_process_of_which_machine_writes_it(tmp_path):
    with atomic_path(tmp_path / "oof.csv") as tmp:
        match = TEMPORARY.fullmatch(tmp.name)
        assert match and match["target"] == "oof.csv" and match["host"] == this_host()
        assert int(match["pid"]) == os.getpid() and writer_gone(tmp.name) is False
    assert writer_gone(f".oof.csv.{this_host()}-{dead_pid()}.abcd1234.tmp") is True
    assert writer_gone(".oof.csv.abcd1234.tmp") is None and writer_gone(".oof.csv.elsewhere-1.abcd1234.tmp") is None


@pytest.mark.slow
def test_a_run_removes_what_killed_writes_left_and_keeps_writes_in_progress(finished_run, tmp_path, capsys):
    outputs, submissions = copy_run(finished_run, tmp_path)
    experiment, host, dead = outputs / "exp00", this_host(), dead_pid()
    stale = [experiment / "fold0" / f".last.pt.{host}-{dead}.abcd1234.tmp",
             experiment / "fold0" / ".best.pt.qwer5678.tmp",  # an earlier version's name, in a fold this run locks
             experiment / f".oof.csv.{host}-{dead}.zxcv1234.tmp"]
    kept = [experiment / f".config.yaml.{host}-{os.getpid()}.live1234.tmp",  # a live writer
            experiment / ".oof.csv.otherhost-1.abcd1234.tmp",  # another machine's: it cannot be told
            experiment / "notes.tmp"]  # not a temporary name
    for path in stale + kept:
        path.write_bytes(b"x" * 1000)
    assert run_cli("run", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   submissions, *TINY_RUN) == 0
    out = capsys.readouterr().out
    assert [path for path in stale if path.exists()] == [] and all(path.exists() for path in kept)
    assert all(f"removed {path}, left by a write that was interrupted" in out for path in stale)
