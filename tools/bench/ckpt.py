"""Checkpoint I/O: save / load throughput of a sharded ~1 GB model state vs plain safetensors, async blocking.

    uv run torchrun --nproc-per-node 2 tools/bench/ckpt.py [--gib 1.0] [--dir /tmp]

The model is a stack of fp32 DiT-block-shaped layers (width 1152, as DiT-XL/2) sharded with FSDP2 over the
ranks (built on the meta device, so no rank ever holds it whole). ``Checkpointer.save`` / ``load`` move the whole
state; the reference writes and reads the same bytes (tensors of the same shapes) with
``safetensors.torch.save_file`` / ``load_file`` from rank 0 alone, in the same run and the same directory
(``load_file`` maps the file lazily, so the plain load also copies into tensors, as loading into a model does).
Each timing is the best of ``--repeats``, the measurements interleaved, each after ``os.sync()`` (no writeback of
an earlier one's files runs during it). The async figure is the time ``save()`` blocks the training loop (steady
state: the first save, which allocates the CPU staging copy, is reported apart) over the synchronous save time;
the background write overlaps a stand-in for training compute.

Two more lines put the load in context. ``load_speedup_over_dcp_reader`` loads the same checkpoint into the same
model with DCP's own ``FileSystemReader``, which checks nothing. ``load_floor_over_plain`` has each rank read its
own shard file into tensors allocated as its parameter shards, with no checkpoint logic: what two ranks' reads
can reach on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from litegen_ckpt import Checkpointer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


class DiTBlock(nn.Module):
    """The parameter shapes of a DiT block of width ``d`` (attention, MLP x4, adaLN x6)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ada_ln = nn.Linear(d, 6 * d)


def sharded_model(gib: float, width: int) -> tuple[nn.Module, list[torch.Size]]:
    block_bytes = sum(p.numel() * 4 for p in DiTBlock(width).parameters())
    with torch.device("meta"):
        model = nn.Sequential(*(DiTBlock(width) for _ in range(max(1, round(gib * 2**30 / block_bytes)))))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_()
    return model, [p.shape for p in model.parameters()]


def timed(fn) -> float:
    os.sync()  # no writeback of an earlier measurement's files runs during this one
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def read_into(tensors: dict[str, torch.Tensor], path: str) -> None:
    """``load_file`` maps the file lazily: copying into the live tensors is what reads the bytes."""
    for key, value in load_file(path).items():
        tensors[key].copy_(value)


def read_own_shards(directory: str, rank: int, destinations: list[torch.Tensor]) -> None:
    """Each rank reads its shard file's bytes into tensors shaped as its parameter shards, with no checkpoint logic.

    One ``readinto`` per destination. This is what two ranks' reads can reach on this machine.
    """
    with open(os.path.join(directory, f"__{rank}_0.distcp"), "rb", buffering=0) as f:
        for destination in destinations:
            view, done = memoryview(destination.view(-1).view(torch.uint8).numpy()), 0
            while done < len(view):
                done += f.readinto(view[done:]) or len(view)  # a shorter file only shortens the floor


def stand_in_for_training(seconds: float) -> None:
    a = torch.randn(512, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="model state size in GiB")
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary files go")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    work = [tempfile.mkdtemp(prefix="litegen-bench-ckpt-", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(work)
    work = work[0]
    try:
        model, shapes = sharded_model(args.gib, args.width)
        nbytes = sum(s.numel() * 4 for s in shapes)
        gb = nbytes / 1e9

        checkpointer = Checkpointer(os.path.join(work, "sync"), keep=1)
        plain_path = os.path.join(work, "plain.safetensors")
        tensors = {f"{i}.weight": torch.randn(s) for i, s in enumerate(shapes)} if rank == 0 else {}
        times: dict[str, list[float]] = {
            "save": [],
            "plain_save": [],
            "load": [],
            "plain_load": [],
            "floor": [],
            "dcp_load": [],
        }
        shards = [torch.ones_like(p.to_local()) for p in model.parameters()]  # allocated as the model's are
        for step in range(args.repeats):  # interleaved, so a busy machine slows both sides alike
            times["save"].append(timed(functools.partial(checkpointer.save, step, model=model)))
            times["plain_save"].append(timed(lambda: rank == 0 and save_file(tensors, plain_path)))
            times["load"].append(timed(lambda: checkpointer.load(model=model)))
            times["plain_load"].append(timed(lambda: rank == 0 and read_into(tensors, plain_path)))
            latest = os.path.join(checkpointer.root, (checkpointer.root / "latest").read_text())
            times["floor"].append(timed(functools.partial(read_own_shards, latest, rank, shards)))
            # the same checkpoint through DCP's own FileSystemReader (no checksums), into the same model
            state = {"model": get_model_state_dict(model)}
            times["dcp_load"].append(timed(functools.partial(dcp.load, state, checkpoint_id=latest)))
        tensors.clear()
        shards.clear()
        save_s, plain_save_s, load_s, plain_load_s, floor_s, dcp_load_s = (min(times[k]) for k in times)

        async_checkpointer = Checkpointer(os.path.join(work, "async"), keep=1, async_save=True)
        blocked = []
        for i in range(5):
            dist.barrier()
            start = time.perf_counter()
            async_checkpointer.save(i, model=model)
            blocked.append(time.perf_counter() - start)
            stand_in_for_training(6 * save_s)  # checkpoints are far apart: the last write is done
        async_checkpointer.close()
        blocked_t = torch.tensor(blocked)
        dist.all_reduce(blocked_t, op=dist.ReduceOp.MAX)  # the slowest rank blocks the step
        steady = blocked_t[1:].median().item()

        if rank == 0:
            print(
                f"model state {gb:.3f} GB ({len(shapes)} fp32 tensors, largest {max(shapes, key=torch.Size.numel)}), FSDP2 over {world} ranks"
            )
            print(
                f"Checkpointer.save  {save_s:6.3f} s  {gb / save_s:6.2f} GB/s   plain save_file {plain_save_s:6.3f} s  {gb / plain_save_s:6.2f} GB/s"
            )
            print(
                f"Checkpointer.load  {load_s:6.3f} s  {gb / load_s:6.2f} GB/s   plain load_file {plain_load_s:6.3f} s  {gb / plain_load_s:6.2f} GB/s"
            )
            print(
                f"the same checkpoint through DCP's FileSystemReader: {dcp_load_s:6.3f} s  {gb / dcp_load_s:6.2f} GB/s"
            )
            print(
                f"each rank reading its shard file into tensors, no checkpoint logic: {floor_s:6.3f} s  {gb / floor_s:6.2f} GB/s"
            )
            print(
                f"async save blocks  first {blocked_t[0].item():.3f} s (allocates the CPU copy), then (median) {steady:.3f} s"
            )
            print(f"RESULT save_throughput_over_plain={plain_save_s / save_s:.3f}")
            print(f"RESULT load_throughput_over_plain={plain_load_s / load_s:.3f}")
            print(f"RESULT async_save_blocking_fraction={steady / save_s:.3f}")
            print(f"RESULT load_speedup_over_dcp_reader={dcp_load_s / load_s:.3f}")
            print(f"RESULT load_floor_over_plain={plain_load_s / floor_s:.3f}")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
