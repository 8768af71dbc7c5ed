"""The GPU benchmark's code paths at a tiny size on CPU (the real run needs an H100/H200)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]


def test_gpu_dit_tiny_runs_every_path_and_prints_the_results():
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "bench" / "gpu_dit.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(
        line.removeprefix("RESULT ").split("=")
        for line in proc.stdout.splitlines()
        if line.startswith("RESULT ")
    )
    assert set(results) == {
        "mfu_litegen",
        "litegen_over_eager_tokens_per_s",
        "offload_max_seq_gain",
        "offload_step_time_cost",
    }
    assert float(results["litegen_over_eager_tokens_per_s"]) > 0
    for label in ("no_ac", "full_ac", "full_ac_offload", "selective_offload"):
        assert f"{label}" in proc.stdout
