"""``bench/realdata.py --smoke``: every arm of the real-data benchmark runs (1 epoch at 64 px); no
figures are asserted beyond being scores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_files import SHARED

BENCH = Path(__file__).resolve().parents[1] / "bench" / "realdata.py"


@pytest.mark.slow
def test_realdata_bench_smoke_runs_every_arm(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_CONFIG_DIR": str(tmp_path / "yolo-config")}
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path / "out"),
                           "--covid", str(SHARED / "covid-seg-100")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| (segmentation|detection) \|", line)]
    assert [r.split("|")[2].strip() for r in rows] == [
        "Dice Cardiomediastinum", "Dice Left Lung", "Dice Right Lung", "mean Dice", "mAP@0.5"]
    for r in rows:
        ours, ref = (float(v) for v in r.split("|")[3:5])
        assert 0 <= ours <= 1 and 0 <= ref <= 1
