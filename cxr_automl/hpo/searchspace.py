"""Search spaces in the Hydra Optuna sweeper's grammar, parsed by hydra-core's override parser.

A file ``search_spaces/NAME.yaml``::

    metric: val/macro_auc        # validation metric, best epoch of each trial
    direction: maximize
    n_trials: 12                 # default for --n-trials
    overrides: [strategy=spft]   # fixed for every trial
    params:                      # key: sweep expression
      strategy.unfreeze_k: range(0, 5)              # integers 0..5 (upper bound included, as the sweeper)
      strategy.ema_decay: interval(0.9, 0.999)      # float
      strategy.lr_backbone: tag(log, interval(1e-4, 3e-3))
      head: choice(linear, mlp)
    baselines:                   # trials enqueued first, to compare against
      default: {}                # every param at its config default
      linear_probe: {strategy.unfreeze_k: 0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException

from cxr_automl.errors import UserError

_KEYS = {"metric", "direction", "n_trials", "overrides", "params", "baselines"}


class SearchSpaceError(UserError):
    pass


@dataclass
class SearchSpace:
    path: Path
    params: dict[str, optuna.distributions.BaseDistribution]
    metric: str = "val/macro_auc"
    direction: str = "maximize"
    n_trials: int = 12
    overrides: list[str] = field(default_factory=list)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem


def search_space_dirs() -> list[Path]:
    """Where NAME is looked up: ./search_spaces, then the one beside the installed package source."""
    return [Path.cwd() / "search_spaces", Path(__file__).resolve().parents[2] / "search_spaces"]


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SearchSpaceError(f"search space file {p} does not exist")
        return p
    for d in search_space_dirs():
        if (d / f"{name_or_path}.yaml").is_file():
            return d / f"{name_or_path}.yaml"
    known = sorted({f.stem for d in search_space_dirs() if d.is_dir() for f in d.glob("*.yaml")})
    raise SearchSpaceError(f"unknown search space {name_or_path!r}; known: {', '.join(known) or '(none)'}"
                           " (or give a path to a .yaml file)")


def _line_of(lines: list[str], key: str) -> int:
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith((f"{key}:", f"'{key}':", f'"{key}":')):
            return i
    return 0


def to_distribution(key: str, expr: str) -> optuna.distributions.BaseDistribution:
    """One sweep expression → an Optuna distribution (raises HydraException/ValueError if bad)."""
    sweep = OverridesParser.create().parse_override(f"{key}={expr}").value()
    log = "log" in getattr(sweep, "tags", set())
    if isinstance(sweep, ChoiceSweep):
        values = list(sweep.list)
        if not values or not all(isinstance(v, (str, int, float, bool, type(None))) for v in values):
            raise ValueError("choice(...) needs at least one plain value (str, number, bool, null)")
        return optuna.distributions.CategoricalDistribution(values)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step if sweep.step is not None else 1
        if all(isinstance(v, int) for v in (start, stop, step)):
            return optuna.distributions.IntDistribution(int(start), int(stop), step=int(step), log=log)
        return optuna.distributions.FloatDistribution(float(start), float(stop), step=float(step))
    if isinstance(sweep, IntervalSweep):
        if "int" in sweep.tags:  # hydra stores interval bounds as floats
            if float(sweep.start) != int(sweep.start) or float(sweep.end) != int(sweep.end):
                raise ValueError("tag(int, interval(lo, hi)) needs whole-number bounds")
            return optuna.distributions.IntDistribution(int(sweep.start), int(sweep.end), log=log)
        return optuna.distributions.FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    raise ValueError(f"{expr!r} is a fixed value, not a sweep; use choice(), range(), interval() or tag(log, ...)")


def load(name_or_path: str) -> SearchSpace:
    path = resolve(name_or_path)
    text = path.read_text()
    lines = text.splitlines()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SearchSpaceError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise SearchSpaceError(f"{path}: needs a non-empty 'params:' mapping of key: sweep expression")
    unknown = set(raw) - _KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise SearchSpaceError(f"{path}:{_line_of(lines, key)}: unknown top-level key {key!r}; "
                               f"allowed: {', '.join(sorted(_KEYS))}")
    params = {}
    for key, expr in raw["params"].items():
        try:
            params[str(key)] = to_distribution(str(key), str(expr))
        except (HydraException, ValueError) as exc:
            msg = str(exc).strip().splitlines()[0]
            raise SearchSpaceError(f"{path}:{_line_of(lines, str(key))}: bad sweep for {key!r}: {expr!r} ({msg}); "
                                   "use choice(a,b), range(lo,hi[,step]), interval(lo,hi) or tag(log, interval(lo,hi))"
                                   ) from exc
    baselines = raw.get("baselines") or {}
    for bname, values in baselines.items():
        for key in values or {}:
            if key not in params:
                raise SearchSpaceError(f"{path}:{_line_of(lines, str(key))}: baseline {bname!r} sets {key!r}, "
                                       "which is not in params")
    direction = raw.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise SearchSpaceError(f"{path}:{_line_of(lines, 'direction')}: direction must be maximize or minimize")
    return SearchSpace(path=path, params=params, metric=raw.get("metric", "val/macro_auc"),
                       direction=direction, n_trials=int(raw.get("n_trials", 12)),
                       overrides=[str(o) for o in raw.get("overrides") or []],
                       baselines={str(k): dict(v or {}) for k, v in baselines.items()})


def format_value(value: Any) -> str:
    """A sampled value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node.get("name") if isinstance(node, dict) else node
