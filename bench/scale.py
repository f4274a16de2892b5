"""Cluster-scale search, measured; ratios printed side by side in one run.

    python bench/scale.py                     # all three sections
    python bench/scale.py --only storage      # storage | slurm | pruning

- slurm:   finished trials per hour with 1 vs 2 workers, each an array task on the local dev cluster
           (slurm/dev-cluster/start.sh must have run; target >= 1.7x on a machine with >= 2 free cores).
- storage: ask/tell throughput (trials/s, summed over clients) of the journal file, SQLite and
           PostgreSQL (CXR_TEST_POSTGRES_URL, default the one .ci/services.sh starts), 1-8 clients.
- pruning: epochs spent to reach the same best value without vs with a pruner (median and successive
           halving with its default look-ahead; NAME@F for another --prune-lookahead), on the embedded
           default search (spft space, synthetic_cxr, resnet_tiny; 24-epoch trials; same random-sampler
           seed, so every arm sees the same recipes in the same order). Then each pruner is replayed
           over the measured no-pruner learning curves: in the measured order (a check: it must give
           the real arm's epochs), over shuffled orders (where the best recipe falls is luck)
           and at other warm-ups, next to the ceiling: an oracle that knows every final value and stops
           each trial but the baselines and the best as soon as the warm-up allows.
           --prune-from DIR... reports earlier runs again without training (and pools their curves).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("CXR_TEST_POSTGRES_URL", "postgresql://cxr:cxr@127.0.0.1:5432/cxr_test")
SMALL = ["dataset.n_train=256", "dataset.n_val=96", "dataset.n_test=96", "dataset.image_size=64",
         "backbone.width=8", "backbone.image_size=64", "head.hidden=32", "trainer.batch_size=32",
         "trainer.progress=false"]
SPACE = """\
metric: val/macro_auc
overrides: [strategy=spft]
params:
  strategy.unfreeze_k: range(0, 4)
  strategy.lr_head: tag(log, interval(1.0e-4, 3.0e-2))
  strategy.lr_backbone: tag(log, interval(1.0e-5, 1.0e-2))
  strategy.ema_decay: interval(0.5, 0.99)
"""


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_automl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, check=True)


# ---------------------------------------------------------------- slurm: trials/hour, 1 vs 2 workers
def bench_slurm(n_trials: int, n_train: int) -> None:
    """Trials big enough (``n_train`` images, 6 epochs) that task start-up (sbatch, importing torch) is amortised."""
    rates = {}
    for workers in (1, 2):
        tmp = Path(tempfile.mkdtemp(prefix=f"scale-slurm{workers}-"))
        (tmp / "space.yaml").write_text(SPACE)
        start = time.perf_counter()
        cli("search", "-s", "space.yaml", "--study", "s", "-n", str(n_trials), "--launcher", "slurm",
            "--workers", str(workers), "--storage", f"journal:{tmp / 's.log'}", "--pruner", "none",
            "--sampler", "random", "--slurm.cpus-per-task", "1", *SMALL, f"dataset.n_train={n_train}", "strategy.epochs=6", cwd=tmp)
        hours = (time.perf_counter() - start) / 3600
        rates[workers] = n_trials / hours
        print(f"slurm  {workers} worker(s): {n_trials} trials in {hours * 3600:6.1f} s = {rates[workers]:7.1f} trials/h",
              flush=True)
    print(f"slurm  speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x (target >= 1.7x)\n", flush=True)


# ---------------------------------------------------------------- storage: ask/tell throughput
def _client(spec: str, name: str, seconds: float, out: mp.Queue) -> None:
    import warnings

    from cxr_automl.hpo.storage import open_storage
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # the heartbeat-outside-optimize notice, once per client
    study = optuna.load_study(study_name=name, storage=open_storage(spec))
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_int("k", 0, 4))
        n += 1
    out.put(n)


def bench_storage(seconds: float, clients_list: tuple[int, ...]) -> None:
    from cxr_automl.hpo.storage import open_storage
    tmp = Path(tempfile.mkdtemp(prefix="scale-storage-"))
    specs = {"journal": f"journal:{tmp / 'j.log'}", "sqlite": f"sqlite:///{tmp / 's.db'}", "postgresql": PG_URL}
    table = {}
    for label, spec in specs.items():
        try:
            storage = open_storage(spec)
        except Exception as exc:  # e.g. no PostgreSQL server here
            print(f"storage {label}: skipped ({str(exc).splitlines()[0][:100]})")
            continue
        for clients in clients_list:
            name = f"bench-{uuid.uuid4().hex[:8]}"
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            optuna.create_study(storage=storage, study_name=name, sampler=optuna.samplers.RandomSampler())
            q: mp.Queue = mp.get_context("spawn").Queue()
            procs = [mp.get_context("spawn").Process(target=_client, args=(spec, name, seconds, q)) for _ in range(clients)]
            for p in procs:
                p.start()
            total = sum(q.get() for _ in procs)
            for p in procs:
                p.join()
            table[(label, clients)] = total / seconds
    print("storage ask/tell throughput (trials/s summed over clients; random sampler, 2 params)")
    print(f"{'clients':>8} " + " ".join(f"{s:>11}" for s in specs))
    for c in clients_list:
        print(f"{c:>8} " + " ".join(f"{table.get((s, c), float('nan')):>11.1f}" for s in specs))
    print(flush=True)


# ---------------------------------------------------------------- pruning: epochs to the same best
def _run(pruner: str, n_trials: int, epochs: int, tmp: Path, quick: bool, seed: int, warmup: int) -> optuna.Study:
    """The shipped ``spft`` search space on the embedded default (``--quick``: the small setup), early
    stopping off so that the pruner is the only thing cutting trials short. One journal per arm, so arms
    can run side by side."""
    (tmp / "space.yaml").write_text(SPACE)
    space = ["-s", "space.yaml", *SMALL] if quick else ["-s", "spft", "trainer.progress=false"]
    log = tmp / f"{pruner}.log"
    name, _, lookahead = pruner.partition("@")
    cli("search", *space, "--study", pruner, "-n", str(n_trials), "--storage", f"journal:{log}",
        "--pruner", name, "--prune-lookahead", lookahead or "auto", "--prune-warmup", str(warmup),
        "--sampler", "random", "--seed", str(seed), f"strategy.epochs={epochs}", "strategy.patience=1000", cwd=tmp)
    return optuna.load_study(study_name=pruner, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(log))))


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
Curve = tuple[list[tuple[int, float]], float]  # (step, value) per epoch, final value


def _curves(study: optuna.Study, states: tuple[TrialState, ...] = (TrialState.COMPLETE,)) -> list[Curve]:
    """Per trial in number order: its (step, value) curve and final value (None if it did not complete)."""
    return [(sorted(t.intermediate_values.items()), t.value if t.state == TrialState.COMPLETE else None)
            for t in sorted(study.get_trials(states=states), key=lambda t: t.number)]


def _replay(curves: list[Curve], pruner: str, warmup: int) -> list[Curve | None]:
    """Feed recorded full learning curves, in order, to a fresh study with ``pruner`` (the same object
    ``cxr-automl search --pruner`` builds): what it would have run of each. Exact for one worker and the
    random sampler, whose recipes do not depend on what was pruned; checked against the real arms.
    ``pruner``: a name (its default look-ahead) or ``name@fraction`` (``--prune-lookahead fraction``)."""
    from cxr_automl.hpo.pruners import make_pruner, resolve_prune_lookahead
    name, _, lookahead = pruner.partition("@")
    study = optuna.create_study(direction="maximize", pruner=make_pruner(
        name, warmup, resolve_prune_lookahead(lookahead or "auto", name)))
    seen: list[Curve | None] = []
    for steps, value in curves:
        trial, ran = study.ask(), []
        trial.set_user_attr("epochs", len(steps))  # as run_trial records it; the look-ahead projects to it
        for step, v in steps:
            trial.report(v, step)
            ran.append((step, v))
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, value)
        seen.append((ran, value) if len(ran) == len(steps) else (ran, None))
    return seen


def _to_target(seen: list[tuple[list, float | None]], target: float) -> int | None:
    """Epochs spent, in trial order, until a finished trial reaches ``target`` (None: never)."""
    spent = 0
    for steps, value in seen:
        spent += len(steps)
        if value is not None and value >= target - 1e-12:
            return spent
    return None


def _oracle(curves: list[Curve], n_fixed: int, warmup: int, best: float) -> list[Curve | None]:
    """The ceiling of any pruner at this warm-up: one that knew every final value and stopped each trial
    but the baselines and the best recipe as soon as it was allowed to (after ``warmup`` + 1 epochs)."""
    return [(steps, value) if i < n_fixed or value >= best - 1e-12 else (steps[:warmup + 1], None)
            for i, (steps, value) in enumerate(curves)]


def _replay_row(curves: list[Curve], n_fixed: int, pruner: str, warmup: int,
                shuffles: list[list[Curve]]) -> tuple[float, float, float, int, float]:
    """Whole-search and to-the-best ratios in the measured order, the mean over ``shuffles`` and how
    often the best recipe was stopped, and the best value reached in the measured order."""
    best = max(v for _, v in curves)

    def outcome(order: list[Curve]) -> tuple[int, int, float, int]:
        """Epochs to the same best without / with the pruner, the best it reached, its epochs in all."""
        seen = _oracle(order, n_fixed, warmup, best) if pruner == "oracle" else _replay(order, pruner, warmup)
        got = max(v for _, v in seen if v is not None)
        target = min(best, got)
        return _to_target(order, target), _to_target(seen, target), got, sum(len(steps) for steps, _ in seen)

    without, with_p, reached, spent = outcome(curves)
    runs = [outcome(order) for order in shuffles]
    lost = sum(got < best - 1e-12 for _, _, got, _ in runs)
    ratio = sum(r[0] for r in runs) / sum(r[1] for r in runs) if runs else float("nan")
    return sum(len(steps) for steps, _ in curves) / spent, without / with_p, ratio, lost, reached


def replay_table(curves: list[Curve], n_fixed: int, pruners: list[str], warmups: list[int], orders: int,
                 seed: int) -> None:
    """Each pruner replayed over measured no-pruner curves (baselines first, then the rest shuffled), and
    the oracle ceiling next to it."""
    import random
    shuffles = [curves[:n_fixed] + random.Random(seed + i).sample(curves[n_fixed:], len(curves) - n_fixed)
                for i in range(orders)]
    best = max(v for _, v in curves)
    print(f"replayed over the measured no-pruner curves ({len(curves)} trials, {n_fixed} baselines first; "
          f"shuffled: {orders} orders); 'oracle' knows every final value (the ceiling at that warm-up):")
    print(f"{'pruner':>18} {'warm-up':>7} {'whole search':>12} {'to the best':>11} {'shuffled':>9} "
          f"{'best stopped':>12}")
    for w in warmups:
        for p in [*pruners, "oracle"]:
            whole, to_best, ratio, lost, reached = _replay_row(curves, n_fixed, p, w, shuffles)
            mark = "" if reached >= best - 1e-12 else f" (stopped the best; reached {reached:.4f})"
            print(f"{p:>18} {w:>7} {whole:>11.2f}x {to_best:>10.2f}x {ratio:>8.2f}x {lost:>5}/{orders:<6}{mark}")
    print(flush=True)


def _n_fixed(study: optuna.Study) -> int:
    return sum(1 for t in study.trials if t.system_attrs.get("fixed_params"))  # enqueued baselines run first


def report_pruning(studies: dict[str, optuna.Study], pruners: list[str], orders: int, seed: int,
                   replay_warmups: list[int]) -> None:
    """Each pruner arm against no pruner, measured; then the arm's pruner replayed over the measured
    no-pruner curves in the measured order (must equal the real arm), and a table of ``pruners``
    replayed over shuffled orders and other warm-ups. Each arm's pruner and warm-up are read from its
    study. "The same best value" is the lower of the two searches' bests, so a pruner that stopped the
    eventual winner is charged until it found something as good."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = studies["none"]
    from cxr_automl.hpo.summary import epochs_run
    spent = {p: epochs_run(s.trials)[0] for p, s in studies.items()}
    for p, s in studies.items():
        pruned = len(s.get_trials(states=(TrialState.PRUNED,)))
        print(f"pruning {p:>18}: best {s.best_value:.4f}, {pruned:2d}/{len(s.trials)} pruned, "
              f"{spent[p]:3d} epochs in all")
    curves = _curves(base)
    arms = {label: (f"{s.user_attrs['pruner']}@{s.user_attrs.get('prune_lookahead', 0.0):g}",
                    int(s.user_attrs.get("prune_warmup", 2)))
            for label, s in studies.items() if label != "none"}
    for label, (pruner, warmup) in arms.items():
        s = studies[label]
        common = min(base.best_value, s.best_value)
        with_p, without = _to_target(_curves(s, FINISHED), common), _to_target(_curves(base, FINISHED), common)
        print(f"pruning saving {pruner:>18} (warm-up {warmup}): {without}/{with_p} = {without / with_p:.2f}x fewer "
              f"epochs to reach {common:.4f} (best without {base.best_value:.4f}); "
              f"{spent['none'] / spent[label]:.2f}x fewer for the whole search (target >= 2x)")
        replayed = sum(len(steps) for steps, _ in _replay(curves, pruner, warmup))
        print(f"  replay check: the measured curves fed to the pruner in the measured order give {replayed} "
              f"epochs ({'same as' if replayed == spent[label] else 'DIFFERENT from'} the real arm)")
    if replay_warmups:
        replay_table(curves, _n_fixed(base), pruners, replay_warmups, orders, seed)


def load_arms(run_dir: Path) -> dict[str, optuna.Study]:
    """The arms of an earlier pruning run (one journal, one study per arm; labelled by file name), ``none`` first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "study name was omitted" for each arm
    logs = sorted(run_dir.glob("*.log"), key=lambda f: (f.stem != "none", f.stem))
    if not logs or logs[0].stem != "none":
        raise SystemExit(f"{run_dir}: no none.log (pass a directory an earlier pruning run printed)")
    return {f.stem: optuna.load_study(study_name=None, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(f)))) for f in logs}


def report_from(run_dirs: list[Path], pruners: list[str], orders: int, seed: int, replay_warmups: list[int]) -> None:
    """Report earlier runs again without training; with several runs (different sampler seeds, so
    different recipes), also replay over their no-pruner curves pooled: baselines once, then every
    sampled recipe, as one longer search."""
    pooled: list[Curve] = []
    n_fixed = 0
    for d in run_dirs:
        print(f"pruning run {d}:")
        arms = load_arms(d)
        report_pruning(arms, pruners, orders, seed, replay_warmups)
        n_fixed = _n_fixed(arms["none"])
        curves = _curves(arms["none"])
        pooled = pooled or curves[:n_fixed]
        pooled += curves[n_fixed:]
    if len(run_dirs) > 1 and replay_warmups:
        print("pooled runs:")
        replay_table(pooled, n_fixed, pruners, replay_warmups, orders, seed)


def bench_pruning(pruners: list[str], n_trials: int, epochs: int, quick: bool, seed: int, jobs: int,
                  orders: int, warmup: int | str, replay_warmups: list[int], replay_only: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from cxr_automl.hpo import pruners, searchspace
    warmup = pruners.resolve_prune_warmup(str(warmup), searchspace.load("spft"), (f"strategy.epochs={epochs}",))
    tmp = Path(tempfile.mkdtemp(prefix="scale-prune-"))
    arms = ["none"] if replay_only else ["none", *pruners]
    print(f"pruning: {n_trials} trials of {epochs} epochs, random sampler seed {seed}, warm-up {warmup}, "
          f"{jobs} arm(s) at a time, runs in {tmp}", flush=True)
    with ThreadPoolExecutor(jobs) as pool:  # each arm is its own process; epoch counts do not depend on load
        studies = dict(zip(arms, pool.map(lambda p: _run(p, n_trials, epochs, tmp, quick, seed, warmup), arms)))
    report_pruning(studies, pruners, orders, seed, replay_warmups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("slurm", "storage", "pruning"), action="append")
    ap.add_argument("--slurm-trials", type=int, default=6)
    ap.add_argument("--slurm-train", type=int, default=2048, help="training images per slurm trial")
    ap.add_argument("--storage-seconds", type=float, default=5.0)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--prune-trials", type=int, default=20)
    ap.add_argument("--prune-epochs", type=int, default=24, help="epochs per trial (the SPFT paper trains up to 50)")
    ap.add_argument("--pruners", default="median,successive_halving",
                    help="compared with none, comma-separated; NAME@F sets --prune-lookahead F "
                         "(successive_halving@0: without look-ahead)")
    ap.add_argument("--replay-only", action="store_true",
                    help="run the no-pruner arm only; the pruners are replayed over its curves (exact for one "
                         "worker and the random sampler: the replay check has matched every real arm)")
    ap.add_argument("--prune-quick", action="store_true", help="small images and data instead of the default")
    ap.add_argument("--prune-seed", type=int, default=3, help="random-sampler seed (the recipes every arm sees)")
    ap.add_argument("--prune-jobs", type=int, default=1, help="arms run side by side (one core each)")
    ap.add_argument("--prune-orders", type=int, default=200,
                    help="shuffled orders of the measured no-pruner curves replayed through each pruner")
    ap.add_argument("--prune-warmup", default="auto", help="cxr-automl search --prune-warmup of the arms")
    ap.add_argument("--replay-warmups", default="2,4,6,8",
                    help="warm-ups replayed over the measured no-pruner curves ('' for none)")
    ap.add_argument("--prune-from", type=Path, nargs="+", metavar="DIR",
                    help="report earlier pruning runs again (the directories they printed) instead of training")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    only = args.only or ["storage", "pruning", "slurm"]
    if "storage" in only:
        bench_storage(args.storage_seconds, tuple(int(c) for c in args.clients.split(",")))
    if "pruning" in only and args.prune_from:
        report_from(args.prune_from, args.pruners.split(","), args.prune_orders, args.prune_seed,
                    [int(w) for w in args.replay_warmups.split(",") if w])
    elif "pruning" in only:
        bench_pruning(args.pruners.split(","), args.prune_trials, args.prune_epochs, args.prune_quick, args.prune_seed,
                      args.prune_jobs, args.prune_orders, args.prune_warmup,
                      [int(w) for w in args.replay_warmups.split(",") if w], args.replay_only)
    if "slurm" in only:
        bench_slurm(args.slurm_trials, args.slurm_train)


if __name__ == "__main__":
    main()
