"""Scenario 18: a SLURM step launched by ``srun`` without torchrun. Two local processes given only the
variables ``srun -N1 --ntasks-per-node=2`` sets (node list ``localhost``) form one world of 2 (grouped ZeRO-3:
LOCAL_WORLD_SIZE from the step's tasks per node) and train exactly like a torchrun launch of the same config;
an ``sbatch`` script's or ``salloc`` shell's variables alone leave a world of one; torchrun's variables win."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from litegen.runtime import detect_launch, expand_nodelist, tasks_per_node
from reliability_launch import TRAINER, free_port, progress
from safetensors.torch import load_file

ARGS = (
    "--steps",
    "6",
    "--config",
    json.dumps({"zero_degree": 3, "group_zero": True, "global_batch_size": 4}),
)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def srun_task(run_dir, rank: int, port: int) -> subprocess.Popen:
    """One task of ``srun -N1 --ntasks-per-node=2 python small_trainer.py ...``: SLURM's variables only."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    env.update(
        SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
        SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODEID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
        MASTER_PORT=str(port), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / f"task{rank}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(TRAINER), "--run-dir", str(run_dir), *ARGS], stdout=log, stderr=log, env=env
    )


def test_srun_without_torchrun_forms_the_world_and_trains_like_torchrun(tmp_path, launch):
    srun, torchrun = tmp_path / "srun", tmp_path / "torchrun"
    port = free_port()
    tasks = [srun_task(srun, rank, port) for rank in (0, 1)]
    try:
        codes = [task.wait(300) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    assert codes == [0, 0], [(srun / f"task{r}.log").read_text()[-3000:] for r in (0, 1)]
    reference = launch(torchrun, *ARGS)
    assert reference.wait(300) == 0, reference.tail()
    assert {r: p["shard_group"] for r, p in progress(srun).items()} == {0: [0, 1], 1: [0, 1]}
    ours, theirs = load_file(srun / "final.safetensors"), load_file(torchrun / "final.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        ("node[01-03]", ["node01", "node02", "node03"]),
        ("gpu[1,3-4],cpu7", ["gpu1", "gpu3", "gpu4", "cpu7"]),
        ("rack[1-2]-n[09-10]", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]),
    ],
)
def test_slurm_node_lists_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_the_step_decides_the_world_and_torchrun_wins(caplog):
    step = {
        "SLURM_JOB_ID": "777", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "node[01-02]",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    }  # fmt: skip
    launch = detect_launch(step)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (
        "srun", 9, 16, 1, 8,
    )  # fmt: skip
    assert launch.master_addr == "node01" and launch.master_port == detect_launch(step).master_port
    assert 10000 <= launch.master_port < 60000
    assert detect_launch({**step, "MASTER_ADDR": "head", "MASTER_PORT": "29500"}).master_addr == "head"
    batch_script = {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "node[01-02]"}
    assert detect_launch(batch_script).world_size == 1  # sbatch / salloc: not a step, a world of one
    assert detect_launch({**step, "SLURM_STEP_NUM_TASKS": "1"}).world_size == 1  # srun --pty bash: one task
    with caplog.at_level(logging.DEBUG, logger="litegen"):
        torchrun = detect_launch(
            {**step, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
        )
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size) == ("torchrun", 3, 4)
    assert "torchrun's RANK/WORLD_SIZE are set: they win" in caplog.text
    assert tasks_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        detect_launch({**step, "SLURM_PROCID": "x"})


def test_a_task_count_the_layout_does_not_fit_fails_every_task_before_any_collective(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="3", SLURM_STEP_NODELIST="localhost",
               SLURM_STEP_TASKS_PER_NODE="3", SLURM_PROCID="0", SLURM_LOCALID="0", MASTER_PORT=str(free_port()))  # fmt: skip
    code = "from litegen import LiteGen; LiteGen({'sp_size': 2})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "sp_size=2 is not allowed; a divisor of the world size 3" in done.stderr
