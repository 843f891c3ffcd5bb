"""Where a tuning study lives, so that any number of workers, on one machine or many, fill one study together:
the local SQLite file (the default), a database any worker reaches (an SQLAlchemy URL: postgresql://, mysql://,
sqlite:///), or Optuna's journal file on a file system every worker shares (journal:PATH).

Every storage keeps a heartbeat per running trial: a worker that dies mid-trial (kill -9, a lost node) stops beating,
and the next worker to look fails its trial and enqueues it again (Optuna's RetryHeartbeatStaleTrialCallback), so
the study never waits for a trial nobody runs. Optuna's RDBStorage has the heartbeat built in (the database server's
clock times it); its journal storage has none in 5.0, so here the heartbeat is a trial system attribute that Optuna's
heartbeat thread counts up. No two machines' clocks are compared: a worker judges a trial stale when its count has
not moved for two intervals by its own clock, so clock skew between machines cannot fail a live trial, and a retry,
which starts without the dead trial's count, is watched afresh from the moment it is seen.

A storage that cannot be used (a database that does not answer, a wrong password, a missing driver, a journal on a
disk that cannot be written) stops with one line before any trial trains.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from ..core.errors import UserError, first_line
from ..core.redact import redact
from ..core.requirements import pip_line

JOURNAL_PREFIX = "journal:"
HEARTBEAT_ATTR = "heartbeat"
# The database drivers SQLAlchemy imports for each URL scheme, and what installs them (psycopg: its line of
# requirements/tuning.txt).
DRIVERS = {"psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "psycopg": "psycopg",
           "mysql.connector": "mysql-connector-python"}
RETRIES = 3  # times a trial whose worker died is run again


class Retry:
    """Optuna's RetryHeartbeatStaleTrialCallback, minus the dead trial's heartbeat: Optuna copies every system
    attribute into the retry, and a copied count would make the retry look stale before its first beat."""

    def __init__(self, max_retry: int):
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study, trial) -> None:
        trial.system_attrs = {key: value for key, value in trial.system_attrs.items() if key != HEARTBEAT_ATTR}
        self.retry(study, trial)


def journal_storage(path: Path, heartbeat: int, retry: Retry) -> Any:
    """Optuna's JournalStorage on `path`, with a heartbeat per running trial kept as a trial system attribute."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        def __init__(self, backend):
            super().__init__(backend)
            self._beats: dict[int, int] = {}  # trial id -> the beats this process wrote for it
            # study id -> {running trial id: (its heartbeat as last seen, this process's monotonic time then)}
            self._seen: dict[int, dict[int, tuple[Any, float]]] = {}
            self._seen_lock = threading.Lock()

        def record_heartbeat(self, trial_id: int) -> None:
            self._beats[trial_id] = self._beats.get(trial_id, 0) + 1
            try:
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, self._beats[trial_id])
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # the trial ended between two beats, or another worker failed it
            for study_id in list(self._seen):  # keep watching the other trials while this worker trains
                self._get_stale_trial_ids(study_id)

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            """The study's running trials whose heartbeat has not changed for two intervals of this process's
            clock (a trial seen for the first time starts its two intervals now)."""
            now = time.monotonic()
            running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            with self._seen_lock:
                before = self._seen.get(study_id, {})
                seen = {}
                for trial in running:
                    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
                    last = before.get(trial._trial_id)
                    seen[trial._trial_id] = last if last is not None and last[0] == beat else (beat, now)
                self._seen[study_id] = seen
            return [trial_id for trial_id, (_, since) in seen.items() if now - since > 2 * heartbeat]

        def get_heartbeat_interval(self) -> int:
            return heartbeat

        def get_heartbeat_stale_trial_callback(self):
            return retry

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
        return HeartbeatJournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise UserError(f"--storage {JOURNAL_PREFIX}{path}: cannot write {path} ({exc.strerror or exc}); put the "
                        "journal on a writable folder that every worker shares") from None


def open_storage(storage: str, heartbeat: int) -> Any:
    """The Optuna storage `storage` names ("journal:PATH" or an SQLAlchemy URL), checked by connecting to it."""
    from optuna.storages import RDBStorage

    retry = Retry(RETRIES)
    if storage.startswith(JOURNAL_PREFIX):
        return journal_storage(Path(storage[len(JOURNAL_PREFIX):]).expanduser(), heartbeat, retry)
    shown = redact(storage)
    try:
        return RDBStorage(storage, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                          heartbeat_stale_trial_callback=retry)
    except ImportError as exc:  # Optuna wraps the driver's ModuleNotFoundError
        module = getattr(exc.__cause__ or exc.__context__, "name", None) or exc.name or "?"
        package = next((pip for name, pip in DRIVERS.items() if module == name or module.startswith(f"{name}.")),
                       module)
        raise UserError(f"--storage {shown}: the database driver {module} is not installed; run: "
                        f"{pip_line(package)}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises one class per dialect and failure; each is one line
        raise UserError(f"--storage {shown}: cannot use the database ({redact(first_line(exc))}); check the URL, "
                        "that the server runs and answers from this machine, and the user and password") from None
