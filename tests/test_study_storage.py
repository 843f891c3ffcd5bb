"""One tuning study across workers: two workers started at once on one shared storage (Optuna's journal file, and
a real PostgreSQL server started here) fill one study with distinct trials that both contribute to; one of them is
killed with SIGKILL mid-trial, its trial is failed by the heartbeat, retried once and the study still finishes. On
the journal a retry is not stale at birth, a clock that is minutes off fails no live trial, and a worker whose trial
another worker failed goes on. A storage nobody can use stops with one line before any trial trains."""
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
from types import SimpleNamespace

import optuna
import pytest

from src.core.errors import UserError
from src.tools import study_storage
from src.tools.study_storage import HEARTBEAT_ATTR, open_storage
from src.training import fold as train

from .conftest import TINY_RUN, run_cli
from .test_tune import SPACE

REPO = Path(__file__).resolve().parent.parent
TRIALS = 4  # two workers at once: the first finishes one and is killed in its next
UNPRUNED = SPACE.replace("pruner_startup_trials: 1", "pruner_startup_trials: 100")  # every trial runs to its end


def worker(root: Path, work: Path, storage: str) -> subprocess.Popen:
    (work / "tiny.yaml").write_text(UNPRUNED)
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
    second finishes the study: TRIALS complete trials, distinct, from both workers, the killed one failed and run
    again exactly once (in the same trial folder, so its folds resume), no other trial failed, no last.pt left."""
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
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * TRIALS + ["FAIL"], "one trial failed: the killed"
    assert len({t.number for t in trials}) == len(trials)
    workers = {t.user_attrs["worker"].split(":")[1] for t in trials if t.state.name == "COMPLETE"}
    assert workers == {str(first.pid), str(second.pid)}, "both workers contributed"
    [failed] = [t for t in trials if t.state.name == "FAIL"]
    assert failed.user_attrs["worker"].endswith(str(first.pid))
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.user_attrs["worker"].endswith(str(second.pid))
    assert [t.number for t in trials if t.user_attrs["experiment"] == failed.user_attrs["experiment"]] == \
        [failed.number, retry.number], "the retry resumes the same folds, and runs once"
    study_dir = work / "outputs" / "tune" / "shared"
    assert (study_dir / "trials.csv").is_file() and (work / "configs" / "best.yaml").is_file()
    assert not list(study_dir.rglob("last.pt"))


@pytest.mark.slow
def test_two_workers_fill_one_journal_study_and_a_killed_worker_does_not_leave_it_stuck(tiny_root, tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "shared" / "study.journal"
    two_workers_one_killed(tiny_root, tmp_path, f"journal:{journal}",
                           lambda: JournalStorage(JournalFileBackend(str(journal))))


def states(storage, study_id: int) -> dict[int, str]:
    return {t.number: t.state.name for t in storage.get_all_trials(study_id, deepcopy=False)}


def test_on_a_journal_a_retry_is_not_stale_at_birth_and_a_clock_minutes_off_fails_no_live_trial(tmp_path,
                                                                                                  monkeypatch):
    """Three workers on one journal (heartbeat 1 s): `live` beats with a clock 5 minutes behind, `dead` beats once
    and stops; `sweeper` fails the dead trial only, after two intervals of its own clock, and queues one retry
    without the dead trial's heartbeat; `live` takes the retry, and the sweeper's sweeps before its first beat leave
    it running."""
    journal = f"journal:{tmp_path / 'study.journal'}"
    live, dead, sweeper = (open_storage(journal, 1) for _ in range(3))
    study_id = live.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    study = optuna.load_study(study_name="s", storage=sweeper)
    running, lost = live.create_new_trial(study_id), dead.create_new_trial(study_id)
    behind = SimpleNamespace(time=lambda: time.time() - 300, monotonic=time.monotonic)

    def beat_behind():
        with monkeypatch.context() as patch:
            patch.setattr(study_storage, "time", behind)
            live.record_heartbeat(running)

    dead.record_heartbeat(lost)
    deadline = time.monotonic() + 10
    while states(sweeper, study_id)[1] == "RUNNING" and time.monotonic() < deadline:
        beat_behind()
        optuna.storages.fail_stale_trials(study)
        assert states(sweeper, study_id)[0] == "RUNNING", "a live trial is never stale, whatever its clock"
        time.sleep(0.25)
    assert states(sweeper, study_id) == {0: "RUNNING", 1: "FAIL", 2: "WAITING"}
    retry = sweeper.get_trial(sweeper.get_trial_id_from_study_id_trial_number(study_id, 2))
    assert retry.system_attrs["failed_trial"] == 1 and HEARTBEAT_ATTR not in retry.system_attrs
    assert live.set_trial_state_values(retry._trial_id, optuna.trial.TrialState.RUNNING), "live takes the retry"
    for _ in range(2):  # within two intervals of being seen, before it beats
        optuna.storages.fail_stale_trials(study)
        time.sleep(0.5)
    assert states(sweeper, study_id) == {0: "RUNNING", 1: "FAIL", 2: "RUNNING"}, "one retry, running"


@pytest.mark.slow
def test_a_worker_whose_trial_another_worker_failed_goes_on(tiny_root, tmp_path, monkeypatch, capsys):
    """Mid-trial, another worker fails this worker's trial and queues its retry (what a sweep that took the trial
    for stale does): the worker's next report is refused; it says so in one line, then runs the retry, which
    resumes the trial's fold and completes the study."""
    journal = tmp_path / "study.journal"
    other = open_storage(f"journal:{journal}", 1)

    def failed_elsewhere(labels, probs):
        study = optuna.load_study(study_name="shared", storage=other)
        [trial] = study.get_trials(deepcopy=False)
        assert other.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        other.get_heartbeat_stale_trial_callback()(study, other.get_trial(trial._trial_id))
        monkeypatch.setattr(train, "scores", scores)
        return scores(labels, probs)

    scores = train.scores
    monkeypatch.setattr(train, "scores", failed_elsewhere)
    (tmp_path / "tiny.yaml").write_text(UNPRUNED)
    assert run_cli("tune", "exp00", "--space", tmp_path / "tiny.yaml", "--trials", "1", "--folds", "0", "--storage",
                   f"journal:{journal}", "--study", "shared", "--heartbeat", "1", "--data", tiny_root,
                   "--outputs", tmp_path / "outputs", "--best-config", tmp_path / "best.yaml", *TINY_RUN) == 0
    out = capsys.readouterr().out
    assert ("shared: trial 0 was failed by another worker while this one ran it (its heartbeat looked stale there, "
            "which queues its retry); this worker goes on") in out
    assert "shared-t000 fold 0: resuming after epoch 1" in out, "the retry resumes the trial's fold"
    trials = optuna.load_study(study_name="shared", storage=other).get_trials(deepcopy=False)
    assert [(t.state.name, t.system_attrs.get("failed_trial")) for t in trials] == [("FAIL", None), ("COMPLETE", 0)]
    assert not list((tmp_path / "outputs").rglob("last.pt"))


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
