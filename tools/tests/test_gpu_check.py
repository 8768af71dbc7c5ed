"""``tools/gpu_check.sh --tiny``: the GPU check's every section at tiny sizes on the CPU, so the script cannot rot
before a GPU is lent (the CUDA tests skip here; the benchmarks run their code paths)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("env", "cuda_tests", "gpu_dit", "planner", "ring")
RESULTS = {
    "cuda_tests": ("cuda_tests_passed", "cuda_tests_failed", "cuda_tests_skipped"),
    "gpu_dit": (
        "mfu_litegen",
        "litegen_over_eager_tokens_per_s",
        "offload_max_seq_gain",
        "offload_step_time_cost",
    ),
    "planner": ("planner_cuda_max_rel_error", "planner_cuda_tracked_max_rel_error"),
    "ring": ("ring_chunk_over_sdpa_time", "ring_chunk_rel_err_bf16"),
}


def test_the_tiny_gpu_check_reports_every_section_and_result(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out), "--tiny"],
        capture_output=True,
        text=True,
        timeout=850,  # under the suite's 900 s per test; the tiny limits add up to 780 s
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("*.log")))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    lines = {line.split(" ", 1)[0]: line for line in (out / "summary.txt").read_text().splitlines()}
    assert set(SECTIONS) | {"total"} == set(lines), lines
    for section in SECTIONS:
        assert f"{section} rc=0 " in lines[section], lines[section]
        assert (out / f"{section}.log").exists()
    assert "device=cpu" in lines["env"] and "torch=" in lines["env"]
    for section, names in RESULTS.items():
        found = dict(re.findall(r"RESULT (\w+)=(\S+)", lines[section]))
        assert set(names) <= set(found), (section, lines[section])
        for name in names:
            float(found[name])  # a number (nan where the CPU cannot measure it)
    found = dict(re.findall(r"RESULT (\w+)=(\S+)", lines["gpu_dit"]))
    assert float(found["litegen_over_eager_tokens_per_s"]) > 0 and not math.isnan(float(found["mfu_litegen"]))
    assert "cuda_tests_failed=0" in lines["cuda_tests"] and "cuda_tests_skipped=0" not in lines["cuda_tests"]
    assert "NOT MEASURED ring_overlap" in lines["ring"]
