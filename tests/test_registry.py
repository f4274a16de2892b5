"""The entry-point registry, exercised with real distributions built and installed in a temp dir."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TINY, run_cli
from cxr_automl.plugin import registry

TOY_MODULE = '''
"""A third-party backbone: a 3-stage CNN implementing cxr-automl's Backbone interface."""
import torch
from torch import nn
from cxr_automl.plugin.interfaces import Backbone, BackboneOutput, InputSpec


class ToyCNN(Backbone):
    def __init__(self, width):
        super().__init__()
        chans = [width, 2 * width, 4 * width]
        self.stages = nn.ModuleList()
        prev = 1
        for c in chans:
            self.stages.append(nn.Sequential(nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.ReLU()))
            prev = c
        self.feature_channels = tuple(chans)
        self.embed_dim = chans[-1]
        self.input_spec = InputSpec(size=64, channels=1, mean=(0.5,), std=(0.25,))

    def forward(self, x):
        feats = []
        for s in self.stages:
            x = s(x)
            feats.append(x)
        return BackboneOutput(pooled=x.mean(dim=(2, 3)), features=feats)

    def blocks(self):
        return list(self.stages)


def toy_cnn(width: int = 8) -> ToyCNN:
    return ToyCNN(width)
'''


def _make_dist(root: Path, name: str, module: str, code: str, entry_points: dict[str, dict[str, str]]) -> Path:
    src = root / name
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text(code)
    eps = "\n".join(f'[project.entry-points."{group}"]\n' + "\n".join(f'{k} = "{v}"' for k, v in items.items())
                    for group, items in entry_points.items())
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "0.3.1"
        [tool.setuptools]
        packages = ["{module}"]
        """) + eps + "\n")
    return src


def _install(src: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """site dir with a working plugin distribution and a broken one."""
    root = tmp_path_factory.mktemp("dists")
    site = root / "site"
    _install(_make_dist(root, "cxr-automl-toy", "cxr_toy", TOY_MODULE,
                        {"cxr_automl.backbones": {"toy_cnn": "cxr_toy:toy_cnn"}}), site)
    _install(_make_dist(root, "cxr-automl-broken", "cxr_broken", "import not_a_real_module_xyz\n",
                        {"cxr_automl.heads": {"broken_head": "cxr_broken:make"}}), site)
    return site


def test_listing_reads_metadata_only():
    code = ("import sys\nfrom cxr_automl.plugin import registry\n"
            "names = {k: list(registry.available(k)) for k in registry.KINDS}\n"
            "assert 'resnet18' in names['backbone'] and 'spft' in names['strategy'], names\n"
            "loaded = [m for m in sys.modules if m.startswith('cxr_automl_plugins') or m in ('timm', 'torch')]\n"
            "assert not loaded, loaded\n"
            "registry.load('head', 'linear')\n"
            "assert 'cxr_automl_plugins.heads.classification' in sys.modules\n"
            "assert 'cxr_automl_plugins.backbones.resnet' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_name_lists_known_names():
    with pytest.raises(registry.RegistryError, match="unknown strategy .nope.; known strategies: finetune, .*spft"):
        registry.load("strategy", "nope")


def test_third_party_plugin_listed_usable_and_broken_one_reported(third_party, in_tmp):
    env = {"PYTHONPATH": str(third_party)}
    listing = json.loads(run_cli("plugins", "--json", cwd=in_tmp, env=env).stdout)
    rows = {(r["kind"], r["name"]): r for r in listing}
    toy = rows[("backbone", "toy_cnn")]
    assert toy["distribution"] == "cxr-automl-toy" and toy["version"] == "0.3.1" and toy["loads"]
    broken = rows[("head", "broken_head")]
    assert not broken["loads"]
    assert "cxr-automl-broken[cxr_broken:make]" in broken["error"] and "not_a_real_module_xyz" in broken["error"]
    assert rows[("backbone", "resnet18")]["loads"] and rows[("head", "mlp")]["loads"]  # the others still work
    # usable: a real training run with the third-party backbone (config node built from its signature)
    run_cli("train", "backbone=toy_cnn", "backbone.width=4", *[o for o in TINY if not o.startswith("backbone.")],
            "run_dir=runs/toy", cwd=in_tmp, env=env)
    metrics = json.loads((in_tmp / "runs/toy/metrics.json").read_text())
    assert "test/macro_auc" in metrics
    bad = run_cli("train", "backbone=toy_cnn", "backbone.depth=3", cwd=in_tmp, env=env, check=False)
    assert bad.returncode == 2 and "backbone 'toy_cnn' has no option 'depth'; its options: width" in bad.stderr


def test_same_name_from_two_distributions_is_an_error(tmp_path):
    site = tmp_path / "site"
    _install(_make_dist(tmp_path, "cxr-automl-clash", "cxr_clash", "def resnet18():\n    pass\n",
                        {"cxr_automl.backbones": {"resnet18": "cxr_clash:resnet18"}}), site)
    proc = subprocess.run([sys.executable, "-c", "from cxr_automl.plugin import registry; registry.available('backbone')"],
                          env={**__import__("os").environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "declared by two distributions" in proc.stderr
    assert "cxr-automl[cxr_automl_plugins.backbones.resnet:resnet18]" in proc.stderr
    assert "cxr-automl-clash[cxr_clash:resnet18]" in proc.stderr
