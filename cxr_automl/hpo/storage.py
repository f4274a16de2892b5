"""Study storage shared by many workers: a spec string -> an Optuna storage with heartbeats and retries.

Specs: ``journal:PATH`` or a ``PATH`` ending ``.log`` (Optuna's journal file storage, safe on NFS),
``postgresql://...`` (big clusters), ``sqlite:///PATH`` (one worker; warned about with more).
Every storage gets a heartbeat: RDB storages use Optuna's own (``heartbeat_interval``/``grace_period``);
the journal storage has none in Optuna 5, so :class:`JournalHeartbeatStorage` adds one through trial
system attributes, which lets Optuna's ``fail_stale_trials`` treat both alike.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cxr_automl.errors import UserError
from cxr_automl.hpo import optuna_private

log = logging.getLogger(__name__)
T = TypeVar("T")

HEARTBEAT_INTERVAL, GRACE_PERIOD = 30, 120
#: seconds to wait between attempts when the storage does not answer (then a clear error)
RETRY_DELAYS = (1, 2, 4, 8, 16)


class StorageUnavailableError(UserError):
    pass


def requeue_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Runs once per trial whose worker stopped beating (killed, node lost), right after Optuna marks it
    FAIL: enqueue the same parameters with its run dir, so a live worker resumes it from its last
    epoch checkpoint instead of starting over."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "retry_of")}
    attrs.setdefault("retry_of", trial.number)
    if trial.user_attrs.get("run_dir"):
        attrs["resume_run_dir"] = trial.user_attrs["run_dir"]
    attrs["requeued_because"] = f"trial {trial.number}'s worker {trial.user_attrs.get('worker', '?')} stopped sending heartbeats"
    log.warning("trial %d went stale (worker %s); re-enqueued to resume from %s", trial.number,
                trial.user_attrs.get("worker", "?"), attrs.get("resume_run_dir", "scratch"))
    study.enqueue_trial(trial.params, user_attrs=attrs)


class JournalHeartbeatStorage(JournalStorage, optuna_private.BaseHeartbeat):
    """Journal file storage whose running trials carry a ``heartbeat`` system attribute (wall-clock
    seconds; nodes sharing the file are assumed to have synchronised clocks, as NTP gives)."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int,
                 stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None = requeue_stale_trial):
        super().__init__(JournalFileBackend(path))
        self.path, self.heartbeat_interval, self.grace_period = path, heartbeat_interval, grace_period
        self.stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    # BaseHeartbeat's (private) protocol: fail_stale_trials calls it to find trials whose worker died
    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get("heartbeat")
            if beat is None:  # asked but never beat yet: count from its start
                beat = t.datetime_start.timestamp() if t.datetime_start else now
            if now - beat > self.grace_period:
                stale.append(optuna_private.trial_id(t))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_callback


def is_journal(spec: str) -> bool:
    return spec.startswith("journal:") or (spec.endswith(".log") and "://" not in spec)


def default_spec(runs_root: Path, workers: int) -> str:
    """SQLite for one process (the spine's default); the journal file as soon as workers share it."""
    if workers > 1:
        return f"journal:{runs_root / 'cxr-automl.log'}"
    return f"sqlite:///{runs_root / 'cxr-automl.db'}"


def open_storage(spec: str, workers: int = 1, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD, must_exist: bool = False,
                 wait: bool = False) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the storage ``spec`` names, retrying while it does not answer.
    ``must_exist``: a journal or SQLite file that is not there is an error, not a new empty storage
    (commands that only read: status, summary, report, dashboard); with ``wait`` the file's absence is
    retried like an unreachable server first (a worker on NFS may see the file late)."""
    if heartbeat_interval <= 0 or grace_period <= heartbeat_interval:
        raise ValueError(f"heartbeat interval ({heartbeat_interval}s) must be > 0 and below the grace period "
                         f"({grace_period}s)")
    local = (spec.removeprefix("journal:") if is_journal(spec) else
             spec.removeprefix("sqlite:///") if spec.startswith("sqlite:///") else None)
    path = Path(local).expanduser() if local is not None else None
    if must_exist and path is not None:
        missing = f"no study storage at {local}: check the path (the one cxr-automl search wrote to)"

        def there() -> None:
            if not path.exists():
                raise FileNotFoundError(missing)  # retried like an unreachable server
        if wait:
            retry(there, spec)
        elif not path.exists():
            raise ValueError(missing)
    if is_journal(spec):
        path.parent.mkdir(parents=True, exist_ok=True)
        return retry(lambda: JournalHeartbeatStorage(str(path), heartbeat_interval, grace_period), spec)
    if not spec.startswith(("sqlite:", "postgresql", "mysql")):
        raise ValueError(f"storage {spec!r} not understood; use journal:PATH (or a PATH ending .log), "
                         "postgresql://USER:PASS@HOST/DB or sqlite:///PATH")
    if spec.startswith("sqlite:") and workers > 1:
        log.warning("SQLite storage with %d workers: writes will contend for one file lock (and SQLite on NFS "
                    "can corrupt); prefer journal:PATH or postgresql://", workers)
    engine_kwargs = {"pool_pre_ping": True}
    if spec.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    with warnings.catch_warnings():  # heartbeat_interval is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return retry(lambda: RDBStorage(spec, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                        grace_period=grace_period,
                                        heartbeat_stale_trial_callback=requeue_stale_trial), spec)


def _transient() -> tuple[type[BaseException], ...]:
    import sqlalchemy.exc
    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError,
            OSError, TimeoutError)


def retry(fn: Callable[[], T], spec: str, delays: tuple[float, ...] | None = None) -> T:
    """Call ``fn``; while the storage is unreachable, retry after each of ``delays`` seconds, then raise
    one clear :class:`StorageUnavailableError` (finished trials stay in the storage)."""
    if delays is None:  # CXR_AUTOML_STORAGE_RETRY_DELAYS="1,2,4" overrides the default schedule
        env = os.environ.get("CXR_AUTOML_STORAGE_RETRY_DELAYS")
        delays = tuple(float(x) for x in env.split(",") if x.strip()) if env else RETRY_DELAYS
    start = time.monotonic()
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except _transient() as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if attempt == len(delays):
                raise StorageUnavailableError(
                    f"storage {spec} unreachable after {attempt + 1} attempts over {time.monotonic() - start:.0f}s "
                    f"({first}); check the server or path, then run the same command again "
                    "(finished trials are kept)") from exc
            log.warning("storage %s not answering (%s); retrying in %ss", spec, first, delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")
