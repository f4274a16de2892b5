"""Composing a run's configuration with Hydra's compose API and checking it against the plugins.

``compose(["backbone=resnet18", "strategy.unfreeze_k=2"])`` returns a plain dict. Component groups
(backbone, head, strategy, dataset) are checked against the selected factory's signature, so an
option the plugin does not take is rejected with the list of options it does take.

``experiment=NAME`` selects a paper preset (``conf/experiment/NAME.yaml``, ``# @package _global_``):
it picks the four components and sets their options and the trainer's, each value citing the paper;
overrides after it on the command line still win.
"""

from __future__ import annotations

import importlib.resources
import inspect
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxr_automl.errors import UserError
from cxr_automl.plugin import registry

GROUPS = tuple(registry.KINDS)  # backbone, head, strategy, dataset
#: factory arguments the core supplies itself; users never set them
SUPPLIED = {"in_dim", "in_channels", "num_classes"}
#: the group of paper presets; not a component kind (no plugin), a set of values for all of them
EXPERIMENT = "experiment"


class ConfigError(UserError):
    """A configuration problem, phrased as what to fix."""


def _group_files(group: str) -> set[str]:
    root = importlib.resources.files("cxr_automl.config.conf") / group
    return {p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")}


def _defaults_node(factory: Any, name: str) -> dict[str, Any]:
    node: dict[str, Any] = {"name": name}
    for key, p in registry.factory_params(factory).items():
        if key in SUPPLIED:
            continue
        default = p.default if p.default is not inspect.Parameter.empty else None
        node[key] = default if isinstance(default, (int, float, str, bool, type(None))) else None
    return node


def _split(overrides: list[str]) -> list[tuple[str, str]]:
    """(key, value text) of each override, using Hydra's own parser to check the syntax."""
    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            o = parser.parse_override(text)
        except HydraException as exc:
            raise ConfigError(f"cannot parse override {text!r}: {exc}; write key=value") from exc
        out.append((o.key_or_group, text.split("=", 1)[1] if "=" in text else ""))
    return out


def compose(overrides: list[str] | tuple[str, ...] = (), check_task: bool = True) -> dict[str, Any]:
    """The resolved configuration of one run, as a plain dict. ``check_task=False`` skips the
    backbone × head × dataset-task check (``data check`` looks at the dataset alone)."""
    overrides = list(overrides)
    selection = {g: None for g in GROUPS}
    experiment = None
    for key, value in _split(overrides):
        if key in GROUPS:
            selection[key] = value
        elif key == EXPERIMENT:
            experiment = value or None
    if experiment:  # the preset's components, unless the command line picks another
        for group, name in experiment_selection(experiment).items():
            selection[group] = selection[group] or name
    # A component with no YAML of its own (a third-party plugin) gets a node from its signature.
    cs = ConfigStore.instance()
    for group, name in selection.items():
        if name and name not in _group_files(group):
            factory = registry.load(group, name)  # raises "unknown ... known: ..." for a bad name
            cs.store(group=group, name=name, node=_defaults_node(factory, name))
    fixed = _add_plus_for_factory_keys(overrides, selection, experiment)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("cxr_automl.config.conf", version_base="1.3"):
            cfg = hydra_compose("config", overrides=fixed)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    for group in GROUPS:
        _check_component(group, plain[group])
        if group == "dataset":
            _follow_backbone_size(plain)
    _check_types(plain)
    for group in GROUPS:
        _fill_defaults(group, plain[group])
    from cxr_automl.plugin.compat import check_config  # backbone × head × dataset task, before building
    reason = check_config(plain) if check_task else None
    if reason:
        raise ConfigError(reason)
    return plain


def _add_plus_for_factory_keys(overrides: list[str], selection: dict[str, str | None],
                               experiment: str | None = None) -> list[str]:
    """``strategy.foo=1`` works without Hydra's ``+`` when ``foo`` is an argument of the factory (and
    is neither in the component's YAML nor set by the selected preset)."""
    defaults = default_selection()
    preset = _experiment_node(experiment) if experiment else {}
    out, added = [], set()
    for text in overrides:
        key = text.split("=", 1)[0]
        group, _, param = key.partition(".")
        param = param.split(".")[0]  # strategy.loc_head.hidden=64: the factory's option is loc_head
        if group in GROUPS and param and not key.startswith(("+", "~")):
            name = selection[group] or defaults[group]
            factory = registry.load(group, name)
            node_keys = _yaml_keys(group, name) or set(_defaults_node(factory, name))
            node_keys = node_keys | set(preset.get(group) or {})
            if param not in node_keys:
                if param in registry.factory_params(factory) and param not in SUPPLIED:
                    # added once; a later same key (a search space's dataset.task, then the user's) overrides it
                    text = text if key in added else "+" + text
                    added.add(key)
                else:
                    options = [k for k in registry.factory_params(factory) if k not in SUPPLIED]
                    raise ConfigError(f"{group} {name!r} has no option {param!r}; its options: {', '.join(options)}")
        out.append(text)
    return out


def _yaml_keys(group: str, name: str) -> set[str] | None:
    if name not in _group_files(group):
        return None
    text = (importlib.resources.files("cxr_automl.config.conf") / group / f"{name}.yaml").read_text()
    node = OmegaConf.create(text)
    return set(node.keys())  # type: ignore[arg-type]


def experiments() -> dict[str, str]:
    """Preset name → its first comment line (what it reproduces)."""
    root = importlib.resources.files("cxr_automl.config.conf") / EXPERIMENT
    out = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml"):
            lines = [ln[1:].strip() for ln in p.read_text().splitlines()
                     if ln.startswith("#") and "@package" not in ln]
            out[p.name[:-5]] = lines[0] if lines else ""
    return out


def _experiment_node(name: str) -> Any:
    if name not in _group_files(EXPERIMENT):
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(sorted(_group_files(EXPERIMENT)))}")
    text = (importlib.resources.files("cxr_automl.config.conf") / EXPERIMENT / f"{name}.yaml").read_text()
    return OmegaConf.create(text)


def experiment_selection(name: str) -> dict[str, str]:
    """The components a preset picks (its ``override /GROUP: NAME`` defaults)."""
    sel = {}
    for item in _experiment_node(name).get("defaults") or []:
        if isinstance(item, str) or not OmegaConf.is_dict(item):
            continue
        for key, value in item.items():
            group = str(key).removeprefix("override").strip().lstrip("/")
            if group in GROUPS:
                sel[group] = str(value)
    return sel


def _follow_backbone_size(cfg: dict[str, Any]) -> None:
    """A dataset whose image size is not set anywhere takes the backbone's input size, so images are
    cached at the size the model sees (not at the loader's default and resized at every step)."""
    size = cfg["backbone"].get("image_size")
    if "image_size" not in cfg["dataset"] and isinstance(size, int):
        if "image_size" in registry.factory_params(registry.load("dataset", cfg["dataset"]["name"])):
            cfg["dataset"]["image_size"] = size


def default_selection() -> dict[str, str]:
    text = (importlib.resources.files("cxr_automl.config.conf") / "config.yaml").read_text()
    sel = {}
    for item in OmegaConf.create(text)["defaults"]:
        if isinstance(item, dict) or OmegaConf.is_dict(item):
            sel.update({k: v for k, v in item.items()})
    return sel


def _check_component(group: str, node: dict[str, Any]) -> None:
    factory = registry.load(group, node["name"])
    params = registry.factory_params(factory)
    unknown = sorted(k for k in node if k != "name" and k not in params)
    if unknown:
        options = [k for k in params if k not in SUPPLIED]
        raise ConfigError(f"{group} {node['name']!r} has no option {', '.join(unknown)}; "
                          f"its options: {', '.join(options)}")


def _check_types(plain: dict[str, Any]) -> None:
    """Every value against the type its factory (or ``TrainerConfig``) declares: one line naming them all."""
    from cxr_automl.config import types
    from cxr_automl.train.runtime import TrainerConfig
    bad = types.mismatches("trainer", plain.get("trainer") or {}, types.dataclass_kinds(TrainerConfig))
    for group in GROUPS:
        factory = registry.load(group, plain[group]["name"])
        node = {k: v for k, v in plain[group].items() if k != "name"}
        bad += types.mismatches(group, node, types.factory_kinds(factory, registry.factory_params(factory)))
    if bad:
        raise ConfigError(f"wrong type: {', '.join(bad)}")


def _fill_defaults(group: str, node: dict[str, Any]) -> None:
    """Options a component's YAML leaves out (e.g. the loader options every dataset shares, declared once
    in ``data/options.py``) get their factory defaults, so the saved config is the complete one."""
    factory = registry.load(group, node["name"])
    defaults, params = _defaults_node(factory, node["name"]), registry.factory_params(factory)
    for key, value in defaults.items():
        if key not in node and (value is not None or params[key].default is None):
            node[key] = value


def _one_line(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    if "Could not override" in text or "not in struct" in str(exc):
        key = text.split("'")[1] if "'" in text else text
        return f"unknown config key {key!r}; see `cxr-automl train --help` for the config layout"
    if "Could not find" in text:
        return text + " (see `cxr-automl plugins` for the known names)"
    return text


def to_yaml(cfg: dict[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))
