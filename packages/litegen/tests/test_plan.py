"""``litegen plan``: one rank's peak memory from fake tensors over a fake world, and the ``--fit`` search.

Each call is a fresh process (the planner joins a fake world of its own). Prediction against a real step is
``tools/bench/planner.py``'s job (figures in BENCHMARKS.md); here: the command's help, a plan of the demo's config
with its parts, and the search's recommendation and its "nothing fits" answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from litegen.plan import step_cost

ROOT = Path(__file__).resolve().parents[3]
DIT = [
    "--model",
    str(ROOT / "tools" / "dit.py") + ":DiT",
    "--model-kwargs",
    '{"dim": 64, "depth": 2, "heads": 2}',
]
INPUTS = ["--inputs", '{"x": [4, 4, 8, 8], "t": [4], "text": [4, 16, 384]}']


def litegen(*argv: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("litegen")
    return subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_help():
    done = litegen("plan", "--help")
    assert done.returncode == 0 and all(flag in done.stdout for flag in ("--fit", "--world-size", "--inputs"))


VAE = [
    "--vae", "diffusers:AutoencoderKL", "--vae-inputs", '{"x": [4, 3, 32, 32]}', "--vae-kwargs",
    '{"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], '
    '"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}',
]  # fmt: skip


def test_a_plan_of_the_demo_config():
    done = litegen("plan", "--config", "tools/configs/default.yaml", *DIT, *INPUTS, *VAE, "--world-size", "2",
                   "--device-memory", "1GiB", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    parts = plan["parts"]
    assert plan["world_size"] == 2 and plan["fits"] is True and plan["config"]["ema"]["enable"] is True
    for part in ("parameters", "gradients", "optimizer state", "ema", "activations"):
        assert parts[part] > 0, parts
    # AdamW: two fp32 states per parameter; DDP: the gradients' buckets are parameter-sized
    assert parts["optimizer state"] >= 2 * parts["parameters"] and parts["gradients"] == parts["parameters"]
    held = sum(
        parts[p] for p in ("parameters", "buffers", "gradients", "optimizer state", "ema", "frozen encoders")
    )
    assert parts["frozen encoders"] > 0 and plan["encode"] > 0  # the VAE's weights, its encode's activations
    assert plan["peak"] == held + max(sum(parts.values()) - held, plan["encode"])
    small = litegen("plan", "--config", "tools/configs/default.yaml", *DIT, *INPUTS, "--world-size", "2",
                    "--device-memory", "1MiB")  # fmt: skip
    assert small.returncode == 1 and "does NOT fit" in small.stdout, small.stdout + small.stderr


def test_fit_lists_what_fits_cheapest_first():
    done = litegen("plan", *DIT, *INPUTS, "--gpus", "2", "--fit", "3MiB", "--json")
    assert done.returncode in (0, 1), done.stderr
    found = json.loads(done.stdout)
    peaks = [p["peak"] for p in found["tried"]]
    assert len(found["tried"]) >= 40 and min(peaks) < max(peaks)  # degrees, sp, checkpointing, offload differ

    def key(p: dict) -> str:
        return json.dumps(p["config"], sort_keys=True)

    assert {key(p) for p in found["fit"]} == {key(p) for p in found["tried"] if p["peak"] <= 3 * 2**20}
    params = max(p["parts"].get("parameters", 0) for p in found["tried"]) * 2
    costs = [step_cost(p["config"], params, 2) for p in found["fit"]]
    assert costs == sorted(costs)  # the first is the recommended one


def test_nothing_fits_names_the_dominant_part():
    from litegen.cli import _fit_table
    from litegen.plan import Plan

    config = {"zero_degree": 3, "sp_size": 1, "selective_ratio": 0.0}
    plan = Plan(config, 2, 0, {"parameters": 2**20, "activations": 5 * 2**20}, peak=6 * 2**20)
    table = _fit_table([], [plan], 2**20)
    assert (
        "nothing fits: the smallest peak is 6.3 MB" in table and "dominated by activations (5.2 MB)" in table
    )
