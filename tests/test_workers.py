"""Workers sharing a study: slot accounting, journal heartbeats, storage errors, and (marked
`postgres`) a 2-worker local search on a real PostgreSQL server with one worker SIGKILLed mid-trial."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import CLI, TINY, run_cli
from conftest import WORKER_SPACE as SPACE
from cxr_automl.hpo import storage as storage_mod
from cxr_automl.hpo import workers

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("CXR_TEST_POSTGRES_URL", "postgresql://cxr:cxr@127.0.0.1:5432/cxr_test")
DIST = {"x": optuna.distributions.FloatDistribution(0, 1)}


def test_concurrent_asks_beyond_target_are_handed_back(tmp_path):
    storage = storage_mod.open_storage(f"journal:{tmp_path / 's.log'}", heartbeat_interval=1, grace_period=60)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 0.5}, user_attrs={"baseline": "b"})
    first, second = study.ask(DIST), study.ask(DIST)  # two workers asked for the one remaining slot at once
    assert workers.claim(study, first, target=1, me="w0") is True
    assert workers.claim(study, second, target=1, me="w1") is False
    assert study.trials[second.number].state == TrialState.FAIL
    assert study.trials[second.number].user_attrs["fail_reason"].startswith("surplus")
    # the enqueued baseline was popped by `first`, so nothing is re-enqueued; target reached when first ends
    assert workers.slots(study, 1) == "full"
    study.tell(first, 0.1)
    assert workers.slots(study, 1) == "done"
    # a surplus trial that came from the queue goes back to the queue
    study.enqueue_trial({"x": 0.25}, user_attrs={"baseline": "c"})
    popped = study.ask(DIST)
    assert workers.claim(study, popped, target=1, me="w0") is False
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == {"x": 0.25} and waiting[0].user_attrs["baseline"] == "c"


def test_a_trial_popped_from_the_queue_after_a_fresh_ask_yields_the_last_slot(tmp_path):
    storage = storage_mod.open_storage(f"journal:{tmp_path / 's.log'}", heartbeat_interval=1, grace_period=60)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 0.75}, user_attrs={"retry_of": 7})  # trial #0, waiting
    # worker B's ask raced past the queue and created a new trial (#1), running from now on
    fresh = optuna.Trial(study, storage.create_new_trial(study._study_id))
    time.sleep(0.01)
    popped = study.ask(DIST)  # worker A then popped #0: a lower number, but it started later
    assert popped.number == 0 and fresh.number == 1
    assert workers.claim(study, popped, target=1, me="A") is False
    assert workers.claim(study, fresh, target=1, me="B") is True
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == 7


def test_journal_heartbeat_fails_a_silent_trial_and_requeues_it_with_its_run_dir(tmp_path):
    storage = storage_mod.open_storage(f"journal:{tmp_path / 's.log'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="s")
    alive, dead = study.ask(DIST), study.ask(DIST)
    dead.set_user_attr("run_dir", "runs/s/trial_0001")
    with workers.Heartbeat(study, alive):
        storage.record_heartbeat(dead._trial_id)  # one beat, then its worker "dies"
        time.sleep(3.5)
        assert workers.slots(study, 5) == "open"
    trials = study.trials
    assert trials[alive.number].state == TrialState.RUNNING  # kept alive by its heartbeat thread
    assert trials[dead.number].state == TrialState.FAIL
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert len(retry) == 1 and retry[0].system_attrs["fixed_params"] == dead.params
    assert retry[0].user_attrs["resume_run_dir"] == "runs/s/trial_0001" and retry[0].user_attrs["retry_of"] == dead.number


def test_status_lists_idle_workers_too_and_forgets_exited_or_silent_ones(tmp_path):
    from cxr_automl.cli.study import study_status
    storage = storage_mod.open_storage(f"journal:{tmp_path / 's.log'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="s")
    waiter = workers.Presence(study, "node1:11", interval=1, grace=2)
    waiter("waiting: the remaining trials run elsewhere")
    busy = study.ask(DIST)
    busy.set_user_attr("worker", "node2:22")
    with workers.Heartbeat(study, busy):
        row = study_status(storage, "s")
        assert row["workers"] == {"node1:11": "waiting: the remaining trials run elsewhere",
                                  "node2:22": f"trial {busy.number}"}
        waiter("exited")
        assert study_status(storage, "s")["live_workers"] == ["node2:22"]
        silent = workers.Presence(study, "node3:33", interval=1, grace=2)
        silent("starting")
        assert "node3:33" in study_status(storage, "s")["live_workers"]
        time.sleep(2.5)  # node3 never writes again: its presence expires after the grace period
        assert study_status(storage, "s")["live_workers"] == ["node2:22"]


def test_unreachable_storage_retries_then_one_clear_error(in_tmp, monkeypatch):
    url = "postgresql://cxr:cxr@127.0.0.1:9/nothing_listens_here"
    monkeypatch.setenv("CXR_AUTOML_STORAGE_RETRY_DELAYS", "0.1,0.1")
    with pytest.raises(storage_mod.StorageUnavailableError, match=r"unreachable after 3 attempts"):
        storage_mod.open_storage(url)
    proc = run_cli("status", "--storage", url, cwd=in_tmp, check=False,
                   env={"CXR_AUTOML_STORAGE_RETRY_DELAYS": "0.1,0.1"})
    assert proc.returncode == 2
    assert f"storage {url} unreachable after 3 attempts" in proc.stderr and "Traceback" not in proc.stderr


def test_worker_waits_for_a_storage_file_that_shows_up_late(in_tmp, monkeypatch):
    """On NFS a worker may see the journal after it starts: the missing file is retried, not re-created."""
    import threading
    made = storage_mod.open_storage(f"journal:{in_tmp / 'made.log'}")
    optuna.create_study(study_name="s", storage=made)
    monkeypatch.setenv("CXR_AUTOML_STORAGE_RETRY_DELAYS", "0.3,0.3,1,2,4")
    threading.Timer(0.5, (in_tmp / "made.log").rename, [in_tmp / "late.log"]).start()
    late = storage_mod.open_storage(f"journal:{in_tmp / 'late.log'}", must_exist=True, wait=True)
    assert [s.study_name for s in optuna.get_all_study_summaries(late)] == ["s"]


def test_launcher_none_creates_the_study_and_sqlite_with_workers_warns(in_tmp):
    (in_tmp / "space.yaml").write_text(SPACE)
    proc = run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "5", "--workers", "2", "--launcher", "none",
                   "--storage", "sqlite:///s.db", *TINY, cwd=in_tmp)
    assert "SQLite storage with 2 workers" in proc.stderr and "sbatch --array=0-1" in proc.stderr
    study = optuna.load_study(study_name="s", storage="sqlite:///s.db")
    assert study.user_attrs["n_trials"] == 5 and study.user_attrs["search_space"].endswith("space.yaml")
    assert [t.state for t in study.trials] == [TrialState.WAITING]  # the baseline, queued before any worker
    proc = run_cli("worker", "--study", "nope", "--storage", "sqlite:///s.db", cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "no study 'nope'" in proc.stderr
    # a storage path with a typo: retried (NFS may show the file late), then one line; no empty file made
    proc = run_cli("worker", "--study", "s", "--storage", "journal:typo.log", cwd=in_tmp, check=False,
                   env={"CXR_AUTOML_STORAGE_RETRY_DELAYS": "0.1"})
    assert proc.returncode == 2 and "unreachable after 2 attempts" in proc.stderr, proc.stderr
    assert "no study storage at typo.log" in proc.stderr and not (in_tmp / "typo.log").exists()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    import sqlalchemy
    def reachable() -> bool:
        try:
            sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 3}).connect().close()
            return True
        except sqlalchemy.exc.OperationalError:
            return False
    if not reachable() and os.geteuid() == 0:
        subprocess.run(["bash", str(ROOT / ".ci/services.sh")], check=True, timeout=900)
    if not reachable():
        if os.geteuid() != 0:
            pytest.skip(f"no PostgreSQL at {PG_URL} and not root to start one (.ci/services.sh)")
        raise AssertionError(f"PostgreSQL at {PG_URL} unreachable after .ci/services.sh")
    return PG_URL


@pytest.mark.postgres
@pytest.mark.slow
def test_two_local_workers_on_postgres_exact_count_and_killed_worker_resumed(postgres_url, in_tmp):
    (in_tmp / "space.yaml").write_text(SPACE)
    name = f"pg-{uuid.uuid4().hex[:8]}"
    args = ["search", "-s", "space.yaml", "--study", name, "-n", "2", "--workers", "2", "--storage", postgres_url,
            "--pruner", "none", "--heartbeat-interval", "1", "--grace-period", "4", *TINY, "strategy.epochs=8"]
    proc = subprocess.Popen([*CLI, *args], cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    victim, deadline = None, time.time() + 300
    while victim is None and time.time() < deadline:
        time.sleep(0.3)
        try:
            running = optuna.load_study(study_name=name, storage=postgres_url).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            continue
        for t in running:
            log = Path(t.user_attrs.get("run_dir", "/none")) / "metrics.jsonl"
            if "worker" in t.user_attrs and log.exists() and len(log.read_text().splitlines()) >= 2:
                victim = t
    assert victim is not None, "no trial reached 2 epochs"
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err
    assert "some workers died" in err
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2
    assert study.trials[victim.number].state == TrialState.FAIL
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].user_attrs["run_dir"] == victim.user_attrs["run_dir"]
    epochs = [json.loads(line)["epoch"] for line in open(Path(victim.user_attrs["run_dir"]) / "metrics.jsonl")]
    assert epochs == list(range(8))  # resumed from its checkpoint: no epoch ran twice
    status = run_cli("status", "--storage", postgres_url, "--study", name, "--json", cwd=in_tmp)
    row = json.loads(status.stdout)[0]
    assert row["finished"] == 2 and row["target"] == 2 and row["best"]["value"] == study.best_value
    assert row["live_workers"] == []  # the survivor said it exited; the killed one's presence expired


def test_slurm_options_become_sbatch_flags_of_one_array(tmp_path):
    import submitit

    from cxr_automl.hpo.launch import SlurmOptions, parse_minutes
    assert [parse_minutes(t) for t in ("90", "1:30", "02:00:00", "1-0", "1-2:30")] == [90, 2, 120, 1440, 1590]
    with pytest.raises(ValueError, match="--slurm.time 'soon'"):
        parse_minutes("soon")
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(**SlurmOptions(partition="gpu", gpus_per_task=1, cpus_per_task=8, mem="32G", time="12:00:00",
                                        account="acc", qos="high", constraint="a100").executor_parameters(4, "s"))
    text = ex._executor._make_submission_file_text("cmd", "uid")
    for flag in ("--partition=gpu", "--gpus-per-task=1", "--cpus-per-task=8", "--mem=32G", "--time=720",
                 "--account=acc", "--qos=high", "--constraint=a100", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert ex._executor.parameters["array_parallelism"] == 4


def test_without_slurm_time_a_task_gets_the_partitions_limit_or_a_day_and_many_requeues(tmp_path, monkeypatch):
    from cxr_automl.hpo import launch
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))  # scontrol cannot tell the partition
    assert launch.partition_time(None) is None
    ex, limit, source = launch.make_executor(launch.SlurmOptions(), 2, "s", tmp_path)
    text = ex._executor._make_submission_file_text("cmd", "uid")
    assert (limit, "#SBATCH --time=1440\n") == ("1-00:00:00", "#SBATCH --time=1440\n")
    assert "#SBATCH --time=1440\n" in text and "#SBATCH --signal=USR2@120\n" in text and "partition sets none" in source
    assert ex._executor.max_num_timeout == launch.MAX_REQUEUES >= 100  # submitit's own default is 3
    ex, _, source = launch.make_executor(launch.SlurmOptions(time="1", max_requeues=7), 2, "s", tmp_path)
    text = ex._executor._make_submission_file_text("cmd", "uid")
    assert "#SBATCH --time=1\n" in text and "#SBATCH --signal=USR2@30\n" in text and source == "--slurm.time"
    assert ex._executor.max_num_timeout == 7
    with pytest.raises(ValueError, match="--slurm.max-requeues -1"):
        launch.SlurmOptions(max_requeues=-1).executor_parameters(2, "s")


def test_slurm_setup_lines_extra_sbatch_options_and_detach_errors(tmp_path, in_tmp):
    import submitit

    from cxr_automl.hpo.launch import SlurmOptions
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(**SlurmOptions(setup=("module load cuda/12.1", "source ~/venv/bin/activate"),
                                        extra=("mail-type=END", "--exclusive", "mail_user=me@example.org"))
                         .executor_parameters(2, "s"))
    text = ex._executor._make_submission_file_text("cmd", "uid")
    for flag in ("--mail-type=END", "--exclusive", "--mail-user=me@example.org"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert "# setup\nmodule load cuda/12.1\nsource ~/venv/bin/activate\n" in text
    assert text.index("source ~/venv/bin/activate") < text.index("cmd")  # before the worker starts
    for bad, says in (("partition=gpu", "use --slurm.partition instead"), ("array=0-9", "set by cxr-automl/submitit"),
                      ("mail-type=", "KEY=VALUE"), ("=x", "KEY=VALUE")):
        with pytest.raises(ValueError, match=re.escape(says)):
            SlurmOptions(extra=(bad,)).executor_parameters(2, "s")
    # on the command line: one line, exit 2, and no study was created
    (in_tmp / "space.yaml").write_text(SPACE)
    proc = run_cli("search", "-s", "space.yaml", "--launcher", "slurm", "--workers", "2", "--slurm.extra", "time=5",
                   "--storage", f"journal:{in_tmp / 'study.log'}", *TINY, cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "--slurm.extra 'time=5': use --slurm.time instead" in proc.stderr
    assert not (in_tmp / "study.log").exists()
    proc = run_cli("search", "-s", "space.yaml", "--workers", "2", "--detach", *TINY, cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "--detach needs --launcher slurm" in proc.stderr
    no_slurm = {"PATH": str(Path(sys.executable).parent)}  # this venv's python, no Slurm commands
    proc = run_cli("search", "-s", "space.yaml", "--launcher", "slurm", "--workers", "2", *TINY, cwd=in_tmp,
                   env=no_slurm, check=False)
    assert proc.returncode == 2 and "--launcher slurm: sbatch is not on PATH" in proc.stderr
    assert not (in_tmp / "runs" / "cxr-automl.log").exists()  # nothing created
    proc = run_cli("search", "-s", "space.yaml", "--launcher", "none", "--slurm.mem", "4G", "--storage",
                   f"journal:{in_tmp / 'none.log'}", *TINY, cwd=in_tmp)
    assert "--slurm.* options do nothing with --launcher none" in proc.stderr


def test_local_workers_each_get_their_own_gpu_and_share_of_the_cpus(tmp_path, monkeypatch):
    """The real launcher and real worker processes; the one fake is the GPU count (no GPU on CI).
    The study already holds its target, so each worker reports what it was given and exits."""
    from cxr_automl.hpo import launch, placement, searchspace
    from cxr_automl.hpo import search as search_mod
    (tmp_path / "space.yaml").write_text(SPACE)
    url = f"journal:{tmp_path / 'study.log'}"
    opts = search_mod.SearchOptions(space=searchspace.load(str(tmp_path / "space.yaml")), n_trials=1, storage=url,
                                    study_name="s", runs_root=tmp_path / "runs", overrides=tuple(TINY))
    study = search_mod.create_study(opts, storage_mod.open_storage(url, workers=2))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    monkeypatch.setattr(placement, "gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    launch.launch_local(launch.WorkerSpec(study="s", storage=url, poll_seconds=0.5), 2, tmp_path / "logs", 1)
    given = []
    for i in range(2):
        log = (tmp_path / "logs" / f"worker-{i}.log").read_text()
        m = re.search(rf"worker {i}: CUDA_VISIBLE_DEVICES=(\w+), (\d+) CPU\(s\) \[([\d, ]+)\]", log)
        assert m, log
        given.append((m.group(1), {int(c) for c in m.group(3).split(",")}))
    assert [gpu for gpu, _ in given] == ["0", "1"]
    mine = sorted(os.sched_getaffinity(0))
    assert given[0][1].isdisjoint(given[1][1]) and given[0][1] | given[1][1] <= set(mine)
    assert len(given[0][1]) == len(given[1][1]) == max(1, len(mine) // 2)


def test_gpu_ids_follow_the_visible_devices_or_the_gpus_option(monkeypatch):
    from cxr_automl.hpo import placement
    monkeypatch.setattr(placement, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # a worker's value must name the same physical GPU
    assert placement.visible_gpus("auto") == ["5", "7"]
    assert placement.visible_gpus("none") == [] and placement.visible_gpus("0, 2,3") == ["0", "2", "3"]
    with pytest.raises(ValueError, match="--gpus 'cuda'"):
        placement.visible_gpus("cuda")
    envs = [placement.worker_env(i, 4, ["0", "1", "2", "3"], list(range(16))) for i in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"] and {e["OMP_NUM_THREADS"] for e in envs} == {"4"}
    assert [placement.worker_cpus(i, 4, list(range(16))) for i in (0, 3)] == [[0, 1, 2, 3], [12, 13, 14, 15]]
    assert placement.worker_env(2, 3, ["0", "1"], [0])["CUDA_VISIBLE_DEVICES"] == "0"  # more workers: round robin
