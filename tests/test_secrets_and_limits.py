"""No password reaches a log or a file: URLs' credentials are hidden in the output, config.yaml, lock files, the
tuned config and the export, while the libraries get the real URL. Inputs that once ended in tracebacks or worse
stop with one short line: a YAML alias bomb, an artist named like a table column, a seed out of range, a full disk,
a symbolic link that leads nowhere, a damaged checkpoint under tta."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from src.core.config import resolve_config
from src.core.errors import UserError
from src.core.files import TEMPORARY, save_torch, write_csv
from src.core.redact import redact, redact_all
from src.core.runtime import seed_everything
from src.core.schema import SEED_RANGE
from src.pipeline.ensemble import load_ensemble_config
from src.pipeline.locks import holder

from .conftest import TINY_RUN, load_error, rewrite, run_cli
from .test_safe_outputs import copy_run, dead_pid, one_error_line

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cret"
MLFLOW_URI = f"http://alice:{SECRET}@127.0.0.1:9/"  # the discard port: nothing listens
STORAGE = f"postgresql://alice:{SECRET}@db-host/studies"


def files_holding(folder: Path, text: str) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


# --- 6. passwords ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    (MLFLOW_URI, "http://alice:***@127.0.0.1:9/"),
    (f"bash run.sh tune exp00 --storage {STORAGE} --study x", "bash run.sh tune exp00 --storage "
     "postgresql://alice:***@db-host/studies --study x"),
    ("mysql://tuner:p@ss@db/x", "mysql://tuner:***@ss@db/x"),  # an unencoded '@': the library reads 'p' too
    ("mysql+pymysql://u@h/db?password=pw&charset=utf8", "mysql+pymysql://u@h/db?password=***&charset=utf8"),
    ("http://host:5000/api", "http://host:5000/api"), ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ("journal:/shared/study.log", "journal:/shared/study.log")])
def test_a_urls_password_is_hidden_and_nothing_else_changes(text, shown):
    assert redact(text) == shown
    assert redact_all({"a": [text, 3, {"b": (text,)}]}) == {"a": [shown, 3, {"b": (shown,)}]}


def test_a_lock_file_names_its_holders_command_without_the_password(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["src/cli.py", "tune", "exp00", "--storage", STORAGE])
    assert SECRET not in holder() and "postgresql://alice:***@db-host/studies" in holder()


@pytest.mark.slow
def test_an_mlflow_password_reaches_neither_the_output_nor_a_file(tiny_root, tmp_path, monkeypatch, capsys):
    """The client still gets the password: the server it cannot reach is named in its error, which is redacted."""
    outputs = tmp_path / "outputs"
    args = ["run", "exp00", "tracking.mlflow=true", f"tracking.mlflow_uri={MLFLOW_URI}", "--data", str(tiny_root),
            "--outputs", str(outputs), "--submissions", str(tmp_path / "s"), *TINY_RUN, "train.folds=[]"]
    monkeypatch.setattr(sys, "argv", ["src/cli.py", *args])
    assert run_cli(*args) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "error: tracking: MLflow failed" in err
    assert "MLflow at http://alice:***@127.0.0.1:9/" in out
    assert files_holding(outputs, SECRET) == []
    saved = yaml.safe_load((outputs / "exp00" / "config.yaml").read_text())
    assert saved["tracking"]["mlflow_uri"] == "http://alice:***@127.0.0.1:9/"
    assert "tracking.mlflow_uri=http://alice:***@127.0.0.1:9/" in saved["run"]["command"]
    assert "tracking.mlflow_uri=http://alice:***@127.0.0.1:9/" in (outputs / "exp00" / ".locks" / "config.lock") \
        .read_text()


@pytest.mark.slow
def test_a_study_storages_password_reaches_neither_the_output_nor_a_file(tiny_root, tmp_path, monkeypatch, capsys):
    """The storage URL is handed to Optuna as given (here mapped onto a local SQLite file: no database server)."""
    from src.tools import study_storage, tune

    given = []

    def local_storage(storage, heartbeat):
        given.append(storage)
        return study_storage.open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat)

    monkeypatch.setattr(tune, "open_storage", local_storage)
    (tmp_path / "space.yaml").write_text("params:\n  optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-3}\n")
    outputs, best = tmp_path / "outputs", tmp_path / "configs" / "exp00_tuned.yaml"
    args = ["tune", "exp00", "--space", str(tmp_path / "space.yaml"), "--trials", "1", "--data", str(tiny_root),
            "--outputs", str(outputs), "--best-config", str(best), "--storage", STORAGE, *TINY_RUN]
    monkeypatch.setattr(sys, "argv", ["src/cli.py", *args])
    assert run_cli(*args) == 0
    out, err = capsys.readouterr()
    assert given and set(given) == {STORAGE}
    assert SECRET not in out + err and "trials finished in postgresql://alice:***@db-host/studies" in out
    assert SECRET not in best.read_text() and "--storage postgresql://alice:***@db-host/studies" in best.read_text()
    assert files_holding(outputs, SECRET) == []
    assert len(list(outputs.rglob("config.yaml"))) == 1 and len(list(outputs.rglob("*.lock"))) >= 1


@pytest.mark.slow
def test_export_hides_passwords_and_removes_a_killed_exports_leftovers(finished_run, tmp_path, capsys):
    """An experiment run before passwords were hidden has one in its config.yaml; the bundle does not. A staging
    folder of an export that was killed (its process gone) goes; one of a live export stays."""
    from src.core.files import this_host

    outputs, _ = copy_run(finished_run, tmp_path)
    config = outputs / "exp00" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["tracking"]["mlflow_uri"] = MLFLOW_URI
    saved["run"]["command"] = f"bash run.sh exp00 tracking.mlflow_uri={MLFLOW_URI}"
    config.write_text(yaml.safe_dump(saved, sort_keys=False))
    out_dir = tmp_path / "export"
    killed = out_dir / f".exp00.{this_host()}-{dead_pid()}.abcd1234.tmp"
    live = out_dir / f".exp00.{this_host()}-{os.getpid()}.efgh5678.tmp"
    for folder in (killed, live):
        (folder / "models").mkdir(parents=True)
        (folder / "models" / "part.pt").write_bytes(b"x" * 4096)
    assert run_cli("export", "exp00", "--outputs", outputs, "--out", out_dir, "--precision", "fp32") == 0
    assert not killed.exists() and live.is_dir()
    assert f"removed {killed}, left by a write that was interrupted" in capsys.readouterr().out
    with zipfile.ZipFile(out_dir / "exp00.zip") as archive:
        leaks = [name for name in archive.namelist() if SECRET.encode() in archive.read(name)]
        bundled = yaml.safe_load(archive.read("models/exp00/config.yaml"))
    assert leaks == [] and files_holding(out_dir / "exp00", SECRET) == []
    assert bundled["tracking"]["mlflow_uri"] == "http://alice:***@127.0.0.1:9/"
    assert not [path for path in out_dir.iterdir() if TEMPORARY.fullmatch(path.name) and path != live]


# --- 7. a YAML alias bomb -------------------------------------------------------------------------------------------

def alias_bomb(levels: int = 9) -> list[str]:
    """`levels` YAML lists, each of nine aliases of the one before: 9**levels strings once expanded."""
    return [f"&a0 [{', '.join(['lol'] * 9)}]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]


def test_a_yaml_alias_bomb_in_a_config_stops_at_once_with_a_short_line(tmp_path):
    (tmp_path / "bomb.yaml").write_text("parent: exp00\ndescription:\n" + "".join(f"  - {level}\n"
                                                                                   for level in alias_bomb()))
    started = time.time()
    with pytest.raises(UserError) as info:
        resolve_config("bomb", config_dir=tmp_path)
    message = str(info.value)
    assert time.time() - started < 10 and len(message) < 400, len(message)
    assert message.startswith("configs/bomb.yaml (resolved): 'description': Input should be a valid string (got "
                              "[[") and message.endswith("...); fix the config")


def test_a_yaml_alias_bomb_on_the_command_line_prints_one_short_line(capsys):
    assert run_cli("show", "exp00", f"description=[{', '.join(alias_bomb())}]") == 2
    line = one_error_line(capsys)
    assert len(line) < 400 and "'description': Input should be a valid string" in line


# --- 8. artists named like a column ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pred", "id", "artist", "fold", "crop"])
def test_an_artist_named_like_a_column_of_the_tables_stops_on_load(name, data_copy):
    def rename(df):
        df.loc[df["artist"] == df.loc[0, "artist"], "artist"] = name
        return df
    rewrite(data_copy / "train.csv", rename)
    message = load_error(data_copy)
    assert f"train.csv line 2: artist '{name}' has the name of a column of the tables a run writes (id, crop, fold, " \
           "artist, pred); rename the artist" in message


# --- 9. seeds -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [("seed=-1", "seed"), (f"seed={2 ** 32}", "seed"),
                                           ("data.fold_seed=-1", "data.fold_seed"),
                                           ("validation.seed=-7", "validation.seed")])
def test_a_seed_out_of_range_stops_with_the_key(override, key):
    with pytest.raises(UserError, match=rf"'{key}': Input should be (greater|less) than or equal to"):
        resolve_config("exp00", overrides=[override])


def test_the_largest_seed_with_a_runs_offsets_still_seeds_every_generator(tmp_path):
    cfg, _ = resolve_config("exp00", overrides=[f"seed={SEED_RANGE['le']}"])
    seed_everything(cfg.seed + 4 + 10_000 * 1024)  # fold 4 of rank 1024
    (tmp_path / "ens.yaml").write_text("members: [exp00, exp01]\nseed: -1\n")
    with pytest.raises(UserError, match="'seed': Input should be greater than or equal to 0"):
        load_ensemble_config("ens", tmp_path)


# --- 10. a full disk ------------------------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_naming_the_folder_and_the_bytes_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "fold0" / "history.csv"
    write_csv(pd.DataFrame({"epoch": [1]}), path)

    def full(self, target, **kwargs):
        Path(target).write_bytes(b"x" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(UserError) as info:
        write_csv(pd.DataFrame({"epoch": [1, 2]}), path)
    assert str(info.value).startswith(f"no space left on the device writing {path}: the file needs more than the "
                                      f"5,000 bytes written when it stopped, and {path.parent} has ")
    assert str(info.value).endswith("free some space (or point --outputs at another disk) and rerun the same "
                                    "command: finished epochs and folds are kept")
    assert path.read_text() == "epoch\n1\n" and [p.name for p in path.parent.iterdir()] == ["history.csv"]


def test_a_full_disk_outside_the_atomic_writes_is_one_line(monkeypatch, capsys):
    from src.pipeline import show

    def full(*args):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/shared/outputs/exp00/tb/fold0/events")

    monkeypatch.setattr(show, "show_config", full)
    assert run_cli("show", "exp00") == 2
    assert one_error_line(capsys) == ("error: the disk quota is used up writing /shared/outputs/exp00/tb/fold0/events; "
                                      "free some space (or point --outputs at another disk) and rerun the same "
                                      "command: finished epochs and folds are kept")


FULL_DISK = """
import sys, torch
from pathlib import Path
from src.core.errors import UserError
from src.core.files import save_torch
folder = Path(sys.argv[1])
try:
    save_torch({"model": {"weight": torch.zeros(2 ** 20)}}, folder / "fold0" / "best.pt")
except UserError as error:
    print(error)
print(sorted(path.name for path in (folder / "fold0").iterdir()))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small file system")
def test_torch_save_on_a_really_full_disk_is_one_line(tmp_path):
    """torch.save's own writer fails with 'iostream error'; through a Python file it is ENOSPC, then one line. On a
    64 KiB tmpfs mounted in a user namespace; skipped where unprivileged namespaces are not allowed."""
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", f'mount -t tmpfs -o size=64k none "{mount}" && '
                           f'mkdir "{mount}/fold0" && "{sys.executable}" "{script}" "{mount}"'],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if "mount" in done.stderr and done.returncode:
        pytest.skip(f"no tmpfs in a user namespace here: {done.stderr.strip()}")
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"no space left on the device writing {mount / 'fold0' / 'best.pt'}: the file needs "
                               f"about 4.0 MiB, and {mount / 'fold0'} has "), done.stdout + done.stderr
    assert lines[1] == "[]", "the temporary file went"


# --- 13. messages that named the wrong cause or the wrong remedy ------------------------------------------------------

@pytest.mark.parametrize("link, reason", [("loop", "is a symbolic link that loops (it leads back to itself)"),
                                          ("dangling", "is a symbolic link to ./nowhere.jpg, which does not exist")])
def test_an_image_that_is_a_broken_symbolic_link_says_so(link, reason, data_copy):
    image = data_copy / pd.read_csv(data_copy / "train.csv")["img_path"][0]
    image.unlink()
    image.symlink_to(image.name if link == "loop" else "./nowhere.jpg")
    message = load_error(data_copy)
    assert "train.csv line 2" in message and reason in message and "not found" not in message


@pytest.mark.slow
def test_tta_on_a_damaged_checkpoint_names_the_command_that_trains_the_fold_again(finished_run, tmp_path, capsys):
    outputs, submissions = copy_run(finished_run, tmp_path)
    best = outputs / "exp00" / "fold0" / "best.pt"
    best.write_bytes(best.read_bytes()[:2000])
    assert run_cli("tta", "exp00", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   submissions) == 2
    line = one_error_line(capsys)
    assert f"{best}: not a readable checkpoint" in line
    assert line.endswith("train the fold again: bash run.sh exp00 train.folds=[0] --restart")


def test_save_torch_leaves_no_temporary_file_behind(tmp_path):
    save_torch({"x": 1}, tmp_path / "a.pt")
    assert [path.name for path in tmp_path.iterdir()] == ["a.pt"]
