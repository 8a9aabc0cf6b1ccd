"""The GPU benchmark at the paper's shapes keeps running: its --tiny mode (same code, 1/32 width, CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_paper_shapes.py"


@pytest.mark.slow
def test_gpu_paper_shapes_tiny_runs_every_row(tmp_path):
    env = {
        **os.environ,
        "MODISTILL_BENCH_RESULTS": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(BENCH.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny"], env=env, capture_output=True, text=True, timeout=300, cwd=BENCH.parent
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads((tmp_path / "gpu_paper_shapes_tiny.json").read_text())
    runs = result["data"]["runs"]
    names = list(runs)
    assert names[:5] == [
        "stage 1b, live teacher",
        "stage 2, live reference",
        "stage 2, precomputed reference",
        "stage 1b, cached top-8 teacher",
        "text only: modistill stage 1b, live teacher",
    ]
    assert len(names) == 6 and names[5].startswith("text only: TRL GKDTrainer")  # "+ Liger" where installed
    for name, run in runs.items():
        assert run["median_s"] > 0 and run["peak_bytes"] > 0, name
        assert result["data"]["model_flops"][name] > 0 and math.isfinite(result["data"]["model_flops"][name])
    assert result["quick"] is True and "| stage 1b, live teacher |" in result["tables"][0]
    assert not (BENCH.parent / "results" / "gpu_paper_shapes_tiny.json").exists()  # tiny never lands in results/
