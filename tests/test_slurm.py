"""Search on a real single-node Slurm (slurm/dev-cluster): one array job of workers, a worker killed
mid-trial, a preempted and a requeued worker. Runs the real daemons; skipped only without root/apt."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import CLI, TINY, WORKER_SPACE as SPACE, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
#: TINY with ten times the training images: ~1.5 s an epoch on one CPU, so that on an idle machine a
#: kill or requeue after two epochs still lands mid-trial and both array tasks get a trial
SLOWER = [o if not o.startswith("dataset.n_train=") else "dataset.n_train=960" for o in TINY]


@pytest.fixture(scope="session")
def slurm_cluster():
    have_slurm = shutil.which("slurmctld") and shutil.which("slurmdbd") and shutil.which("mariadbd")
    if os.geteuid() != 0:
        pytest.skip("the dev cluster needs root (to install packages and run munged/mariadbd/slurm daemons)")
    if not have_slurm and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is unavailable to install it")
    subprocess.run(["bash", str(ROOT / "slurm/dev-cluster/start.sh")], check=True, timeout=900)
    yield
    subprocess.run(["bash", str(ROOT / "slurm/dev-cluster/stop.sh")], check=False, timeout=120)


def _study(path: Path, name: str = "s") -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def _search(tmp: Path, n: int, workers: int, *extra: str) -> list[str]:
    (tmp / "space.yaml").write_text(SPACE)
    return ["search", "-s", "space.yaml", "--study", "s", "-n", str(n), "--launcher", "slurm",
            "--workers", str(workers), "--storage", f"journal:{tmp / 'study.log'}", "--pruner", "none",
            "--slurm.partition", "debug", "--slurm.cpus-per-task", "1", "--slurm.time", "20", *SLOWER, *extra]


def _wait(cond, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _running_trial_with_epochs(tmp: Path, epochs: int):
    """A RUNNING trial that has written at least ``epochs`` epoch lines."""
    try:
        study = _study(tmp / "study.log")
    except (KeyError, FileNotFoundError):
        return None
    for t in study.get_trials(states=(TrialState.RUNNING,)):
        log = Path(t.user_attrs.get("run_dir", "/nonexistent")) / "metrics.jsonl"
        if "worker" in t.user_attrs and log.exists() and len(log.read_text().splitlines()) >= epochs:
            return t
    return None


def test_array_of_two_workers_reaches_exact_trial_count(slurm_cluster, in_tmp):
    setup = f"touch {in_tmp}/setup-ran-$SLURM_ARRAY_TASK_ID"  # --slurm.setup runs in every task
    proc = run_cli(*_search(in_tmp, 3, 2, "--slurm.setup", setup, "--slurm.extra", "comment=cxr-array-test"),
                   cwd=in_tmp, timeout=900)
    job_id = re.search(r"submitted SLURM array job (\d+)", proc.stdout).group(1)
    study = _study(in_tmp / "study.log")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3
    assert all(s in (TrialState.COMPLETE, TrialState.FAIL) for s in states)
    surplus = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in surplus)
    workers = {t.user_attrs["worker"] for t in study.trials if t.state == TrialState.COMPLETE}
    # one array job; which of its two tasks wins which trial is Slurm's scheduling (on a fresh cluster
    # the second task has started after the first had taken every trial), so only membership is checked
    # here and both tasks running to completion is checked through sacct below
    assert workers and workers <= {f"slurm:{job_id}_0", f"slurm:{job_id}_1"}
    assert len({t.user_attrs["run_dir"] for t in study.trials if t.state == TrialState.COMPLETE}) == 3
    def accounted():  # slurmdbd records the end of a job a moment after its result file exists
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                             text=True, check=True).stdout.split()
        return sorted(out) == [f"{job_id}_0|COMPLETED", f"{job_id}_1|COMPLETED"]

    _wait(accounted, "sacct to record both array tasks COMPLETED", timeout=90)
    assert "best" in proc.stdout
    assert sorted(p.name for p in in_tmp.glob("setup-ran-*")) == ["setup-ran-0", "setup-ran-1"]
    sbatch = next((in_tmp / "runs" / "s" / "slurm").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --comment=cxr-array-test\n" in sbatch


def test_worker_killed_mid_trial_is_resumed_from_its_checkpoint_by_the_other(slurm_cluster, in_tmp):
    args = _search(in_tmp, 2, 2, "--heartbeat-interval", "1", "--grace-period", "5", "strategy.epochs=8")
    proc = subprocess.Popen([*CLI, *args], cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    victim = _wait(lambda: _running_trial_with_epochs(in_tmp, 2), "a trial with 2 epochs")
    task = victim.user_attrs["worker"].removeprefix("slurm:")
    subprocess.run(["scancel", "--signal=KILL", task], check=True)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err
    study = _study(in_tmp / "study.log")
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    retry = retries[0]
    assert retry.params == victim.params and retry.user_attrs["run_dir"] == victim.user_attrs["run_dir"]
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]  # a live worker took it over
    epochs = (Path(retry.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [int(json.loads(line)["epoch"]) for line in epochs] == list(range(8))
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2
    logs = "".join(p.read_text() for p in (in_tmp / "runs/s/slurm").rglob("*_log.err"))
    assert re.search(r"resumed .*trial_%04d at epoch [1-7]" % victim.number, logs), logs[-3000:]


@pytest.mark.parametrize("how", ["preempt_usr2", "scontrol_requeue"])
def test_preempted_or_requeued_worker_resumes_its_trial(slurm_cluster, in_tmp, how):
    detach = how == "scontrol_requeue"  # this one submits with --detach: search returns, the job runs on
    args = _search(in_tmp, 1, 1, "--heartbeat-interval", "1", "--grace-period", "90", "strategy.epochs=8",
                   *(["--detach"] if detach else []))
    proc = subprocess.Popen([*CLI, *args], cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    if detach:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "detached: the array job runs on" in err, out + err
        job_id = re.search(r"submitted SLURM array job (\d+)", out).group(1)
        row = json.loads(run_cli("status", "--storage", f"journal:{in_tmp / 'study.log'}", "--json",
                                 cwd=in_tmp).stdout)[0]
        assert row["slurm"]["jobs"] == [job_id] and sum(row["slurm"]["squeue"].values()) == 1, row["slurm"]
    victim = _wait(lambda: _running_trial_with_epochs(in_tmp, 2), "a trial with 2 epochs")
    task = victim.user_attrs["worker"].removeprefix("slurm:")
    if how == "preempt_usr2":  # what Slurm sends before preemption/time limit: submitit checkpoints and requeues
        subprocess.run(["scancel", "--signal=USR2", task], check=True)
    else:
        subprocess.run(["scontrol", "requeue", task], check=True)

    def requeued():
        info = subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout
        return "Restarts=1" in info and "JobState=PENDING" in info

    _wait(requeued, "the task to be requeued", timeout=120)
    time.sleep(3.5)  # sooner than ~3 s after a requeue Slurm answers "Job credential revoked"
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
    if detach:
        def ended():
            out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                                 text=True, check=True).stdout.split()
            return out == ["COMPLETED"]
        _wait(ended, "the detached array job to complete", timeout=900)
    else:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, out + err
    study = _study(in_tmp / "study.log")
    assert len(study.trials) == 1  # the same trial carried on: nothing failed, nothing re-enqueued
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE and trial.number == victim.number
    assert trial.user_attrs["slurm_restart_count"] == 1
    epochs = (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(epochs) == 8
    logs = "".join(p.read_text() for p in (in_tmp / "runs/s/slurm").rglob("*_log.err"))
    assert re.search(r"resumed .*trial_0000 at epoch [1-7]", logs), logs[-3000:]


def test_time_limit_comes_from_the_partition_when_not_given(slurm_cluster):
    from cxr_automl.hpo.launch import FALLBACK_TIME, SlurmOptions, partition_time
    assert partition_time("short") == ("00:01:00", "partition short's DefaultTime")
    assert partition_time(None) is None  # the default partition (debug): MaxTime=UNLIMITED, no DefaultTime
    assert SlurmOptions(partition="short").time_limit()[0] == "00:01:00"
    assert SlurmOptions(partition="debug").time_limit()[0] == FALLBACK_TIME


def _scontrol_job(task: str) -> tuple[str, int]:
    info = subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout
    state, restarts = re.search(r"JobState=(\S+)", info), re.search(r"Restarts=(\d+)", info)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else -1


def test_more_than_three_time_limit_requeues_still_finish_the_exact_trial_count(slurm_cluster, in_tmp):
    """With a limit of 10 minutes or less submitit counts every USR2 as the time-limit signal (it keeps
    a limit's last 10 minutes as "timed out"); its 3-timeout cap was the bug. The requeues are forced by
    sending that signal (what Slurm sends 120 s before the limit) as soon as an allocation has trained
    one more epoch: four allocations of ~20 s instead of four of 10 minutes. (A 1-minute limit lets Slurm
    send its own signal — "up to 60 s early" — while Python is still starting, which kills the task.)
    Each requeued task is released from Slurm's ~120 s hold after 3.5 s."""
    (in_tmp / "space.yaml").write_text(SPACE)
    args = ["search", "-s", "space.yaml", "--study", "s", "-n", "2", "--launcher", "slurm", "--workers", "1",
            "--storage", f"journal:{in_tmp / 'study.log'}", "--pruner", "none", "--slurm.partition", "debug",
            "--slurm.cpus-per-task", "1", "--slurm.time", "10", "--heartbeat-interval", "1", "--grace-period", "120",
            *SLOWER, "strategy.epochs=8"]
    proc = subprocess.Popen([*CLI, *args], cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    task = _wait(lambda: _running_trial_with_epochs(in_tmp, 1), "a trial with 1 epoch").user_attrs["worker"]
    task = task.removeprefix("slurm:")

    def epochs() -> int:
        return sum(len(p.read_text().splitlines()) for p in (in_tmp / "runs/s").rglob("metrics.jsonl"))

    restarts, seen, signalled, released, held, deadline = 0, 0, False, 0.0, False, time.time() + 600
    while True:
        assert time.time() < deadline, f"{restarts} requeues in 10 minutes"
        assert restarts >= 4 or proc.poll() is None, f"only {restarts} requeues before the search ended"
        state, now = _scontrol_job(task)
        if restarts >= 4 and held and state not in ("PENDING", "COMPLETING"):
            break  # the fourth requeue is running again (or has finished)
        if now > restarts:  # requeued (by our signal or by Slurm's time limit)
            restarts, seen, signalled, released, held = now, epochs(), False, time.time(), False
        elif state == "PENDING" and time.time() - released > 3.5:
            held = True
            # out of Slurm's ~120 s hold; sooner than ~3 s after a requeue it answers "Job credential revoked",
            # and while the old allocation is still COMPLETING the update does not stick: retry
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=False,
                           capture_output=True)
            released = time.time()
        elif state == "RUNNING" and not signalled and restarts < 4 and epochs() > seen:
            subprocess.run(["scancel", "--signal=USR2", task], check=True)
            signalled = True
        time.sleep(0.3)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err
    assert "time limit 10 from --slurm.time" in out
    study = _study(in_tmp / "study.log")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2  # nothing failed, nothing re-enqueued
    for t in study.trials:
        lines = (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert [int(json.loads(line)["epoch"]) for line in lines] == list(range(8))
    logs = "".join(p.read_text() for p in (in_tmp / "runs/s/slurm").rglob("*_log.err"))
    assert len(re.findall(r"this job is timed-out", logs)) >= 4, logs[-3000:]
    assert "timed-out too many times" not in logs
