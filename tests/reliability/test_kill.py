"""Scenarios 1 and 2: a worker SIGKILLed mid-training, and every worker killed in the middle of a save.

1. torchrun --max-restarts 1 restarts the group after a worker is killed; auto_resume continues from the
   last checkpoint and the final weights equal an uninterrupted run's bit for bit.
2. A save interrupted by a kill leaves the previous complete checkpoint as ``latest``, and it loads: sync (all
   workers killed while writing; loaded in this process) and async (a worker killed while the background
   writer runs; the restarted group resumes from it and ends with the uninterrupted run's weights).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from litegen_ckpt import Checkpointer
from reliability_launch import progress, wait_for
from safetensors.torch import load_file
from small_trainer import Denoiser

STEPS, EVERY = 12, 4
CONFIG = {"zero_degree": 3, "auto_resume": True}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, module_launch):
    """The reference: the same training run, never interrupted (world 2, ZeRO-3, async saves off)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run = module_launch(
        run_dir, "--steps", str(STEPS), "--save-every", str(EVERY), "--config", json.dumps(CONFIG)
    )
    assert run.wait(240) == 0, run.tail()
    return load_file(run_dir / "final.safetensors")


def assert_same_weights(final: dict, reference: dict) -> None:
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(
    tmp_path, launch, uninterrupted
):
    run = launch(
        tmp_path,
        "--steps",
        str(STEPS),
        "--save-every",
        str(EVERY),
        "--config",
        json.dumps(CONFIG),
        "--stop",
        "1:6",
        max_restarts=1,
    )
    wait_for(lambda: (tmp_path / "stopped").exists(), 180, "rank 1 reaching step 6", run)
    os.kill(int((tmp_path / "stopped").read_text()), signal.SIGKILL)  # after step 6; the last save is step 4
    assert run.wait(240) == 0, run.tail()
    records = progress(tmp_path)
    assert [records[r]["started_at"] for r in (0, 1)] == [4, 4], records  # the restarted group resumed at 4
    assert all(records[r]["step"] == STEPS for r in (0, 1))
    assert_same_weights(load_file(tmp_path / "final.safetensors"), uninterrupted)


def test_a_sync_save_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path, launch):
    args = ("--steps", str(STEPS), "--save-every", str(EVERY), "--config", json.dumps(CONFIG))
    run = launch(tmp_path, *args, "--hang-in-save", "8")
    wait_for(lambda: (tmp_path / "saving").exists(), 180, "the save of step 8 writing its shards", run)
    run.kill()  # every worker and the launcher, in the middle of the save
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text() == "step_4"
    names = os.listdir(root)
    assert "step_8" not in names and [n for n in names if n.startswith("step_8.") and n.endswith(".tmp")], (
        names
    )
    model = Denoiser()
    assert Checkpointer(root).load(model=model) == 4  # one process loads the 2-rank checkpoint


def test_an_async_save_killed_midway_is_resumed_from_the_previous_checkpoint(tmp_path, launch, uninterrupted):
    """The background writer of step 8 hangs, a worker is killed; the restarted group finds step 4 latest."""
    config = {**CONFIG, "checkpoint_async": True}
    run = launch(
        tmp_path,
        "--steps",
        str(STEPS),
        "--save-every",
        str(EVERY),
        "--config",
        json.dumps(config),
        "--hang-in-save",
        "8",
        max_restarts=1,
    )
    wait_for(lambda: (tmp_path / "saving").exists(), 180, "the async save of step 8 writing its shards", run)
    os.kill(progress(tmp_path)[1]["pid"], signal.SIGKILL)
    assert run.wait(240) == 0, run.tail()
    assert [progress(tmp_path)[r]["started_at"] for r in (0, 1)] == [4, 4]
    assert_same_weights(load_file(tmp_path / "final.safetensors"), uninterrupted)
