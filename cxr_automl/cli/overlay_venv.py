"""A venv that adds a few packages on top of the running environment without touching it.

Hydra's Optuna sweeper needs hydra-core 1.4 pre-releases, which the project's ``hydra-core<1.4`` pin
excludes; the peers in ``bench/peers.py`` (Ray Tune, the sweeper) must not change the project's pins
either. An *overlay* is a fresh venv whose site-packages ends with a ``.pth`` line that adds the
current environment's site-packages (and runs their ``.pth`` files, so editable installs such as
cxr-automl itself import): its own packages shadow the base's, everything else (torch, timm, optuna)
is the base's, so building one takes seconds instead of a 6 GB torch install.

    python -m cxr_automl.cli.overlay_venv /tmp/hydra-sweeper-venv        # the sweeper's pins
    python -m cxr_automl.cli.overlay_venv /tmp/ray-venv 'ray[tune]'
    /tmp/hydra-sweeper-venv/bin/python -m cxr_automl.cli.hydra_app -s spft
"""

from __future__ import annotations

import argparse
import json
import shutil
import site
import subprocess
import sys
import time
import venv
from pathlib import Path

#: hydra-optuna-sweeper 1.4.0rc3 works with optuna 5 (1.3.0 pins optuna<3); the launcher runs jobs in parallel
HYDRA_SWEEPER = ("hydra-core==1.4.0rc3", "omegaconf==2.4.1rc1", "hydra-optuna-sweeper==1.4.0rc3",
                 "hydra-submitit-launcher==1.2.0")
_MARKER = "cxr-automl-overlay.json"


def python_of(path: Path) -> Path:
    return Path(path) / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def build(path: str | Path, requirements: tuple[str, ...] = HYDRA_SWEEPER, quiet: bool = True) -> Path:
    """Create (or reuse, when it was built with the same requirements on the same base) the overlay at
    ``path`` and return its python. Raises RuntimeError with pip's last lines when pip fails."""
    path = Path(path).resolve()
    base = [p for p in site.getsitepackages() if Path(p).is_dir()]
    want = {"requirements": sorted(requirements), "base": base, "python": sys.version.split()[0]}
    marker = path / _MARKER
    if marker.is_file() and python_of(path).exists():
        try:
            if json.loads(marker.read_text()) == want:
                return python_of(path)
        except ValueError:
            pass
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    venv.EnvBuilder(with_pip=True, symlinks=sys.platform != "win32").create(path)
    py = python_of(path)
    own = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    # "import" lines of a .pth run at startup; addsitedir also processes the base's own .pth files
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in base)
    (Path(own) / "zz_cxr_automl_base.pth").write_text(lines)
    if requirements:
        cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *(["-q"] if quiet else []),
               *requirements]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"pip install {' '.join(requirements)} into {path} failed:\n{tail}")
    marker.write_text(json.dumps(want))
    print(f"built overlay venv {path} ({', '.join(requirements) or 'no extra packages'}) "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return py


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="where the venv goes (reused when its requirements are unchanged)")
    ap.add_argument("requirements", nargs="*", help="pip requirements; default: Hydra's Optuna sweeper + "
                                                    "submitit launcher at versions that work with optuna 5")
    args = ap.parse_args(argv)
    try:
        print(build(args.path, tuple(args.requirements) or HYDRA_SWEEPER, quiet=False))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
