"""``litegen plan``: one rank's peak memory from fake tensors over a fake world, and the ``--fit`` search.

Each call is a fresh process (the planner joins a fake world of its own). Prediction against a real step is
``tools/bench/planner.py``'s job (figures in BENCHMARKS.md); here: the command's help, a plan of the demo's config
with its parts, and the search's recommendation and its "nothing fits" answer.
"""

from __future__ import annotations

import json
import os
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


PLAN_TP = """
import json, sys
import torch
from dit import DiT
from litegen.plan import Workload, plans

inputs = {"x": [4, 4, 8, 8], "t": [4], "text": [4, 16, 384]}
work = Workload(lambda: DiT(input_size=8, dim=64, depth=2, heads=2),
                lambda: {name: torch.randn(shape) for name, shape in inputs.items()})
found = plans([{"zero_degree": 3}, {"zero_degree": 3, "tp_size": 2}], work, world_size=4)
print(json.dumps([plan.parts if hasattr(plan, "parts") else repr(plan) for plan in found]))
"""


def test_a_plan_with_tensor_parallelism_holds_a_quarter_of_the_split_weights():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tools")}
    done = subprocess.run(
        [sys.executable, "-c", PLAN_TP], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    zero3, tp2 = json.loads(done.stdout.splitlines()[-1])
    assert isinstance(tp2, dict), tp2
    # ZeRO-3 over 4 ranks holds 1/4 of every weight; TP 2 x ZeRO-3 over dp 2 holds 1/4 of the blocks' split
    # weights and 1/2 of the rest (embedders, final layer, norms): more than ZeRO-3 alone, less than dp 2
    assert zero3["parameters"] < tp2["parameters"] < 2 * zero3["parameters"], (zero3, tp2)
    for parts in (zero3, tp2):  # AdamW's two states (and a 4-byte step per tensor) follow the shards
        assert 0 <= parts["optimizer state"] - 2 * parts["parameters"] < 0.01 * parts["parameters"], parts


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
