"""Start N workers on one study: local processes, or ONE SLURM array job of N tasks through submitit.

The study (and its baselines) is created by the caller before any worker starts; each worker is
``cxr-automl worker`` (local) or :class:`SlurmWorker` (the same loop inside a submitit task).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import submitit

from cxr_automl.hpo import placement
from cxr_automl.hpo import search as search_mod
from cxr_automl.hpo import storage as storage_mod
from cxr_automl.hpo import trial as trial_mod
from cxr_automl.train.callbacks import make_progress


@dataclass
class WorkerSpec:
    """Everything one worker needs; pickled into each SLURM task."""
    study: str
    storage: str
    search_space: str | None = None
    overrides: tuple[str, ...] = ()
    heartbeat_interval: int = storage_mod.HEARTBEAT_INTERVAL
    grace_period: int = storage_mod.GRACE_PERIOD
    poll_seconds: float = 5.0
    env: dict[str, str] = field(default_factory=dict)


def run_worker(spec: WorkerSpec, index: int, workers: int = 1) -> int:
    """The worker process body: open the storage, read the study's options, loop. Returns finished count."""
    storage = storage_mod.open_storage(spec.storage, workers=workers, heartbeat_interval=spec.heartbeat_interval,
                                       grace_period=spec.grace_period, must_exist=True, wait=True)
    opts = search_mod.options_from_study(spec.study, storage, spec.storage, spec.search_space, spec.overrides)
    print(f"worker {index}: {placement.describe()}", file=sys.stderr, flush=True)
    study = search_mod.worker(opts, storage, index=index, poll_seconds=spec.poll_seconds)
    return trial_mod.n_finished(study)


class SlurmWorker(submitit.helpers.Checkpointable):
    """One array task. On preemption or time limit submitit calls :meth:`checkpoint` (SIGUSR2) and
    requeues the task; the requeued run (``SLURM_RESTART_COUNT`` > 0) takes back the trial it left
    RUNNING and resumes that trial's run dir from its last epoch checkpoint (workers.adopt_own_trial).
    A plain ``scontrol requeue`` (no checkpoint call) ends the same way."""

    def __call__(self, spec: WorkerSpec, index: int) -> int:
        os.environ.update(spec.env)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("cxr_automl").setLevel(logging.INFO)
        return run_worker(spec, index)

    def checkpoint(self, spec: WorkerSpec, index: int) -> submitit.helpers.DelayedSubmission:
        print(f"worker {index}: checkpoint requested (preemption/time limit); requeueing — the running trial "
              "resumes from its last epoch checkpoint", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, spec, index)


#: sbatch options cxr-automl or submitit set themselves: --slurm.extra may not name them
_OWN_FLAGS = {"partition": "--slurm.partition", "gpus-per-task": "--slurm.gpus-per-task",
              "cpus-per-task": "--slurm.cpus-per-task", "mem": "--slurm.mem", "time": "--slurm.time",
              "account": "--slurm.account", "qos": "--slurm.qos", "constraint": "--slurm.constraint",
              **dict.fromkeys(("array", "output", "error", "open-mode", "signal", "job-name"), "submitit")}


#: the time limit asked for when ``--slurm.time`` is not given and the partition names none (no DefaultTime
#: and an UNLIMITED MaxTime) or ``scontrol`` cannot tell: one day; a task that reaches it is requeued
FALLBACK_TIME = "1-00:00:00"
#: how many times one task may be requeued after reaching its time limit (submitit's own default is 3;
#: preemptions are not counted): enough for weeks of one-day allocations
MAX_REQUEUES = 1000


def partition_time(partition: str | None) -> tuple[str, str] | None:
    """The time limit Slurm gives a job that asks for none in ``partition`` (None: the default
    partition): its DefaultTime, else its MaxTime, as ``(limit, which)``; None when that is unlimited
    or ``scontrol`` does not answer."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "partition", *([partition] if partition else [])],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if partition is None and fields.get("Default") != "YES":
            continue
        for key in ("DefaultTime", "MaxTime"):
            value = fields.get(key, "NONE")
            if value == "NONE":  # no DefaultTime: MaxTime applies
                continue
            if value in ("UNLIMITED", "INFINITE"):
                return None
            with contextlib.suppress(ValueError):
                parse_minutes(value)
                return value, f"partition {fields.get('PartitionName', partition)}'s {key}"
        return None
    return None


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()   # shell lines run in the job before the worker (module load, conda activate)
    extra: tuple[str, ...] = ()   # any other sbatch option: KEY=VALUE, or KEY alone for a flag
    max_requeues: int = MAX_REQUEUES  # time-limit requeues per task (submitit's slurm_max_num_timeout)

    def time_limit(self) -> tuple[str, str]:
        """``(limit, where it comes from)``: ``--slurm.time``, else what the partition gives a job that
        names none, else :data:`FALLBACK_TIME` (never submitit's 5-minute default)."""
        if self.time is not None:
            return self.time, "--slurm.time"
        return partition_time(self.partition) or (FALLBACK_TIME, "cxr-automl's default (the partition sets none)")

    def executor_parameters(self, workers: int, name: str) -> dict[str, Any]:
        """submitit's parameters; a bad --slurm.time or --slurm.extra raises ValueError before anything
        is submitted."""
        if self.max_requeues < 0:
            raise ValueError(f"--slurm.max-requeues {self.max_requeues}: use 0 or more")
        params: dict[str, Any] = {"slurm_array_parallelism": workers, "name": f"cxr-{name}"}
        for key, value in (("slurm_partition", self.partition), ("slurm_gpus_per_task", self.gpus_per_task),
                           ("slurm_cpus_per_task", self.cpus_per_task), ("slurm_mem", self.mem),
                           ("slurm_account", self.account), ("slurm_qos", self.qos),
                           ("slurm_constraint", self.constraint)):
            if value is not None:
                params[key] = value
        if self.time is not None:
            params["timeout_min"] = parse_minutes(self.time)
        # USR2 (checkpoint and requeue) 2 minutes before the limit; half the limit for limits under 4 minutes
        params["slurm_signal_delay_s"] = min(120, 30 * params.get("timeout_min", 4))
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        if self.extra:
            params["slurm_additional_parameters"] = dict(parse_extra(item) for item in self.extra)
        return params


def parse_extra(item: str) -> tuple[str, Any]:
    """``mail-type=END`` -> ("mail-type", "END"); ``exclusive`` -> ("exclusive", True) (``#SBATCH --exclusive``)."""
    key, sep, value = item.partition("=")
    key = key.strip().lstrip("-").replace("_", "-")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or (sep and not value):
        raise ValueError(f"--slurm.extra {item!r}: use an sbatch option without its dashes, KEY=VALUE "
                         "(mail-type=END) or KEY alone for a flag (exclusive)")
    if key in _OWN_FLAGS:
        owner = _OWN_FLAGS[key]
        raise ValueError(f"--slurm.extra {item!r}: " + (f"use {owner} instead" if owner != "submitit" else
                                                        f"--{key} is set by cxr-automl/submitit for the array job"))
    return key, value if sep else True


def parse_minutes(text: str) -> int:
    """Minutes from Slurm's --time forms: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if not m:
        raise ValueError(f"--slurm.time {text!r}: use minutes (90) or [D-]HH:MM:SS")
    parts = [int(x) for x in m.group(2).split(":")]
    if m.group(1):
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return max(1, int(m.group(1) or 0) * 1440 + hours * 60 + minutes + (seconds > 0))


def _watch(study_name: str, storage_spec: str, target: int, alive) -> None:
    """Show the study's progress until no worker is alive."""
    storage = storage_mod.open_storage(storage_spec)
    study = optuna.load_study(study_name=study_name, storage=storage)
    with make_progress() as progress:
        bar = progress.add_task("trials (all workers)", total=target, completed=0, info="")
        while True:
            running = alive()
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state in trial_mod.FINISHED for t in trials)
            busy = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
            progress.update(bar, completed=done, info=f"{busy} running")
            if not running:
                return
            time.sleep(2)


def launch_local(spec: WorkerSpec, workers: int, log_dir: Path, target: int, gpus: str = "auto") -> None:
    """N ``cxr-automl worker`` processes; their output goes to ``log_dir/worker-I.log``. With GPUs
    (``gpus``: auto | none | ids, see ``placement.visible_gpus``) worker i gets GPU i as its only
    visible device and a disjoint share of this process's CPUs (its affinity, which its DataLoader
    workers inherit and ``trainer.num_workers=auto`` counts)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    gpu_ids, cpus = placement.visible_gpus(gpus), placement.available_cpus()
    if 1 < len(gpu_ids) < workers or (len(gpu_ids) == 1 and workers > 1):
        print(f"warning: {workers} workers on {len(gpu_ids)} GPU(s): some share a GPU", file=sys.stderr, flush=True)
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "cxr_automl.cli", "worker", "--study", spec.study, "--storage", spec.storage,
               "--worker-index", str(i), "--workers", str(workers),
               "--heartbeat-interval", str(spec.heartbeat_interval), "--grace-period", str(spec.grace_period),
               "--poll-seconds", str(spec.poll_seconds)]
        if spec.search_space:
            cmd += ["--search-space", spec.search_space]
        out = open(log_dir / f"worker-{i}.log", "w")
        # N workers on one machine share its cores: without a limit each would start one intra-op
        # thread per core and they would only slow each other down (an OMP_NUM_THREADS already set wins)
        env = placement.worker_env(i, workers, gpu_ids, cpus)
        env = {"OMP_NUM_THREADS": env.pop("OMP_NUM_THREADS"), **os.environ, **env, **spec.env}
        share = placement.worker_cpus(i, workers, cpus)
        pin = (lambda share=share: os.sched_setaffinity(0, share)) if gpu_ids and hasattr(os, "sched_setaffinity") else None
        procs.append((subprocess.Popen([*cmd, *spec.overrides], stdout=out, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=pin), out))
    try:
        _watch(spec.study, spec.storage, target, lambda: any(p.poll() is None for p, _ in procs))
    except KeyboardInterrupt:
        # A terminal Ctrl-C already reached the workers (same process group); each fails its trial as
        # interrupted and re-enqueues it (resumable). Only workers still running after a while get one.
        deadline = time.time() + 10
        while time.time() < deadline and any(p.poll() is None for p, _ in procs):
            time.sleep(0.2)
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, _ in procs:
            p.wait(timeout=120)
        raise
    finally:
        for _, out in procs:
            out.close()
    bad = [(i, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if bad:
        _report_lost_workers("worker(s) " + ", ".join(f"{i} exited {rc} (see {log_dir}/worker-{i}.log)"
                                                      for i, rc in bad), spec, target)


def make_executor(slurm: SlurmOptions, workers: int, name: str, folder: Path) -> tuple[submitit.AutoExecutor, str, str]:
    """submitit's executor for the array, with its time limit and where that came from."""
    limit, source = slurm.time_limit()
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=slurm.max_requeues)
    executor.update_parameters(**dataclasses.replace(slurm, time=limit).executor_parameters(workers, name))
    return executor, limit, source


def submit_slurm(spec: WorkerSpec, workers: int, slurm: SlurmOptions, folder: Path) -> list[submitit.Job]:
    """ONE array job of ``workers`` tasks, all running at once (array parallelism = workers)."""
    executor, limit, source = make_executor(slurm, workers, spec.study, folder)
    jobs = executor.map_array(SlurmWorker(), [spec] * workers, list(range(workers)))
    print(f"submitted SLURM array job {array_id(jobs)} ({workers} tasks, time limit {limit} from {source}; "
          f"requeued at the limit up to {slurm.max_requeues} times); logs in {folder}; "
          f"watch with: cxr-automl status --study {spec.study} --storage {spec.storage}", flush=True)
    return jobs


def array_id(jobs: list[submitit.Job]) -> str:
    return jobs[0].job_id.split("_")[0]


def wait_slurm(jobs: list[submitit.Job], spec: WorkerSpec, target: int) -> None:
    """Show the study's progress until every task has ended; a task that failed is an error only if
    the study fell short of ``target``."""
    try:
        _watch(spec.study, spec.storage, target, lambda: not all(j.done() for j in jobs))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"stopped watching; the array job keeps running (scancel {array_id(jobs)} "
                                "to stop it)") from None
    errors = []
    for i, job in enumerate(jobs):
        try:
            job.result()
        except Exception as exc:  # submitit's FailedJobError carries the task's traceback
            errors.append(f"task {i} ({job.job_id}): {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
    if errors:
        _report_lost_workers("; ".join(errors), spec, target)


def queued_tasks(job_ids: list[str]) -> dict[str, int] | None:
    """Tasks of these Slurm jobs that ``squeue`` still lists, by state (``{"PENDING": 1, "RUNNING": 1}``);
    None where there is no squeue or it does not answer."""
    if not job_ids or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%T"], capture_output=True,
                             text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # finished jobs have left the queue: squeue says "Invalid job id"
        return {} if "Invalid job id" in out.stderr else None
    return dict(Counter(out.stdout.split()))


def _report_lost_workers(errors: str, spec: WorkerSpec, target: int) -> None:
    """A worker that died (killed, node lost) is an error only if the study fell short: its trial was
    re-run by the others, so a study at its target is complete."""
    study = optuna.load_study(study_name=spec.study, storage=storage_mod.open_storage(spec.storage))
    if trial_mod.n_finished(study) >= target:
        print(f"warning: some workers died ({errors}); the others finished the study", file=sys.stderr, flush=True)
        return
    raise RuntimeError(errors)
