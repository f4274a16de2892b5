"""`cxr-automl report` and `cxr-automl dashboard` in a real headless chromium; status, summary."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import CLI, run_cli

CLASSES = ["cardiomegaly", "effusion", "nodule"]


def _fill(storage, name: str, seed: int, n: int = 8) -> None:
    """A study shaped like cxr-automl's: per-epoch intermediate values, pruned trials, metrics attrs."""
    rng = random.Random(seed)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    study.set_user_attr("metric", "val/macro_auc")
    dists = {"strategy.unfreeze_k": IntDistribution(0, 4), "strategy.lr_head": FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(n):
        params = {"strategy.unfreeze_k": rng.randint(0, 4), "strategy.lr_head": 10 ** rng.uniform(-4, -2)}
        pruned = i % 4 == 3
        curve = {e: 0.5 + 0.04 * e * params["strategy.unfreeze_k"] / 4 + rng.uniform(0, 0.05) for e in range(2 if pruned else 5)}
        metrics = {f"test/auc/{c}": rng.uniform(0.55, 0.9) for c in CLASSES}
        metrics["test/macro_auc"] = sum(metrics.values()) / len(CLASSES)
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else max(curve.values()),
            params=params, distributions=dists, intermediate_values=curve,
            user_attrs={"metrics": metrics, "run_dir": f"runs/{name}/trial_{i:04d}"}))


def _chromium(in_tmp: Path) -> tuple[str, list[str]]:
    """Debian's chromium and the flags of a headless, offline, logging run."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.geteuid() == 0:
            raise AssertionError("chromium missing: .ci/services.sh installs it")
        pytest.skip("Debian's chromium is not installed (run .ci/services.sh as root)")
    return chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0",
                      "--virtual-time-budget=15000", f"--user-data-dir={in_tmp / 'profile'}"]


def _dump_dom(in_tmp: Path, url: str) -> subprocess.CompletedProcess:
    """The page at ``url`` after its scripts ran, in headless chromium; no console error allowed."""
    chromium, flags = _chromium(in_tmp)
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, "\n".join(console)
    return dom


def test_report_renders_in_headless_chromium_without_console_errors(in_tmp):
    spec = f"journal:{in_tmp / 'studies.log'}"
    from cxr_automl.hpo.storage import open_storage
    storage = open_storage(spec)
    _fill(storage, "spft", 0)
    _fill(storage, "finetune", 1)
    out = in_tmp / "report.html"
    run_cli("report", "--storage", spec, "--study", "spft", "--study", "finetune", "--out", str(out), cwd=in_tmp)
    page = out.read_text()
    assert "<script" in page and "cdn.plot.ly" not in page.split("<body>")[0]  # plotly.js inlined: works offline
    for title in ("Best value per study", "Optimization history", "Parameter importances", "Learning curves",
                  "Per-class test AUC", "Parallel coordinates: spft", "Parallel coordinates: finetune"):
        assert title in page, title
    bad = run_cli("report", "--storage", spec, "--study", "nope", "--out", str(out), cwd=in_tmp, check=False)
    assert bad.returncode == 2 and "no study 'nope'" in bad.stderr

    chromium, flags = _chromium(in_tmp)
    dom = _dump_dom(in_tmp, out.as_uri())
    # plotly.js ran: every figure became an SVG plot (9 figures incl. 2 parallel-coordinates plots)
    assert dom.stdout.count('class="main-svg"') >= 7 * 2, dom.stdout[:2000]
    shot = in_tmp / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1280,2400", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, text=True, timeout=180)
    assert shot.stat().st_size > 20_000
    if os.environ.get("CXR_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["CXR_KEEP_SCREENSHOT"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_storage(in_tmp):
    spec = f"journal:{in_tmp / 'studies.log'}"
    from cxr_automl.hpo.storage import open_storage
    _fill(open_storage(spec), "spft", 0, n=3)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_automl.cli", "dashboard", "--storage", spec, "--port", str(port)],
                            cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read())
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.3)
        assert body is not None, "dashboard never answered"
        assert [s["study_name"] for s in body["study_summaries"]] == ["spft"]
        # what a user sees: the trial page, rendered by the dashboard's own scripts, shows cxr-automl's user attrs
        dom = _dump_dom(in_tmp, f"http://127.0.0.1:{port}/dashboard/studies/0/trials")
        assert "runs/spft/trial_0000" in dom.stdout and "Trial 2" in dom.stdout, dom.stdout[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_status_report_and_summary_count_the_epochs_pruning_saved(in_tmp, capsys):
    """8 trials: 6 complete of 5 epochs, 2 pruned after 2 -> 34 epochs run, 40 had every trial run to the end."""
    from cxr_automl.hpo import searchspace
    from cxr_automl.hpo.search import SearchOptions
    from cxr_automl.hpo.storage import open_storage
    from cxr_automl.hpo.summary import print_summary
    spec = f"journal:{in_tmp / 'studies.log'}"
    storage = open_storage(spec)
    _fill(storage, "spft", 0)
    status = json.loads(run_cli("status", "--storage", spec, "--json", cwd=in_tmp).stdout)
    assert status[0]["epochs"] == {"run": 34, "all_to_end": 40}
    out = in_tmp / "report.html"
    run_cli("report", "--storage", spec, "--out", str(out), cwd=in_tmp)
    assert "<td>34 (40)</td>" in out.read_text()
    opts = SearchOptions(space=searchspace.load("spft"), n_trials=8, storage=spec, study_name="spft", runs_root=in_tmp)
    print_summary(optuna.load_study(study_name="spft", storage=storage), opts)
    assert "pruning stopped 2 of 8 trials early: 34 epochs run instead of 40 (1.18x fewer)" in " ".join(capsys.readouterr().out.split())
    # a pruned trial that recorded its own epoch count (run_trial does) counts at that, not the longest complete one
    from optuna.trial import create_trial

    from cxr_automl.hpo.summary import epochs_run
    done = create_trial(value=0.9, intermediate_values={0: 0.5, 1: 0.6, 2: 0.9})
    cut = create_trial(state=TrialState.PRUNED, intermediate_values={0: 0.4}, user_attrs={"epochs": 10})
    assert epochs_run([done, cut]) == (4, 13)


def test_read_commands_refuse_a_storage_path_that_is_not_there(in_tmp):
    """A typo in --storage is one line naming the path, and leaves no new empty storage behind."""
    from cxr_automl.hpo.storage import open_storage
    for spec in (f"journal:{in_tmp / 'typo.log'}", f"sqlite:///{in_tmp / 'typo.db'}"):
        for command in ("status", "summary", "report", "dashboard"):
            proc = run_cli(command, "--storage", spec, cwd=in_tmp, check=False)
            assert proc.returncode == 2 and "no study storage at" in proc.stderr and "typo" in proc.stderr, (command, proc.stderr)
    assert not list(in_tmp.glob("typo*"))
    spec = f"journal:{in_tmp / 'two.log'}"
    storage = open_storage(spec)
    _fill(storage, "a", 0, n=2)
    _fill(storage, "b", 1, n=2)
    proc = run_cli("summary", "--storage", spec, cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "holds 2 studies (a, b); pick one with --study" in proc.stderr


def test_status_watch_refreshes_until_the_study_holds_its_target(in_tmp):
    """`status --watch` (after search --detach) keeps refreshing while trials are missing, and returns
    by itself once the study holds its target number of finished trials."""
    from cxr_automl.hpo.storage import open_storage
    spec = f"journal:{in_tmp / 'w.log'}"
    storage = open_storage(spec)
    _fill(storage, "spft", 0, n=3)
    study = optuna.load_study(study_name="spft", storage=storage)
    study.set_user_attr("n_trials", 4)
    proc = subprocess.Popen([*CLI, "status", "--storage", spec, "--json", "--watch", "0.5"], cwd=in_tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())
    assert first[0]["finished"] == 3 and first[0]["target"] == 4
    time.sleep(1.5)
    assert proc.poll() is None  # 3 of 4: still watching
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.99, params={}, distributions={}))
    out, err = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 0, err
    assert lines[-1][0]["finished"] == 4 and lines[-1][0]["best"]["value"] == 0.99 and len(lines) >= 3
    table = run_cli("status", "--storage", spec, "--watch", "0.5", cwd=in_tmp)  # done already: one table, returns
    assert "4/4" in table.stdout and "; done" in table.stdout
    study.set_user_attr("n_trials", 5)  # one more wanted and no worker: the table says so while it waits
    command = shlex.join([*CLI, "status", "--storage", spec, "--watch", "0.5"])  # in a terminal: refreshed in place
    proc = subprocess.Popen(["script", "-qec", command, "/dev/null"], cwd=in_tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "250"})
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "no live worker and no queued task" not in "".join(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "4/5" in "".join(seen), "".join(seen)
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5, params={}, distributions={}))
    assert proc.wait(timeout=60) == 0
    reader.join(timeout=10)
    assert "5/5" in "".join(seen) and "; done" in "".join(seen)
    bad = run_cli("status", "--storage", spec, "--watch", "-1", cwd=in_tmp, check=False)
    assert bad.returncode == 2 and "--watch -1" in bad.stderr


def _predictions(run_dir: Path, ids: list[str], labels, probs) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "predictions.csv", "w") as fh:
        fh.write(",".join(["image_id", *(f"label:{c}" for c in CLASSES), *(f"prob:{c}" for c in CLASSES)]) + "\n")
        for i, image_id in enumerate(ids):
            fh.write(",".join([image_id, *(str(int(v)) for v in labels[i]), *(f"{p:.6f}" for p in probs[i])]) + "\n")


@pytest.mark.slow
def test_report_statistics_bootstrap_cis_paired_test_and_heatmap_in_chromium(in_tmp):
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from cxr_automl.hpo.storage import open_storage
    spec = f"journal:{in_tmp / 'studies.log'}"
    storage = open_storage(spec)
    rng = np.random.default_rng(1)
    ids = [f"img{i:03d}" for i in range(120)]
    labels = (rng.random((120, len(CLASSES))) < 0.4).astype(float)
    preds = {}
    for name, seed, signal in (("spft", 0, 1.2), ("finetune", 1, 0.6)):
        _fill(storage, name, seed)
        best = optuna.load_study(study_name=name, storage=storage).best_trial
        run_dir = in_tmp / best.user_attrs["run_dir"]
        probs = 1 / (1 + np.exp(-(signal * (labels * 2 - 1) + rng.normal(size=labels.shape))))
        _predictions(run_dir, ids, labels, probs)
        preds[name] = probs
    out = in_tmp / "report.html"
    run_cli("report", "--storage", spec, "--out", str(out), cwd=in_tmp)
    dom = _dump_dom(in_tmp, out.as_uri()).stdout  # no console error
    assert "Per-class test AUC heatmap" in dom and "Paired bootstrap on the shared test images" in dom

    def macro(lab, prob):
        return np.mean([roc_auc_score(lab[:, c], prob[:, c]) for c in range(lab.shape[1]) if 0 < lab[:, c].sum() < len(lab)])
    import re
    cells = {m[0]: (float(m[1]), float(m[2]), float(m[3])) for m in re.findall(
        r"data-study=\"(\w+)\" data-value=\"([\d.]+)\" data-low=\"([\d.]+)\" data-high=\"([\d.]+)\"", dom)}
    assert set(cells) == {"spft", "finetune"}
    boot = np.random.default_rng(123)  # an independent bootstrap: different resamples, same distribution
    for name, probs in preds.items():
        value, low, high = cells[name]
        assert abs(value - macro(labels, probs)) < 1e-3
        draws = [macro(labels[i], probs[i]) for i in (boot.integers(0, 120, 120) for _ in range(2000))]
        ref_low, ref_high = np.percentile(draws, [2.5, 97.5])
        assert abs(low - ref_low) < 0.02 and abs(high - ref_high) < 0.02, (name, low, high, ref_low, ref_high)
        assert low < value < high
    paired = re.search(r"class=\"paired\" data-low=\"([-\d.]+)\" data-high=\"([-\d.]+)\"", dom)
    assert float(paired[1]) > 0  # spft's stronger signal wins on the same images: the CI excludes 0
    chromium, flags = _chromium(in_tmp)
    shot = in_tmp / "stats.png"
    subprocess.run([chromium, *flags, "--window-size=1280,1400", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, text=True, timeout=180)
    assert shot.stat().st_size > 20_000
    if os.environ.get("CXR_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["CXR_KEEP_SCREENSHOT"])
