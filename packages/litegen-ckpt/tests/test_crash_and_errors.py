"""Crash safety (a save killed mid-write) and bad input, in one process without a process group."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from litegen_ckpt import Checkpointer, CheckpointError
from torch import nn

SAVE_THEN_HANG = """
import sys, time
from pathlib import Path
import torch, torch.distributed as dist
import torch.distributed.checkpoint.filesystem as filesystem
from torch import nn
from litegen_ckpt import Checkpointer

root, marker, store = sys.argv[1:4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Linear(64, 64)
checkpointer = Checkpointer(root, keep=1)
checkpointer.save(1, model=model)
with torch.no_grad():
    model.weight.add_(1.0)
write_item = filesystem._write_item

def write_then_hang(*args, **kwargs):
    result = write_item(*args, **kwargs)
    Path(marker).touch()
    time.sleep(600)
    return result

filesystem._write_item = write_then_hang
checkpointer.save(2, model=model)
"""


def test_a_save_killed_mid_write_leaves_latest_on_the_previous_complete_checkpoint(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "writing"
    script = tmp_path / "save_then_hang.py"
    script.write_text(SAVE_THEN_HANG)
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), str(marker), str(tmp_path / "store")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            assert time.monotonic() < deadline, "the save never started writing"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert (root / "latest").read_text() == "step_1"
    names = sorted(os.listdir(root))  # keep=1 removed nothing; the partial save is named by its run
    assert (
        names[:2] == ["latest", "step_1"] and len(names) == 3 and re.fullmatch(r"step_2\.\w+\.tmp", names[2])
    )

    torch.manual_seed(0)
    expected = nn.Linear(64, 64)
    model = nn.Linear(64, 64)
    checkpointer = Checkpointer(root, keep=1)
    assert checkpointer.load(model=model) == 1  # continuing that run
    assert torch.equal(model.weight, expected.weight) and torch.equal(model.bias, expected.bias)

    checkpointer.save(2, model=model)  # the run's next save clears its partial directory
    # keep=1, but the step this Checkpointer loaded is never rotated away
    assert sorted(n for n in os.listdir(root) if not n.endswith(".tmp")) == ["latest", "step_1", "step_2"]
    assert not [n for n in os.listdir(root) if n.startswith("step_2.") and ".removing-" not in n]


def test_a_truncated_or_missing_file_is_named(tmp_path):
    Checkpointer(tmp_path).save(5, model=nn.Linear(8, 8))
    shard = next((tmp_path / "step_5").glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        Checkpointer(tmp_path).load(model=nn.Linear(8, 8))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        Checkpointer(tmp_path).load(step=5, model=nn.Linear(8, 8))


def test_a_garbled_file_is_named_and_fall_back_loads_the_newest_that_verifies(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model=model)
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointer.save(2, model=model)
    metadata = tmp_path / "step_2" / ".metadata"
    data = bytearray(metadata.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum sees it
    metadata.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_2/\.metadata does not match the CRC-32"):
        checkpointer.load(model=model)
    with caplog.at_level("WARNING", logger="litegen_ckpt"):
        assert checkpointer.load(fall_back=True, model=model) == 1
    assert torch.equal(model.weight, expected)
    assert [r.message for r in caplog.records if "instead of newer" in r.message] != []
    (tmp_path / "latest").write_text("step_7")
    with pytest.raises(FileNotFoundError, match="latest names 'step_7'"):
        checkpointer.load(model=model)
    for shard in tmp_path.glob("step_*/*.distcp"):
        shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        checkpointer.load(fall_back=True, model=model)
    with pytest.raises(ValueError, match="fall_back=True with step=1"):
        checkpointer.load(1, fall_back=True, model=model)


def test_bad_input_is_refused_with_the_value_and_what_is_allowed(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="root=.*is a file"):
        Checkpointer(a_file)
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(tmp_path, keep=0)
    checkpointer = Checkpointer(tmp_path / "root")
    model = nn.Linear(4, 4)
    assert checkpointer.load(model=model) is None  # nothing saved yet
    with pytest.raises(ValueError, match="step=-1"):
        checkpointer.save(-1, model=model)
    with pytest.raises(ValueError, match="step='last'.*latest"):
        checkpointer.load("last", model=model)
    with pytest.raises(TypeError, match="thing=object"):
        checkpointer.save(1, model=model, thing=object())
    with pytest.raises(TypeError, match="optimizer=.*exactly one nn.Module"):
        checkpointer.save(1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no statefuls"):
        checkpointer.save(1)

    checkpointer.save(1, model=model)
    with pytest.raises(FileNotFoundError, match=r"step=7.*complete steps: \[1\]"):
        checkpointer.load(7, model=model)
    with pytest.raises(
        ValueError, match=r"model.weight: .* shape \(4, 4\), the live tensor has shape \(3, 4\)"
    ):
        checkpointer.load(model=nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"lacks .*'ema.*it holds \['model'\]"):
        checkpointer.load(model=model, ema=nn.Linear(4, 4))


def test_rng_and_python_state_round_trip_in_one_process(tmp_path):
    class Counter:
        def __init__(self) -> None:
            self.state = {"seen": 0, "order": [3, 1, 2]}

        def state_dict(self) -> dict:
            return self.state

        def load_state_dict(self, state: dict) -> None:
            self.state = dict(state)

    counter = Counter()
    counter.state["seen"] = 17
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(0, counter=counter, rng=True)
    expected = torch.rand(3)
    restored = Counter()
    assert checkpointer.load(counter=restored, rng=True) == 0
    assert restored.state == {"seen": 17, "order": [3, 1, 2]}
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's, from its writer thread
def test_async_save_in_one_process_completes_on_wait(tmp_path):
    model = nn.Linear(16, 16)
    checkpointer = Checkpointer(tmp_path, async_save=True)
    checkpointer.save(4, model=model)
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()  # training goes on while the file is written
    checkpointer.wait()
    assert checkpointer.steps() == [4] and (tmp_path / "latest").read_text() == "step_4"
    assert checkpointer.load(model=model) == 4
    assert torch.equal(model.weight, expected)
    checkpointer.close()
