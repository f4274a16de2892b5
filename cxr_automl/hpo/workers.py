"""What lets several workers share one study exactly: who a worker is, how many trial slots are left,
claiming a slot, heartbeats, and a requeued SLURM task taking back its own trial."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from datetime import datetime
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from cxr_automl.hpo import optuna_private

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def identity() -> str:
    """A SLURM task keeps its id across requeues (``JOBID_TASK``); elsewhere host:pid."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    return f"{socket.gethostname()}:{os.getpid()}"


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def slots(study: optuna.Study, target: int) -> str:
    """``done`` (target finished), ``full`` (the remaining slots are all running) or ``open``.
    Fails stale trials first, so a dead worker's slot reopens (its trial re-enqueued)."""
    with warnings.catch_warnings():  # fail_stale_trials is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if finished >= target:
        return "done"
    return "full" if finished + running >= target else "open"


def claim(study: optuna.Study, trial: optuna.Trial, target: int, me: str) -> bool:
    """Keep ``trial`` only if it fits under the target. Among workers that asked at once, the trials
    that started running first win (start time, then number: a trial popped from the queue keeps its
    old, low number but starts when popped). A surplus trial is failed with a reason and, if it came
    from the queue (a baseline or a retry), put back in the queue. The tell-time check in
    trial.run_trial backs this up should clocks of different nodes disagree."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)

    def order(t):
        return (t.datetime_start or datetime.max, t.number)

    mine = order(trials[trial.number])
    ahead = sum(t.state == TrialState.RUNNING and order(t) < mine for t in trials)
    if finished + ahead < target:
        trial.set_user_attr("worker", me)
        if restart_count():
            trial.set_user_attr("slurm_restart_count", restart_count())
        return True
    frozen = trials[trial.number]
    trial.set_user_attr("fail_reason", "surplus: other workers took the study's last slots")
    study.tell(trial, state=TrialState.FAIL)
    if "fixed_params" in frozen.system_attrs:  # it was enqueued: give it back
        study.enqueue_trial(frozen.system_attrs["fixed_params"],
                            user_attrs={k: v for k, v in frozen.user_attrs.items() if k != "fail_reason"})
    return False


def adopt_own_trial(study: optuna.Study, me: str) -> optuna.Trial | None:
    """A requeued SLURM task (preempted, time limit, ``scontrol requeue``) finds the trial its previous
    run left RUNNING and carries on with it: same trial number, same run dir, resumed from the last
    epoch checkpoint. If its heartbeat already went stale, the trial was failed and re-enqueued
    instead, and whichever worker pops it resumes it."""
    if not me.startswith("slurm:"):
        return None
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.user_attrs.get("worker") == me]
    if not mine:
        return None
    frozen = mine[-1]
    trial = optuna_private.revive(study, frozen)
    try:
        trial.set_user_attr("slurm_restart_count", restart_count())
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    log.warning("%s (restart %d) resumes its trial %d from %s", me, restart_count(), frozen.number,
                frozen.user_attrs.get("run_dir", "?"))
    if frozen.user_attrs.get("run_dir"):
        trial.set_user_attr("resume_run_dir", frozen.user_attrs["run_dir"])
    return trial


PRESENCE_PREFIX = "worker:"


class Presence:
    """A worker's own record in the study (system attr ``worker:<identity>``): what it is doing and until
    when it counts as alive, so ``cxr-automl status`` lists idle workers too, not only those running a
    trial. Written when the state changes and otherwise at most once per heartbeat interval."""

    def __init__(self, study: optuna.Study, me: str, interval: float, grace: float):
        self.study, self.me, self.interval, self.grace = study, me, interval, grace
        self.last: tuple[str, float] | None = None

    def __call__(self, state: str) -> None:
        now = time.time()
        if self.last is not None and self.last[0] == state and now - self.last[1] < self.interval:
            return
        record = {"state": state, "seen": now, "alive_until": now + self.grace, "host": socket.gethostname(),
                  "pid": os.getpid()}
        try:
            optuna_private.storage_of(self.study).set_study_system_attr(optuna_private.study_id(self.study),
                                                                        PRESENCE_PREFIX + self.me, record)
            self.last = (state, now)
        except Exception as exc:  # presence is informative only; never stop a worker over it
            log.warning("worker presence not recorded: %s", exc)


def presences(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, dict[str, Any]]:
    """Every worker's last presence record in a study, by identity."""
    attrs = storage.get_study_system_attrs(study_id)
    return {k.removeprefix(PRESENCE_PREFIX): v for k, v in attrs.items() if k.startswith(PRESENCE_PREFIX)}


def live_workers(storage: optuna.storages.BaseStorage, study: optuna.Study,
                 stale: set[int]) -> dict[str, str]:
    """Identity → what it is doing, for every live worker: one beating on a running trial, or one whose
    own presence record has not expired (waiting for a slot, starting). A worker that said it exited
    is not listed."""
    live: dict[str, str] = {}
    now = time.time()
    for me, rec in presences(storage, optuna_private.study_id(study)).items():
        if rec.get("state") != "exited" and now <= float(rec.get("alive_until", 0)):
            live[me] = str(rec.get("state"))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if optuna_private.trial_id(t) not in stale and t.user_attrs.get("worker"):
            live[t.user_attrs["worker"]] = f"trial {t.number}"
    return dict(sorted(live.items()))


class Heartbeat:
    """While a trial runs, a daemon thread records its heartbeat every interval (a no-op when the
    storage has none), so other workers can tell a live trial from a dead worker's."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self.storage, self.trial_id = optuna_private.storage_of(study), optuna_private.trial_id(trial)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception as exc:  # a missed beat is not fatal; the grace period covers several
                log.warning("heartbeat for trial id %d not recorded: %s", self.trial_id, exc)
            if self.stop.wait(interval):
                return

    def __enter__(self) -> "Heartbeat":
        if optuna_private.is_heartbeat_enabled(self.storage):
            self.thread = threading.Thread(target=self._beat, daemon=True, name="cxr-heartbeat")
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def requeue_on_usr2() -> None:
    """For plain ``sbatch`` workers (submitit does this itself for its tasks): on SIGUSR2, Slurm's
    warning before a time limit or preemption (``--signal=USR2@120``), requeue this task and exit; the
    requeued run takes back its trial (:func:`adopt_own_trial`) and resumes its last epoch checkpoint."""
    import signal
    import subprocess
    import sys
    me = identity()
    if not me.startswith("slurm:") or not hasattr(signal, "SIGUSR2"):
        return

    def handler(signum, frame):
        job = me.removeprefix("slurm:")
        log.warning("SIGUSR2: requeueing %s; its trial resumes from its last epoch checkpoint", job)
        subprocess.run(["scontrol", "requeue", job], check=False)
        sys.exit(0)

    signal.signal(signal.SIGUSR2, handler)
