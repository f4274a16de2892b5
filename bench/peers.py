"""The same training search through what users would pick instead, side by side in one run.

Classification: the shipped ``spft`` space on the embedded default (synthetic_cxr, resnet_tiny, mlp),
the same trial budget, per-trial epochs, 2 parallel slots and sampler seed, through

* ``ours``  — ``cxr-automl search -s spft --workers 2`` with its default pruner (median);
* ``hydra`` — Hydra's Optuna sweeper (n_jobs 2) + the submitit local launcher over ``cxr_automl.cli.hydra_app``
  (no pruning: the sweeper never hands the job its trial);
* ``ray``   — Ray Tune, OptunaSearch over the same distributions + ASHA (grace = our prune warm-up),
  over the same training function (``bench/peers_drivers.py``).

Detection: ``yolo-ours`` (``cxr-automl search -s yolov8_spft backbone=yolov8n`` on the YOLO layout written
from covid-seg-100) vs ``yolo-ultralytics`` (``YOLO("yolov8n.yaml").tune()``, its genetic mutation, one
iteration at a time at full epochs) on the same data, trials and epochs.

Each peer runs from a venv this script builds under ``--venv-dir`` (an overlay on this environment:
its own hydra-core 1.4.0rc3 / ray, the rest reused), so the project's pins stay as they are.

Per arm, from the trials' run directories (``config.yaml`` written at a run's start, ``metrics.jsonl``
at each epoch's end): wall time and total epochs until a trial reaches the best value of the no-pruning
arm (hydra; ultralytics for detection), the idle share of the slots (1 - Σ run time / (slots × wall)),
orchestration s/trial ((slots × wall - Σ run time) / trials: process start, imports, batch waits, sampler),
the best value, and resume: a second study is interrupted (SIGINT to the process group, as Ctrl-C) once
one trial has finished, the same command is run again, and the trials the study then holds as finished
are compared with the target.

    python bench/peers.py                  # full: 12 trials x 8 epochs, every arm, resume checks
    python bench/peers.py --quick          # CI smoke: ours + hydra, 2 tiny trials (ray/detection: --arms)
    python bench/peers.py --report DIR     # the table of a finished run again, from its work folder

Beside the target, the *common best* (the lowest of a task's arms' bests) is a value every arm reaches, so
each arm has a time to it even when the samplers' draws leave the target out of reach for some.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DRIVERS = Path(__file__).with_name("peers_drivers.py")
COVID = Path("/work/shared/data/covid-seg-100")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ARMS = ("ours", "hydra", "ray", "yolo-ours", "yolo-ultralytics")
NEEDS = {"hydra": "hydra", "ray": "ray"}  # arm -> overlay venv
VENVS = {"hydra": None, "ray": ("ray[tune]>=2.40",)}  # None: the sweeper's pins (overlay_venv.HYDRA_SWEEPER)


@dataclass
class Run:
    start: float
    end: float
    epochs: int
    best: float | None


def read_runs(root: Path, metric: str) -> list[Run]:
    """Every training run under ``root``: ours (config.yaml + metrics.jsonl) or ultralytics' tuner iterations."""
    runs = []
    for cfg in root.rglob("config.yaml"):
        log = cfg.with_name("metrics.jsonl")
        if log.is_file():
            values = [json.loads(line).get(metric) for line in log.read_text().splitlines() if line.strip()]
            values = [v for v in values if v is not None and math.isfinite(v)]
            runs.append(Run(cfg.stat().st_mtime, log.stat().st_mtime, len(values), max(values, default=None)))
    tune = root / "ultralytics" / "tune" / "tune_results.ndjson"
    if tune.is_file():  # its tuner deletes all but the best iteration's folder: one record per iteration,
        # ended when its multitrain*/multitrain_results.json was written, started when the previous one ended
        ends = sorted(f.stat().st_mtime for f in tune.parents[1].glob("multitrain*/multitrain_results.json"))
        epochs = json.loads((root / "spec.json").read_text())["epochs"]
        start = (root / "spec.json").stat().st_mtime
        for line, end in zip([x for x in tune.read_text().splitlines() if x.strip()], ends):
            values = [d.get("metrics/mAP50(B)") for d in json.loads(line).get("datasets", {}).values()]
            runs.append(Run(start, end, epochs, max((v for v in values if v is not None), default=None)))
            start = end
    return sorted(runs, key=lambda r: r.start)


def reach(runs: list[Run], t0: float, target: float | None) -> tuple[float, float] | None:
    """(seconds from t0, epochs trained by then) when a run first reached ``target``; None if none did."""
    hits = [r.end for r in runs if r.best is not None and target is not None and r.best >= target - 1e-12]
    if not hits:
        return None
    t = min(hits)
    return t - t0, sum(r.epochs if r.end <= t else r.epochs * max(0.0, (t - r.start) / (r.end - r.start))
                       for r in runs)


def figures(runs: list[Run], t0: float, t1: float, slots: int, target: float | None,
            common: float | None = None) -> dict:
    """One arm's row. ``target``: the no-pruning arm's best (the issue's goal); ``common``: the best value
    every arm of the task reached (the lowest of their bests), which each arm reaches by construction."""
    done = [r for r in runs if r.best is not None]
    busy = sum(r.end - r.start for r in runs)
    out = {"trials": len(done), "wall_s": t1 - t0, "best": max((r.best for r in done), default=None),
           "epochs": sum(r.epochs for r in runs), "idle": 1 - busy / (slots * (t1 - t0)),
           "orch_s": (slots * (t1 - t0) - busy) / max(1, len(runs)),
           "t0": t0, "t1": t1, "slots": slots, "runs": [vars(r) for r in runs]}
    for key, value in (("reach", target), ("common", common)):
        hit = reach(runs, t0, value)
        if hit:
            out[f"{key}_s"], out[f"{key}_epochs"] = hit
    return out


TASKS = (("classification", ("ours", "hydra", "ray"), "hydra"),
         ("detection", ("yolo-ours", "yolo-ultralytics"), "yolo-ultralytics"))


def score(results: dict[str, dict]) -> dict[str, dict]:
    """Every arm's figures against its task's two targets (results as run_arm returns them)."""
    for _, task_arms, ref in TASKS:
        bests = {arm: max((x.best for x in results[arm]["runs"] if x.best is not None), default=None)
                 for arm in task_arms if "runs" in results.get(arm, {})}
        target = bests.get(ref)
        common = min((b for b in bests.values() if b is not None), default=None) if len(bests) > 1 else None
        for arm in bests:
            r = results[arm]
            results[arm] = {**figures(r["runs"], r["t0"], r["t1"], r["slots"], target, common),
                            **({"resume": r["resume"]} if "resume" in r else {})}
    return results


def report(folder: Path) -> dict[str, dict]:
    """``--report``: the figures again from a finished run's results.json and its arms' run folders."""
    results = json.loads((folder / "results.json").read_text())
    for arm, r in results.items():
        if "error" in r:
            continue
        runs = [Run(**x) for x in r["runs"]] if "runs" in r else read_runs(folder / arm, metric(arm))
        if "t0" not in r:  # written by an older bench: time from the first run's start
            r["t0"] = min(x.start for x in runs)
            print(f"{arm}: no start time in results.json; times count from its first run's start")
            r["t1"] = r["t0"] + r["wall_s"]
            r["slots"] = 1 if arm == "yolo-ultralytics" else 2
        results[arm] = {**r, "runs": runs}
    return score(results)


# ------------------------------------------------------------------------------------------ arms
def arm_command(arm: str, a: argparse.Namespace, out: Path, pythons: dict[str, Path]) -> tuple[list[str], int]:
    """The command one arm runs in ``out`` (the same command again resumes), and its parallel slots."""
    py = sys.executable
    if arm in ("ours", "yolo-ours"):
        space = "spft" if arm == "ours" else "yolov8_spft"
        return [py, "-m", "cxr_automl.cli", "search", "-s", space, "-n", str(a.n_trials), "--workers", str(a.slots),
                "--seed", str(a.seed), "--study", "peers", *overrides(arm, a)], a.slots
    if arm == "hydra":
        return [str(pythons["hydra"]), "-m", "cxr_automl.cli.hydra_app", "-s", "spft", "hydra/launcher=submitit_local",
                f"hydra.sweeper.n_trials={a.n_trials}", f"hydra.sweeper.n_jobs={a.slots}",
                f"hydra.sweeper.storage=sqlite:///{out / 'sweeper.db'}", f"hydra.sweeper.sampler.seed={a.seed}",
                *overrides(arm, a)], a.slots
    spec = out / "spec.json"
    if arm == "ray":
        from cxr_automl.hpo.pruners import resolve_prune_warmup
        from cxr_automl.hpo.searchspace import load
        grace = min(a.epochs, resolve_prune_warmup("auto", load("spft"), tuple(overrides(arm, a))) + 1)  # 0-based
        spec.write_text(json.dumps({"space": "spft", "overrides": overrides(arm, a), "n_trials": a.n_trials,
                                    "epochs": a.epochs, "slots": a.slots, "seed": a.seed, "grace": grace,
                                    "out": str(out)}))
        return [str(pythons["ray"]), str(DRIVERS), "ray", str(spec)], a.slots
    spec.write_text(json.dumps({"data": str(a.yolo_data), "n_trials": a.n_trials, "epochs": a.det_epochs,
                                "size": a.size, "batch": a.batch, "seed": a.seed, "out": str(out)}))
    return [sys.executable, str(DRIVERS), "ultralytics", str(spec)], 1  # its tuner runs one iteration at a time


def overrides(arm: str, a: argparse.Namespace) -> list[str]:
    common = ["trainer.progress=false", "trainer.num_workers=0", f"trainer.seed={a.seed}"]
    if arm.startswith("yolo"):
        return ["backbone=yolov8n", "dataset=yolo", f"dataset.data={a.yolo_data}", f"strategy.epochs={a.det_epochs}",
                f"dataset.image_size={a.size}", f"backbone.image_size={a.size}", f"trainer.batch_size={a.batch}",
                f"trainer.eval_batch_size={a.batch}", *common]
    return [f"strategy.epochs={a.epochs}", *a.extra, *common]


def finished_trials(arm: str, out: Path, last_line: str) -> tuple[int, int]:
    """(finished, still RUNNING) trials the arm's study holds."""
    if arm in ("ours", "yolo-ours", "hydra"):
        import optuna
        from optuna.trial import TrialState
        storage = f"sqlite:///{out / 'sweeper.db'}" if arm == "hydra" else \
            optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "runs" / "cxr-automl.log")))
        trials = optuna.load_study(study_name="spft" if arm == "hydra" else "peers", storage=storage).get_trials()
        return (sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
                sum(t.state == TrialState.RUNNING for t in trials))
    try:
        return int(json.loads(last_line)["finished"]), 0
    except (ValueError, KeyError):
        return -1, 0


def run_arm(arm: str, a: argparse.Namespace, out: Path, pythons: dict[str, Path], interrupt: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd, slots = arm_command(arm, a, out, pythons)
    log = open(out / "log.txt", "a")
    t0 = time.time()
    if interrupt:  # Ctrl-C once the first trial has finished, then the same command again
        p = subprocess.Popen(cmd, cwd=out, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while p.poll() is None and not one_finished(read_runs(out, metric(arm)), slots, full_epochs(arm, a)):
            time.sleep(1)
        if p.poll() is None:
            time.sleep(2)
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    done = subprocess.run(cmd, cwd=out, env=ENV, stdout=subprocess.PIPE, stderr=log, text=True, timeout=a.arm_timeout)
    log.write(done.stdout)
    t1 = time.time()
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}; see {out / 'log.txt'}"}
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if interrupt:
        finished, running = finished_trials(arm, out, last)
        return {"resume_finished": finished, "resume_running": running, "resume_runs": len(read_runs(out, metric(arm)))}
    return {"runs": read_runs(out, metric(arm)), "t0": t0, "t1": t1, "slots": slots}


def one_finished(runs: list[Run], slots: int, epochs: int) -> bool:
    """A trial has finished: one ran all its epochs, or more runs started than there are slots."""
    return len(runs) > slots or any(r.epochs >= epochs for r in runs)


def metric(arm: str) -> str:
    return "val/map_50" if arm.startswith("yolo") else "val/macro_auc"


def full_epochs(arm: str, a: argparse.Namespace) -> int:
    return a.det_epochs if arm.startswith("yolo") else a.epochs


# ----------------------------------------------------------------------------------------- table
def table(results: dict[str, dict], n_trials: int) -> str:
    lines = ["| task | arm | trials | best | wall s | epochs | wall s to target | epochs to target "
             "| wall s to common best | epochs to common best | idle share | orchestration s/trial "
             "| resume: finished / target |", "|---|" * 1 + "---|" * 12]
    for task, arms, ref in TASKS:
        target = results.get(ref, {}).get("best")
        commons = [results[x]["best"] for x in arms if results.get(x, {}).get("best") is not None]
        for arm in arms:
            r = results.get(arm)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {task} | {arm} | {r['error']} |" + " |" * 11)
                continue
            hit = lambda key: (f"{r[key + '_s']:.0f}", f"{r[key + '_epochs']:.0f}") if key + "_s" in r \
                else ("not reached",) * 2  # noqa: E731
            res = r.get("resume")
            res_txt = "-" if res is None else (f"{res['resume_finished']} / {n_trials}" +
                                               (f" (+{res['resume_running']} RUNNING)" if res["resume_running"] else "")
                                               + f", {res.get('resume_runs', '?')} runs trained")
            best = "-" if r["best"] is None else f"{r['best']:.4f}"
            lines.append(f"| {task} | {arm} | {r['trials']} | {best} | {r['wall_s']:.0f} | {r['epochs']} "
                         f"| {' | '.join(hit('reach'))} | {' | '.join(hit('common'))} | {r['idle']:.0%} "
                         f"| {r['orch_s']:.1f} | {res_txt} |")
        lines.append(f"| {task} | target | | {'-' if target is None else f'{target:.4f}'} (best of {ref}, no pruning) "
                     "| | | | | | | | | |")
        if len(commons) > 1:
            lines.append(f"| {task} | common best | | {min(commons):.4f} (the lowest arm's best: every arm reached it) "
                         "| | | | | | | | | |")
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> list[str]:
    """ours against each peer (issue 21's goals: >= 1.5x the sweeper, not slower than ASHA; none set for
    detection), through the budget and to each target."""
    out = []
    for mine, peer, goal in (("ours", "hydra", 1.5), ("ours", "ray", 1.0), ("yolo-ours", "yolo-ultralytics", None)):
        ours, p = results.get(mine, {}), results.get(peer, {})
        if "wall_s" in ours and "wall_s" in p:  # independent of which recipes each sampler happened to draw
            out.append(f"{mine} vs {peer}: {p['wall_s'] / ours['wall_s']:.2f}x faster through the same trial budget")
        for key, what in (("reach", "the target"), ("common", "the common best")):
            if f"{key}_s" in ours and f"{key}_s" in p:
                ratio = p[f"{key}_s"] / ours[f"{key}_s"]
                verdict = "" if goal is None else f" (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})"
                out.append(f"{mine} vs {peer}: {ratio:.2f}x faster to {what}{verdict}")
            elif "wall_s" in ours and "wall_s" in p:
                out.append(f"{mine} vs {peer}: no ratio to {what} (not reached by "
                           f"{mine if f'{key}_s' not in ours else peer})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: 2 trials x 2 epochs on 64 images at 64 px")
    ap.add_argument("--arms", default=None, help=f"comma-separated, of {', '.join(ARMS)} "
                                                 "(default: all; --quick: ours,hydra)")
    ap.add_argument("--n-trials", type=int, default=None, help="trial budget per arm (default 12; quick 4)")
    ap.add_argument("--epochs", type=int, default=None, help="classification epochs per trial (default 8, quick 3)")
    ap.add_argument("--det-epochs", type=int, default=None, help="detection epochs per trial (default 10, quick 2)")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="detection image side (default 128, quick 64)")
    ap.add_argument("--batch", type=int, default=8, help="detection batch size")
    ap.add_argument("--no-resume", action="store_true", help="skip the SIGINT/resume checks (halves the time)")
    ap.add_argument("--venv-dir", type=Path, default=ROOT / ".peer-venvs", help="where the peers' venvs are built "
                                                                              "(reused while unchanged)")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: runs/peers-<time>)")
    ap.add_argument("--covid", type=Path, default=COVID)
    ap.add_argument("--arm-timeout", type=int, default=7200)
    ap.add_argument("--report", type=Path, metavar="DIR", help="print the table of a finished run's work folder "
                                                              "again (its results.json and run folders); runs nothing")
    ap.add_argument("overrides", nargs="*", help="more config overrides for every classification arm, e.g. "
                                                 "dataset.n_train=500")
    a = ap.parse_args()
    if a.report:
        results = report(a.report)
        print(table(results, a.n_trials or 12))
        for line in ratios(results):
            print(line)
        return
    q = a.quick
    a.n_trials = a.n_trials or (2 if q else 12)
    a.epochs = a.epochs or (2 if q else 8)
    a.det_epochs = a.det_epochs or (2 if q else 10)
    a.size = a.size or (64 if q else 128)
    a.extra = (["strategy.head_epochs=1", "dataset.n_train=64", "dataset.n_val=32", "dataset.n_test=16",
                "dataset.image_size=64"] if q else []) + a.overrides
    arms = (a.arms or ("ours,hydra" if q else ",".join(ARMS))).split(",")
    bad = [x for x in arms if x not in ARMS]
    if bad:
        sys.exit(f"error: unknown arm {bad[0]!r}; known: {', '.join(ARMS)}")
    out = (a.out or ROOT / "runs" / time.strftime("peers-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from cxr_automl.cli import overlay_venv
    pythons = {}
    for name in sorted({NEEDS[x] for x in arms if x in NEEDS}):
        t = time.time()
        pythons[name] = overlay_venv.build(a.venv_dir / name, VENVS[name] or overlay_venv.HYDRA_SWEEPER)
        print(f"venv {name}: {a.venv_dir / name} ready in {time.time() - t:.0f} s")
    if any(x.startswith("yolo") for x in arms):
        from cxr_automl.plugin.testing.layouts import read_covid, write_yolo
        layout = write_yolo(read_covid(a.covid, n=100), out / "yolo-layout", negatives=0)
        a.yolo_data = Path(layout[1].split("=", 1)[1])
    skipped = [x for x in ARMS if x not in arms]
    print(f"arms: {', '.join(arms)}" + (f"; not run: {', '.join(skipped)}" + (
         " (--quick runs only the arms whose venvs build in seconds; add them with --arms)" if q and not a.arms else "") if skipped
        else ""))
    print(f"budget: {a.n_trials} trials, {a.epochs} epochs (detection {a.det_epochs}), {a.slots} slots, seed {a.seed}; "
          f"cores here: {os.cpu_count()}, each process OMP_NUM_THREADS=1")
    results: dict[str, dict] = {}
    for arm in arms:
        t = time.time()
        r = run_arm(arm, a, out / arm, pythons, interrupt=False)
        results[arm] = r
        what = f"error {r['error']}" if "error" in r else f"{len(r['runs'])} runs"
        print(f"{arm}: {what} in {time.time() - t:.0f} s", flush=True)
    results = score(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if not a.no_resume:
        for arm in arms:
            if "error" not in results[arm]:
                t = time.time()
                results[arm]["resume"] = res = run_arm(arm, a, out / f"{arm}-resume", pythons, interrupt=True)
                print(f"{arm} resume check: {res} in {time.time() - t:.0f} s", flush=True)
                if "error" in res:
                    results[arm]["resume"] = {"resume_finished": -1, "resume_running": 0, "resume_runs": "?"}
                (out / "results.json").write_text(json.dumps(results, indent=1))  # kept if a later arm is stopped
    print()
    print(table(results, a.n_trials))
    for line in ratios(results):
        print(line)
    print(f"work folder: {out}")


if __name__ == "__main__":
    main()
