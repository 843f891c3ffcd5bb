"""One tuning study across workers: two workers started at once on one shared storage (Optuna's journal file, and
a real PostgreSQL server started here) fill one study with distinct trials that both contribute to; one of them is
killed with SIGKILL mid-trial, its trial is failed by the heartbeat, retried and the study still finishes. A storage
nobody can use stops with one line before any trial trains."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from src.core.errors import UserError
from src.tools.study_storage import open_storage

from .conftest import TINY_RUN
from .test_tune import SPACE

REPO = Path(__file__).resolve().parent.parent
TRIALS = 4  # two workers at once: the first finishes one and is killed in its next


def worker(root: Path, work: Path, storage: str) -> subprocess.Popen:
    (work / "tiny.yaml").write_text(SPACE)
    (work / "configs").mkdir(exist_ok=True)
    command = [sys.executable, "-m", "src.cli", "tune", "exp00", "--space", str(work / "tiny.yaml"), "--trials",
               str(TRIALS), "--folds", "0", "--storage", storage, "--study", "shared", "--heartbeat", "1",
               "--data", str(root), "--outputs", str(work / "outputs"),
               "--best-config", str(work / "configs" / "best.yaml"),
               *TINY_RUN]
    log = open(work / f"worker-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def trials_of(storage, pid: int | None = None) -> list:
    study = optuna.load_study(study_name="shared", storage=storage)
    return [t for t in study.get_trials(deepcopy=False)
            if pid is None or t.user_attrs.get("worker") == f"{socket.gethostname()}:{pid}"]


def two_workers_one_killed(root: Path, work: Path, storage: str, reader) -> None:
    """Start two workers at once; kill the first with SIGKILL once it has finished a trial and runs its next; the
    second finishes the study: TRIALS finished trials, distinct, from both workers, the killed one failed and run
    again (in the same trial folder, so its folds resume)."""
    first, second = worker(root, work, storage), worker(root, work, storage)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            mine = trials_of(reader(), first.pid)
        except (FileNotFoundError, KeyError):  # the workers have not created the study yet
            mine = []
        if any(t.state.name in ("COMPLETE", "PRUNED") for t in mine) and any(t.state.name == "RUNNING" for t in mine):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the first worker never had a finished and a running trial")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert second.wait(timeout=300) == 0, (work / "outputs").as_posix()
    trials = trials_of(reader())
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == TRIALS and len({t.number for t in trials}) == len(trials)
    workers = {t.user_attrs["worker"].split(":")[1] for t in finished}
    assert workers == {str(first.pid), str(second.pid)}, "both workers contributed"
    [failed] = [t for t in trials if t.state.name == "FAIL"]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state.name in ("COMPLETE", "PRUNED") and retry.user_attrs["worker"].endswith(str(second.pid))
    assert retry.user_attrs["experiment"] == failed.user_attrs["experiment"], "the retry resumes the same folds"
    study_dir = work / "outputs" / "tune" / "shared"
    assert (study_dir / "trials.csv").is_file() and (work / "configs" / "best.yaml").is_file()


@pytest.mark.slow
def test_two_workers_fill_one_journal_study_and_a_killed_worker_does_not_leave_it_stuck(tiny_root, tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "shared" / "study.journal"
    two_workers_one_killed(tiny_root, tmp_path, f"journal:{journal}",
                           lambda: JournalStorage(JournalFileBackend(str(journal))))


def postgres_binaries() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server of Debian's postgresql package in a temporary folder, on a free port, with password
    authentication; stopped and removed afterwards. As root it runs as the postgres user (initdb refuses root), in
    a folder of /tmp that user can reach (pytest's own are private to root)."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("the PostgreSQL server is not installed here (apt-get install postgresql; .ci/run installs it)")
    home, password = Path(tempfile.mkdtemp(prefix="artist-pg-")), "s3cret"
    data, pwfile = home / "data", home / "pwfile"
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data.mkdir()
    pwfile.write_text(password)
    if prefix:
        os.chmod(home, 0o755)
        for path in (data, pwfile):
            shutil.chown(path, "postgres")
    try:
        subprocess.run([*prefix, str(binaries / "initdb"), "-D", str(data), "-U", "tuner", "--pwfile", str(pwfile),
                        "--auth=scram-sha-256"], check=True, capture_output=True, timeout=120)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"),
                        "-w", "start"], check=True, capture_output=True, timeout=120)
        yield f"postgresql://tuner:{password}@127.0.0.1:{port}/postgres"  # the database initdb makes
    finally:
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_fill_one_postgresql_study_and_a_killed_worker_does_not_leave_it_stuck(tiny_root, tmp_path,
                                                                                          postgres):
    from optuna.storages import RDBStorage

    wrong = postgres.replace(":s3cret@", ":wrong@")
    with pytest.raises(UserError) as info:
        open_storage(wrong, 60)
    message = str(info.value)
    assert "\n" not in message and "s3cret" not in message and "wrong" not in message
    assert message.startswith("--storage postgresql://tuner:***@127.0.0.1") and "password authentication failed" \
        in message
    storage = None

    def reader():  # one engine for all the polling
        nonlocal storage
        storage = storage or RDBStorage(postgres)
        return storage

    two_workers_one_killed(tiny_root, tmp_path, postgres, reader)


@pytest.mark.parametrize("storage, message", [
    ("postgresql://tuner:pw@127.0.0.1:9/studies",
     "--storage postgresql://tuner:***@127.0.0.1:9/studies: cannot use the database (OperationalError: "),
    ("mysql://tuner@127.0.0.1/studies",
     "--storage mysql://tuner@127.0.0.1/studies: the database driver MySQLdb is not installed; run: pip install "
     "mysqlclient"),
    ("journal:/sys/artist-tune.journal", "--storage journal:/sys/artist-tune.journal: cannot write "
                                         "/sys/artist-tune.journal ("),
    ("postgress://tuner@127.0.0.1/studies", "--storage postgress://tuner@127.0.0.1/studies: cannot use the database "
                                            "(NoSuchModuleError: Can't load plugin: sqlalchemy.dialects:postgress)"),
])
def test_a_storage_nobody_can_use_stops_with_one_line(storage, message):
    with pytest.raises(UserError) as info:
        open_storage(storage, 60)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
