"""Scenario 9: a failure on one rank is the same clear error on every rank at once, not a peer's timeout.

Rank 0 failing to export weights, one node missing an ``init_from`` file, ranks seeing different ``latest``
pointers (a lagging shared file system), a full disk (a real size-limited tmpfs when the machine lets root
mount one, else an injected ``ENOSPC``); and only a backend's collective timeout is relabelled as one.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as filesystem
from litegen.runtime import CollectiveTimeoutError, name_collective_timeout
from litegen_ckpt import Checkpointer, CheckpointError, export_safetensors, load_safetensors
from small_trainer import Denoiser

FAST = 30  # s: every call below must end well before the harness's 60 s and gloo's 30 s timeouts


def outcome(call) -> tuple[str, str, float]:
    start = time.monotonic()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the point: which error, and how fast
        return type(error).__name__, str(error), time.monotonic() - start
    return "no error", "", time.monotonic() - start


def export_fails_on_rank_0(folder: str) -> tuple[str, str, float]:
    blocker = Path(folder) / "not_a_folder"
    if dist.get_rank() == 0:
        blocker.write_text("a file where the export wants a folder")
    dist.barrier()
    return outcome(lambda: export_safetensors(Denoiser(), blocker / "weights.safetensors"))


def init_from_missing_on_one_node(folder: str) -> tuple[str, str, float]:
    good = Path(folder) / "weights.safetensors"
    export_safetensors(Denoiser(), good)  # every rank calls it; rank 0 writes
    path = good if dist.get_rank() == 0 else Path(folder) / "node1" / "weights.safetensors"
    return outcome(lambda: load_safetensors(Denoiser(), path))


def ranks_see_different_latest(folder: str) -> int | None:
    root = Path(folder) / "ckpt"
    checkpointer = Checkpointer(root)
    for step in (1, 2):
        checkpointer.save(step, model=Denoiser())
    if dist.get_rank() == 1:  # this node's view lags: it still reads step_1 as latest
        with mock.patch("litegen_ckpt.checkpointer.latest_directory", return_value=root / "step_1"):
            return Checkpointer(root).load(model=Denoiser())
    return Checkpointer(root).load(model=Denoiser())


@pytest.mark.parametrize(
    "scenario, expected",
    [
        (export_fails_on_rank_0, ("not_a_folder", ("FileExistsError", "NotADirectoryError"))),
        (init_from_missing_on_one_node, ("node1", ("FileNotFoundError",))),
    ],
    ids=["export fails on rank 0", "init_from missing on one node"],
)
def test_a_one_rank_failure_is_the_same_error_on_every_rank_at_once(dist_pool, tmp_path, scenario, expected):
    results = dist_pool.run(scenario, str(tmp_path), world_size=2, timeout=FAST)
    (kind, message, _), _ = results
    assert results[0][:2] == results[1][:2], results
    assert kind in expected[1] and expected[0] in message, results
    assert all(seconds < FAST / 2 for _, _, seconds in results), results


def test_every_rank_loads_what_rank_0_sees_as_latest(dist_pool, tmp_path):
    assert dist_pool.run(ranks_see_different_latest, str(tmp_path), world_size=2, timeout=FAST) == [2, 2]


def test_only_a_backend_timeout_is_relabelled_as_a_collective_timeout():
    dataloader = RuntimeError("DataLoader timed out after 5 seconds")
    assert name_collective_timeout(dataloader, 10.0, "training") is None
    gloo = RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv operation"
    )
    assert isinstance(name_collective_timeout(gloo, 10.0, "training"), CollectiveTimeoutError)


def tmpfs(path: Path, size: str) -> bool:
    """Mount a size-limited tmpfs at ``path`` (root on Linux); False where the machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return mounted.returncode == 0


def save_until_full(root: Path, async_save: bool, inject: bool) -> tuple[list, str]:
    """Save a ~1.2 MB model into a 2 MB root until the disk is full; report what loads and the error."""
    torch.manual_seed(0)
    model = torch.nn.Linear(550, 550)  # 1.2 MB of fp32 weights: the second checkpoint does not fit
    checkpointer = Checkpointer(root, keep=None, async_save=async_save)
    real_write = filesystem._write_item

    def full(*args, **kwargs):  # an injected ENOSPC once the first checkpoint is complete
        if (root / "latest").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(*args, **kwargs)

    message = "no error"
    with mock.patch.object(filesystem, "_write_item", full) if inject else mock.patch.dict({}):
        try:
            for step in (1, 2):
                checkpointer.save(step, model=model)
                with torch.no_grad():
                    model.weight.add_(1.0)
            checkpointer.wait()
        except (CheckpointError, OSError) as error:
            message = str(error)
    fresh = torch.nn.Linear(550, 550)
    loaded = Checkpointer(root).load(model=fresh)
    torch.manual_seed(0)
    return [loaded, torch.equal(fresh.weight, torch.nn.Linear(550, 550).weight)], message


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_keeps_the_previous_checkpoint_latest_and_says_where(tmp_path, async_save):
    root = tmp_path / "small"
    mounted = tmpfs(root, "2m")
    try:
        (loaded, same), message = save_until_full(root / "ckpt", async_save, inject=not mounted)
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=False)
    assert (loaded, same) == (1, True)  # the first checkpoint, intact, is what loads
    assert "no space left on the device writing" in message and "bytes free" in message, message
    assert str(root / "ckpt") in message
