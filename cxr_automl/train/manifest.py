"""``manifest.json`` in every run directory: enough to rerun it elsewhere.

Package versions (of this distribution, its plugins' distributions and the libraries that shape the
numbers), the git commit of the source tree when there is one, a fingerprint of the dataset (its
files and the hashes of its label files), the seed, and the exact command line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from cxr_automl.plugin import registry

FILE = "manifest.json"
LIBRARIES = ("cxr-automl", "torch", "torchvision", "timm", "optuna", "hydra-core", "numpy", "scikit-learn",
             "transformers", "safetensors")
#: label/split files are hashed whole; images are listed (name and size), which is fast on any dataset
LABEL_SUFFIXES = (".csv", ".json", ".txt", ".xml", ".yaml", ".yml", ".tsv")


def versions(cfg: dict[str, Any]) -> dict[str, str]:
    names = set(LIBRARIES)
    plugins = {}
    for kind in registry.KINDS:
        name = (cfg.get(kind) or {}).get("name")
        found = registry.available(kind).get(name) if name else None  # metadata only, nothing imported
        if found is not None:
            plugins[kind] = f"{name} from {found.distribution} {found.version}"
    out = {"python": platform.python_version(), **{f"plugin:{k}": v for k, v in plugins.items()}}
    for name in sorted(names):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit(where: Path) -> dict[str, Any] | None:
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty)}


def dataset_fingerprint(root: str | None, max_files: int = 200_000) -> dict[str, Any] | None:
    """sha256 over the sorted (relative path, size) list, and sha256 of each label file."""
    if not root or not Path(root).is_dir():
        return None
    root_path = Path(root)
    listing, labels, n = hashlib.sha256(), {}, 0
    for dirpath, dirnames, files in os.walk(root_path):
        dirnames.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root_path))
            try:
                size = path.stat().st_size
            except OSError:
                continue
            listing.update(f"{rel}\t{size}\n".encode())
            n += 1
            if path.suffix.lower() in LABEL_SUFFIXES:
                labels[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            if n >= max_files:
                return {"root": str(root_path.resolve()), "files": n, "truncated": True,
                        "listing_sha256": listing.hexdigest(), "label_files": labels}
    return {"root": str(root_path.resolve()), "files": n, "listing_sha256": listing.hexdigest(), "label_files": labels}


def build(cfg: dict[str, Any]) -> dict[str, Any]:
    dataset = cfg.get("dataset") or {}
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))  # the interpreter's own command line
    return {"command": shlex.join(argv), "argv": argv, "cwd": os.getcwd(),
            "seed": (cfg.get("trainer") or {}).get("seed"), "versions": versions(cfg),
            "git": git_commit(Path(__file__).resolve().parent), "host": platform.node(),
            # a generated dataset (no root) is fingerprinted by its config, which config.yaml holds
            "dataset": {"name": dataset.get("name"), "fingerprint": dataset_fingerprint(dataset.get("root"))}}


def write(cfg: dict[str, Any], run_dir: Path) -> Path:
    path = Path(run_dir) / FILE
    path.write_text(json.dumps(build(cfg), indent=2, sort_keys=True))
    return path
