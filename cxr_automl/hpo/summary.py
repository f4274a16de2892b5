"""The end-of-search report on the terminal (and ``summary.json`` beside the trial run dirs)."""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from cxr_automl.hpo import lifecycle, objectives, stats
from cxr_automl.hpo.objectives import curve
from cxr_automl.hpo.searchspace import format_value

if TYPE_CHECKING:
    from cxr_automl.hpo.search import SearchOptions


def _test_metric(space_metric: str) -> str:
    """The test-split counterpart of the searched validation metric (val/mean_dice -> test/mean_dice)."""
    return "test/" + space_metric.split("/", 1)[-1]


def _test_value(t: optuna.trial.FrozenTrial, key: str = "test/macro_auc") -> str:
    value = (t.user_attrs.get("metrics") or {}).get(key)
    return "" if value is None else f"{value:.4f}"


def epochs_run(trials: list[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """Epochs the finished trials reached (one reported value per epoch) and what running every pruned
    trial to the end would have cost: a pruned trial counted at its own epoch count (user attr
    ``epochs``), or where that was not recorded, at the longest complete trial's length."""
    finished = [(t, max(curve(t)) + 1) for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and curve(t)]
    full = max((n for t, n in finished if t.state == TrialState.COMPLETE), default=0)
    ran = sum(n for _, n in finished)
    return ran, ran + sum(max(0, int(t.user_attrs.get("epochs", full)) - n)
                          for t, n in finished if t.state == TrialState.PRUNED)


def pareto_table(study: optuna.Study, console: Console) -> list[optuna.trial.FrozenTrial]:
    """A multi-objective study's Pareto front (Optuna's non-dominated trials), one row per trial."""
    if not objectives.is_multi(study):
        return []
    front, names = objectives.pareto_front(study), objectives.names(study)
    table = Table(title=f"Pareto front of {study.study_name}: {len(front)} trial(s) no other beats on every objective")
    for col in ("trial", *names, "params"):
        table.add_column(col, overflow="fold")
    for t in front:
        table.add_row(str(t.number), *(f"{v:.4g}" for v in t.values),
                      " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                               for k, v in t.params.items()))
    console.print(table)
    return front


def print_summary(study: optuna.Study, opts: "SearchOptions", top: int = 5) -> None:
    console = Console()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    reverse = opts.space.direction == "maximize"
    ranked = sorted(complete, key=lambda t: t.values[0], reverse=reverse)
    table = Table(title=f"study {study.study_name}: best trials by {opts.space.metric} "
                        f"({', '.join(f'{n} {s}' for s, n in counts.items())})")
    test_key = _test_metric(opts.space.metric)
    _test_auc = lambda t: _test_value(t, test_key)  # noqa: E731 - the column follows the searched metric
    for col in ("trial", "val", test_key.replace("/", " "), "baseline", "params"):
        table.add_column(col, overflow="fold")
    shown = ranked[:top] + [t for t in complete if "baseline" in t.user_attrs and t not in ranked[:top]]
    for t in shown:
        params = " ".join(f"{k.split('.')[-1]}={format_value(v) if not isinstance(v, float) else f'{v:.3g}'}"
                          for k, v in t.params.items())
        table.add_row(str(t.number), f"{t.values[0]:.4f}", _test_auc(t), t.user_attrs.get("baseline", ""), params)
    console.print(table)
    from cxr_automl.hpo import warmstart
    for line in warmstart.describe(study):
        console.print(line, markup=False)
    failed = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" in t.user_attrs]
    for t in failed[-3:]:
        console.print(f"[yellow]trial {t.number} failed:[/yellow] {t.user_attrs['fail_reason']}")
    if not ranked:
        return
    if counts.get("pruned"):
        ran, to_end = epochs_run(trials)
        console.print(f"pruning stopped {counts['pruned']} of {len(complete) + counts['pruned']} trials early: "
                      f"{ran} epochs run instead of {to_end} ({to_end / max(ran, 1):.2f}x fewer)")
    best = ranked[0]
    front = pareto_table(study, console)
    base = {t.user_attrs["baseline"]: t for t in complete if "baseline" in t.user_attrs}
    for name, t in base.items():
        console.print(f"{name:>14}: val {t.values[0]:.4f}  test {_test_auc(t) or '-'}  (trial {t.number})")
    console.print(f"{'best':>14}: val {best.values[0]:.4f}  test {_test_auc(best) or '-'}  (trial {best.number})")
    run_dir = best.user_attrs.get("run_dir", "")
    model = lifecycle.best_model_path(best)
    pred = stats.load(run_dir) if run_dir else None
    ci = stats.bootstrap_ci(pred) if pred is not None else None
    if ci is not None:
        console.print(f"{'':>14}  test macro AUC {ci.value:.4f}, 95% bootstrap CI [{ci.low:.4f}, {ci.high:.4f}] "
                      f"over {ci.n} test images")
    overrides = [*opts.space.overrides, *opts.overrides, *(f"{k}={format_value(v)}" for k, v in best.params.items())]
    out = opts.runs_root / opts.study_name / "summary.json"
    text = json.dumps({"study": study.study_name, "storage": opts.storage, "metric": opts.space.metric,
                       "best_trial": best.number, "best_value": best.values[0], "best_params": best.params,
                       "best_run_dir": run_dir,
                       "best_model": str(model) if model else None,
                       "best_test_macro_auc_ci95": None if ci is None else [ci.low, ci.high], "baselines": {n: t.values[0] for n, t in base.items()},
                       "pareto_front": [{"trial": t.number, "values": t.values} for t in front],
                       "reproduce": "cxr-automl train " + shlex.join(overrides)}, indent=2)
    try:  # `cxr-automl summary` may run where the search's runs root is not writable
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        where = str(out)
    except OSError as exc:
        where = f"not written to {out} ({exc.strerror or exc})"
    # plain text: overrides such as tasks: [loc] are not rich markup, and quoted so they paste into a shell
    console.print(f"best run: {run_dir}\nbest model: {model or 'not kept (--keep-best 0, or removed)'} (config.yaml "
                  f"beside it)\nstudy:    {opts.storage} (study {study.study_name}); "
                  f"view with: cxr-automl dashboard --storage {opts.storage}\nsummary:  {where}\n"
                  f"reproduce: cxr-automl train {shlex.join(overrides)}", markup=False)
