"""``cxr-automl report``: one self-contained HTML page comparing studies side by side (plotly).

Sections: best value per study, optimization histories overlaid, parameter importances (Optuna's
fANOVA), parallel coordinates per study, learning curves from the per-epoch intermediate values, and
per-class test AUC of each study's best trial (from its ``metrics`` user attr).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.colors import qualitative

from cxr_automl.hpo import objectives, stats
from cxr_automl.hpo.summary import epochs_run

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _color(i: int) -> str:
    return qualitative.Plotly[i % len(qualitative.Plotly)]


def _maximize(study: optuna.Study) -> bool:
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best trial by the (first) objective; multi-objective studies also get a Pareto plot."""
    return objectives.best_trial(study)


def _primary(t: optuna.trial.FrozenTrial) -> float:
    return t.values[0]


def best_values(studies: list[optuna.Study]) -> go.Figure:
    fig = go.Figure()
    for i, s in enumerate(studies):
        best = _best(s)
        if best is not None:
            fig.add_bar(x=[s.study_name], y=[best.values[0]], name=s.study_name, marker_color=_color(i),
                        text=[f"{best.values[0]:.4f} (trial {best.number})"], textposition="outside")
    return fig.update_layout(title="Best value per study", showlegend=False, yaxis_title=_metric(studies))


def histories(studies: list[optuna.Study]) -> go.Figure:
    fig = go.Figure()
    for i, s in enumerate(studies):
        done = [t for t in s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not done:
            continue
        pick = max if _maximize(s) else min
        running, best = [], None
        for t in done:
            best = _primary(t) if best is None else pick(best, _primary(t))
            running.append(best)
        fig.add_scatter(x=[t.number for t in done], y=[_primary(t) for t in done], mode="markers", name=f"{s.study_name} trials",
                        marker={"color": _color(i), "opacity": 0.5}, legendgroup=s.study_name)
        fig.add_scatter(x=[t.number for t in done], y=running, mode="lines", name=f"{s.study_name} best so far",
                        line={"color": _color(i), "shape": "hv"}, legendgroup=s.study_name)
    return fig.update_layout(title="Optimization history", xaxis_title="trial", yaxis_title=_metric(studies))


def importances(studies: list[optuna.Study]) -> go.Figure | None:
    fig = go.Figure()
    for i, s in enumerate(studies):
        if len(s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
            continue
        try:
            imp = optuna.importance.get_param_importances(s, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                                                          target=_primary if objectives.is_multi(s) else None)
        except (ValueError, RuntimeError):  # e.g. every trial had the same parameters
            continue
        if imp:
            names = list(imp)[::-1]
            fig.add_bar(y=names, x=[imp[n] for n in names], orientation="h", name=s.study_name, marker_color=_color(i))
    if not fig.data:
        return None
    return fig.update_layout(title="Parameter importances (fANOVA)", barmode="group", xaxis_title="importance")


def parallel(study: optuna.Study) -> go.Figure | None:
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 1:
        return None
    multi = objectives.is_multi(study)
    fig = optuna.visualization.plot_parallel_coordinate(study, target=_primary if multi else None,
                                                        target_name=objectives.names(study)[0] if multi else "Objective Value")
    return fig.update_layout(title=f"Parallel coordinates: {study.study_name}")


def learning_curves(studies: list[optuna.Study]) -> go.Figure | None:
    fig = go.Figure()
    for i, s in enumerate(studies):
        for j, t in enumerate(s.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL, TrialState.RUNNING))):
            values = objectives.curve(t)
            if not values:
                continue
            steps = sorted(values)
            fig.add_scatter(x=steps, y=[values[k] for k in steps], mode="lines+markers",
                            name=s.study_name, legendgroup=s.study_name, showlegend=j == 0 or not fig.data,
                            line={"color": _color(i), "dash": "dot" if t.state == TrialState.PRUNED else "solid"},
                            hovertext=f"trial {t.number} ({t.state.name.lower()})", opacity=0.6)
    if not fig.data:
        return None
    return fig.update_layout(title="Learning curves (per-epoch validation metric; dotted = pruned)",
                             xaxis_title="epoch", yaxis_title=_metric(studies))


def per_class_auc(studies: list[optuna.Study]) -> go.Figure | None:
    fig = go.Figure()
    for i, s in enumerate(studies):
        best = _best(s)
        metrics = (best.user_attrs.get("metrics") or {}) if best is not None else {}
        classes = sorted(k.split("/", 2)[2] for k in metrics if k.startswith("test/auc/"))
        if classes:
            fig.add_bar(x=classes, y=[metrics[f"test/auc/{c}"] for c in classes], marker_color=_color(i),
                        name=f"{s.study_name} (trial {best.number})")
    if not fig.data:
        return None
    return fig.update_layout(title="Per-class test AUC of each study's best trial", barmode="group", yaxis_title="AUC")


def pareto(study: optuna.Study) -> go.Figure | None:
    """Optuna's Pareto-front plot of a 2- or 3-objective study."""
    if not objectives.is_multi(study) or len(study.directions) > 3 or not objectives.pareto_front(study):
        return None
    fig = optuna.visualization.plot_pareto_front(study, target_names=objectives.names(study))
    return fig.update_layout(title=f"Pareto front: {study.study_name}")


def per_class_heatmap(studies: list[optuna.Study]) -> go.Figure | None:
    """Studies × classes: each best trial's per-class test AUC (from its ``metrics`` user attr)."""
    rows = {}
    for s in studies:
        best = _best(s)
        metrics = (best.user_attrs.get("metrics") or {}) if best is not None else {}
        per = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("test/auc/")}
        if per:
            rows[s.study_name] = per
    if not rows:
        return None
    classes = sorted({c for per in rows.values() for c in per})
    z = [[per.get(c) for c in classes] for per in rows.values()]
    fig = go.Figure(go.Heatmap(z=z, x=classes, y=list(rows), colorscale="Viridis", zmin=0.5, zmax=1.0,
                               text=[["" if v is None else f"{v:.3f}" for v in row] for row in z],
                               texttemplate="%{text}", colorbar={"title": "AUC"}))
    return fig.update_layout(title="Per-class test AUC heatmap (best trial of each study)")


def _statistics(studies: list[optuna.Study]) -> str:
    """Bootstrap 95 % CIs of each best trial's test macro AUC, and paired bootstraps between studies."""
    preds = {}
    for s in studies:
        best = _best(s)
        pred = stats.load(best.user_attrs.get("run_dir", "")) if best is not None and best.user_attrs.get("run_dir") else None
        if pred is not None:
            preds[s.study_name] = (best, pred)
    if not preds:
        return ""
    rows = []
    for name, (best, pred) in preds.items():
        ci = stats.bootstrap_ci(pred)
        rows.append(f"<tr><td>{html.escape(name)}</td><td>#{best.number}</td><td>{ci.n}</td>"
                    f"<td class='ci' data-study='{html.escape(name)}' data-value='{ci.value:.4f}' "
                    f"data-low='{ci.low:.4f}' data-high='{ci.high:.4f}'>{ci.value:.4f} [{ci.low:.4f}, {ci.high:.4f}]</td></tr>")
    out = ("<h2>Test macro AUC with 95 % bootstrap confidence intervals</h2><table><thead><tr><th>study</th>"
           "<th>best trial</th><th>test images</th><th>macro AUC [95 % CI]</th></tr></thead><tbody>"
           + "".join(rows) + "</tbody></table>")
    names, pairs = list(preds), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            res = stats.paired_bootstrap(preds[a][1], preds[b][1])
            if res is not None:
                pairs.append(f"<tr><td>{html.escape(a)} − {html.escape(b)}</td><td>{res.n}</td>"
                             f"<td class='paired' data-low='{res.low:.4f}' data-high='{res.high:.4f}'>"
                             f"{res.difference:+.4f} [{res.low:+.4f}, {res.high:+.4f}]</td><td>{res.p_value:.3f}</td></tr>")
    if pairs:
        out += ("<h3>Paired bootstrap on the shared test images</h3><table><thead><tr><th>difference</th>"
                "<th>shared images</th><th>macro AUC difference [95 % CI]</th><th>p (two-sided)</th></tr></thead>"
                "<tbody>" + "".join(pairs) + "</tbody></table>")
    return out + f"<p>{stats.N_RESAMPLES} bootstrap resamples of the test images (percentile intervals, seed {stats.SEED}).</p>"


def _metric(studies: list[optuna.Study]) -> str:
    return next((s.user_attrs["metric"] for s in studies if s.user_attrs.get("metric")), "objective")


def _summary_table(studies: list[optuna.Study]) -> str:
    rows = []
    for s in studies:
        trials = s.get_trials(deepcopy=False)
        count = {st: sum(t.state == st for t in trials) for st in TrialState}
        best = _best(s)
        test = (best.user_attrs.get("metrics") or {}).get("test/macro_auc") if best else None
        ran, to_end = epochs_run(trials)
        cells = [s.study_name, str(count[TrialState.COMPLETE]), str(count[TrialState.PRUNED]), f"{ran} ({to_end})",
                 str(count[TrialState.FAIL]), "-" if best is None else f"{best.values[0]:.4f} (#{best.number})",
                 "-" if test is None or (isinstance(test, float) and math.isnan(test)) else f"{test:.4f}",
                 "-" if best is None else ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in best.params.items())]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("study", "complete", "pruned", "epochs run (all to end)", "failed", "best", "test macro AUC", "best params"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def build(studies: list[optuna.Study], title: str = "cxr-automl study comparison") -> str:
    """The whole page as one HTML string; plotly.js is inlined once, so it opens offline."""
    figs: list[Any] = [best_values(studies), histories(studies), importances(studies), learning_curves(studies),
                       per_class_auc(studies), per_class_heatmap(studies), *(pareto(s) for s in studies), *(parallel(s) for s in studies)]
    parts, first = [], True
    for fig in figs:
        if fig is None:
            continue
        fig.update_layout(template="plotly_white", height=460, margin={"t": 60, "l": 60, "r": 30, "b": 50})
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False,
                                 config={"displaylogo": False}))
        first = False
    style = ("body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:12px 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{_summary_table(studies)}"
            f"{_statistics(studies)}"
            + "".join(f"<div class='figure'>{p}</div>" for p in parts) + "</body></html>")


def write_report(storage: optuna.storages.BaseStorage, spec: str, names: list[str] | None, out: Path) -> Path:
    available = optuna.get_all_study_names(storage)
    names = names or available
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"no study {', '.join(map(repr, missing))} in {spec}; it has: {', '.join(available) or 'none'}")
    studies = [optuna.load_study(study_name=n, storage=storage) for n in names]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build(studies), encoding="utf-8")
    return out
