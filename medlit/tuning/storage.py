"""Optuna storages for sweeps, with dead-worker detection on every one of them.

* ``postgresql://...`` (or any SQLAlchemy URL): Optuna's ``RDBStorage`` and its own
  heartbeat: a worker that stops beating for ``grace_period`` seconds has its trial failed.
* a file path (default ``mlruns/optuna/<study>.journal``): Optuna's journal file storage,
  which several processes on one host (or on a shared file system) append to safely. Optuna
  gives it no heartbeat, so :class:`JournalHeartbeatStorage` adds one: each running trial
  records its owning worker (host, pid, process start time) and a time stamp; a trial is
  stale when its owner on this host is gone (at once, by pid) or when its time stamp is
  older than the grace period (any host).

Either way Optuna's own ``fail_stale_trials`` fails the stale trial (only one worker wins
that update) and the callback retries it with the same parameters.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from medlit.errors import ConfigError
from medlit.liveness import HOST, alive, process_start

log = logging.getLogger(__name__)

OWNER_KEY = "medlit:owner"
HEARTBEAT_INTERVAL = 10  # seconds between heartbeats
GRACE_PERIOD = 60  # seconds without a heartbeat before another host's trial is stale

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def owner_record(trial_id: int) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "trial_id": trial_id,
        "host": HOST,
        "pid": pid,
        "start": process_start(pid),
        "time": time.time(),
    }


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage plus the heartbeat interface Optuna defines for RDB
    storages (``optuna.storages._heartbeat.BaseHeartbeat``), so that
    ``optuna.storages.fail_stale_trials`` works on it unchanged."""

    def __init__(
        self,
        path: Path,
        heartbeat_interval: int = HEARTBEAT_INTERVAL,
        grace_period: int = GRACE_PERIOD,
        stale_trial_callback: StaleCallback | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(path)))
        self.path = path
        self._interval = heartbeat_interval
        self._grace = grace_period
        self._callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, OWNER_KEY, owner_record(trial_id))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get(OWNER_KEY)
            if not owner or owner.get("trial_id") != t._trial_id:
                # No beat of its own yet (a retry carries its original's attributes):
                # only its age can tell.
                started = t.datetime_start.timestamp() if t.datetime_start else now
                if now - started > self._grace:
                    stale.append(t._trial_id)
            elif (
                owner["host"] == HOST
                and not alive(owner["pid"], owner.get("start"))
                or now - owner["time"] > self._grace
            ):
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._callback


def default_storage(study_name: str) -> str:
    return str(Path("mlruns") / "optuna" / f"{study_name}.journal")


def is_url(storage: str) -> bool:
    return "://" in storage


def make_storage(
    storage: str,
    stale_trial_callback: StaleCallback | None = None,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
) -> optuna.storages.BaseStorage:
    """A storage from its spelling: a SQLAlchemy URL (PostgreSQL for many hosts) or a
    journal file path (one host, or a shared file system)."""
    if not is_url(storage):
        return JournalHeartbeatStorage(
            Path(storage).expanduser(), heartbeat_interval, grace_period, stale_trial_callback
        )
    if storage.startswith("sqlite:"):
        log.warning(
            "SQLite storage: Optuna advises against it for parallel workers (lock "
            "contention); use the default journal file on one host or PostgreSQL across hosts"
        )
    try:
        return RDBStorage(
            storage,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=stale_trial_callback,
            engine_kwargs={"pool_pre_ping": True} if not storage.startswith("sqlite:") else None,
        )
    except ImportError as e:
        raise ConfigError(
            f"storage {redact(storage)}: the database driver is missing ({e}); for "
            "PostgreSQL: pip install 'medlit[postgres]'"
        ) from None
    except Exception as e:  # noqa: BLE001 - a connection error: name the storage, no traceback
        raise ConfigError(
            f"storage {redact(storage)}: cannot connect ({type(e).__name__}: {e})"
        ) from None


def redact(url: str) -> str:
    """The storage URL without its password, for logs and MLflow tags."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
