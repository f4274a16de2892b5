"""bench/gpu.py's CPU smoke: the benchmark's code path (Trainer epoch vs the bare step) runs and prints
its table, and says that no GPU figure was measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_gpu_bench_cpu_smoke_prints_a_table_and_no_gpu_figure(capsys, monkeypatch, dataset_cache):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert "No GPU figure was measured" in out
    row = next(line for line in out.splitlines() if line.startswith("resnet_tiny×linear"))
    ours, bare, ratio = (float(x) for x in row.split()[5:8])
    assert ours > 0 and bare > 0 and abs(ratio - ours / bare) < 0.01  # printed with one decimal
