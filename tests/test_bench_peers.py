"""``bench/peers.py --quick``: ours and the Hydra sweeper arm run the same 2-trial search side by side,
each is interrupted with SIGINT and re-run; the table comes out. Figures are not asserted beyond being
measured; our own resume must land exactly on the target."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "peers.py"


@pytest.mark.slow
def test_peers_bench_quick_runs_ours_and_the_hydra_sweeper(tmp_path, request):
    venvs = request.config.cache.mkdir("peer-venvs")  # the sweeper overlay, reused between runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--venv-dir", str(venvs), "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "not run: ray, yolo-ours, yolo-ultralytics" in done.stdout
    rows = {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| classification \| (ours|hydra) \|(.*)\|$", done.stdout, re.M)}
    assert set(rows) == {"ours", "hydra"}, done.stdout
    for cells in rows.values():
        trials, best = int(cells[0]), float(cells[1])
        assert trials == 2 and 0.0 <= best <= 1.0
        assert re.match(r"\d+ / 2", cells[-1])
    assert rows["ours"][-1].startswith("2 / 2,")  # exactly the target after Ctrl-C and re-running
    assert re.search(r"ours vs hydra: (\d+\.\d+x faster|no ratio)", done.stdout)
