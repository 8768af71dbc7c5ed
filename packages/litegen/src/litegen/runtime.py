"""Start-up: the process group, the device, the data-parallel × sequence-parallel layout and the seeds.

World = dp × sp with contiguous SP groups (``("dp", "sp")`` mesh: SP groups are rows, DP groups
columns). Grouped ZeRO-3 adds a ``("replicate", "shard")`` mesh whose shard groups are contiguous
blocks of ``group_size`` ranks (a node), each holding whole SP groups.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import LiteGenConfig, check_world

logger = logging.getLogger("litegen")


@dataclass
class Runtime:
    """Where this process stands: device, world, meshes and groups."""

    device: torch.device
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    mesh: DeviceMesh  # ("dp", "sp")
    zero_mesh: DeviceMesh | None  # ("replicate", "shard") for grouped ZeRO-3, else None (whole world)
    owns_process_group: bool

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("sp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_process_group(timeout: float) -> bool:
    """Join torchrun's world (env), or make a world of one. Returns whether we created the group."""
    if dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available()
    backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
    td = datetime.timedelta(seconds=timeout)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=td)
    else:
        if use_cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=td)
    return True


def start(config: LiteGenConfig) -> Runtime:
    """Validate the config against the world, then build the process group, device and meshes."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        check_world(config, int(os.environ["WORLD_SIZE"]))  # every rank, before any collective
    owns = _init_process_group(config.collective_timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_world(config, world)
    if "nccl" in str(dist.get_backend()):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    sp = config.sp_size
    mesh = init_device_mesh(device.type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    zero_mesh = None
    group = config.group_size if config.zero_degree == 3 else None
    if group is not None:
        zero_mesh = init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))
    if config.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(
        device=device, rank=rank, world_size=world, dp_rank=rank // sp, dp_size=world // sp,
        sp_rank=rank % sp, sp_size=sp, mesh=mesh, zero_mesh=zero_mesh, owns_process_group=owns,
    )


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python and numpy (when installed) with one value."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)
