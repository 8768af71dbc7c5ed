"""Start-up: the process group, the device, the data-parallel × sequence-parallel layout and the seeds.

The world comes from torchrun's variables (``RANK``, ``WORLD_SIZE``, ...), else from a SLURM step launched by
``srun`` without torchrun (``SLURM_STEP_NUM_TASKS`` > 1: ``SLURM_PROCID``, ``SLURM_LOCALID``, the step's tasks per
node and node list; the rendezvous on the step's first node, or ``MASTER_ADDR``/``MASTER_PORT``), else it is a
world of one. An ``sbatch`` script or ``salloc`` shell is not a step: ``python train.py`` there runs alone.

World = dp × sp × tp with contiguous SP groups (``("dp", "sp")`` mesh: SP groups are rows, DP groups
columns); with ``tp_size`` > 1 (and sp 1) a ``("dp", "sp", "tp")`` mesh: TP groups contiguous and
innermost, FSDP2 shards over its ``dp`` dim, ``tensor_parallel`` splits over its ``tp`` dim. Grouped
ZeRO-3 adds a ``("replicate", "shard")`` mesh whose shard groups are contiguous blocks of
``group_size`` ranks (a node), each holding whole SP groups.

Every group LiteGen creates gets ``collective_timeout`` (torch gives new groups 30 minutes; the rendezvous keeps
torch's default, so a rank that starts late is not an error), and a backend timeout is re-raised as
``CollectiveTimeoutError`` naming the collective that hung, read from torch's flight recorder (on by default for
gloo; ``TORCH_FR_BUFFER_SIZE=0`` turns it off).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import LiteGenConfig, check_world, raise_if

logger = logging.getLogger("litegen")


@dataclass
class Runtime:
    """Where this process stands: device, world, meshes and groups."""

    device: torch.device
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    sp_size: int
    mesh: DeviceMesh  # ("dp", "sp")
    zero_mesh: (
        DeviceMesh  # what the model is sharded / replicated over: ("shard",) the world, or grouped ZeRO-3's
    )
    # ("replicate", "shard"); built here, outside any fake mode, for the planner too
    sp_splits: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup | None]]  # Ulysses degree -> its groups
    owns_process_group: bool
    frozen_mesh: DeviceMesh | None = None  # encoder.fsdp's: the world, or ("replicate", "shard") by node
    tp_size: int = 1
    node_size: int = 1  # ranks per node (LOCAL_WORLD_SIZE): grouped ZeRO-3's group, encoder.group's shards
    group_size: int | None = None  # grouped ZeRO-3's shard-group size

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The 1-D mesh of this rank's TP group, None without tensor parallelism."""
        return self.mesh["tp"] if self.tp_size > 1 else None

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("sp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within ``collective_timeout``: another rank stopped calling collectives."""


# What torch's backends say when a collective times out (gloo; NCCL's watchdog; the DETAIL debug wrapper)
_TIMEOUT_MARKERS = ("timed out", "collective operation timeout", "failed to pass monitoredbarrier")
_BACKEND_MARKERS = ("gloo", "nccl", "c10d", "processgroup", "monitoredbarrier")  # who raised it: a backend


def name_collective_timeout(
    error: BaseException, timeout: float, during: str
) -> CollectiveTimeoutError | None:
    """For a backend timeout ``error``, a ``CollectiveTimeoutError`` naming what hung; None for other errors."""
    if not isinstance(error, RuntimeError) or isinstance(error, CollectiveTimeoutError):
        return None
    message = str(error).lower()
    backend = isinstance(error, dist.DistError) or any(name in message for name in _BACKEND_MARKERS)
    if not backend or not any(marker in message for marker in _TIMEOUT_MARKERS):
        return None  # e.g. a DataLoader's "timed out" is not a collective's
    what = overdue_collective() or "a collective (torch's flight recorder has no record of it)"
    return CollectiveTimeoutError(
        f"{during}: {what} did not complete within collective_timeout={timeout:g} s: another rank stopped "
        f"calling collectives (hung, or dead without closing its connections); its log says why. "
        f"Backend error: {error}"
    )


def overdue_collective() -> str | None:
    """The last collective this thread issued that has run past its timeout, from torch's flight recorder."""
    dump = getattr(torch._C._distributed_c10d, "_dump_fr_trace_json", None)
    if dump is None:
        return None
    try:
        entries = json.loads(dump(includeCollectives=True)).get("entries", [])
    except (RuntimeError, ValueError):
        return None
    now = time.time_ns()
    overdue = [
        e for e in entries if now - e.get("time_created_ns", now) >= e.get("timeout_ms", 0) * 1_000_000
    ]
    if not overdue:
        return None
    mine = [e for e in overdue if e.get("thread_id") == str(threading.get_ident())]
    entry = (mine or overdue)[-1]
    group = (entry.get("process_group") or ["?"])[-1]
    return (
        f"{entry.get('profiling_name', 'a collective')} on process group {group!r} "
        f"(its collective #{entry.get('collective_seq_id')}, input sizes {entry.get('input_sizes')})"
    )


def _warn_about_shared_rendezvous_store() -> None:
    """torchrun's c10d rendezvous shares one store with every attempt's workers and keeps the previous
    attempt's keys, so a restarted group can read its peers' old addresses and fail to connect."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if (
        restarts > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and os.environ.get("RANK") == "0"
    ):
        logger.warning(
            "torchrun --max-restarts %d with the shared rendezvous store: a restarted group may fail to connect "
            "(the store keeps the last attempt's keys, pytorch#135712); launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so restarts resume reliably",
            restarts,
        )


@dataclass(frozen=True)
class Launch:
    """How this process was started: the launcher (torchrun, srun or none) and its place in the world."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None

    def describe(self) -> str:
        if self.launcher == "none":
            return "no launcher (neither torchrun nor a SLURM step with several tasks): a world of one"
        where = f"; rendezvous {self.master_addr}:{self.master_port}" if self.master_addr else ""
        return (
            f"launched by {self.launcher}: {self.world_size} processes, {self.local_world_size} on this node "
            f"(rank {self.rank}, local rank {self.local_rank}){where}"
        )


def detect_launch(env: Mapping[str, str]) -> Launch:
    """The launch described by ``env``: torchrun's variables first, then a SLURM step's, else a world of one."""
    if "RANK" in env and "WORLD_SIZE" in env:
        if "SLURM_STEP_NUM_TASKS" in env:
            logger.debug("torchrun's RANK/WORLD_SIZE are set: they win over the SLURM step's variables")
        world = _int_var(env, "WORLD_SIZE")
        return Launch(
            "torchrun",
            _int_var(env, "RANK"),
            world,
            _int_var(env, "LOCAL_RANK", 0),
            _int_var(env, "LOCAL_WORLD_SIZE", world),
        )
    if "SLURM_STEP_ID" not in env or _int_var(env, "SLURM_STEP_NUM_TASKS", 1) <= 1:
        return Launch("none", 0, 1, 0, 1)
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST", ""))
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), len(nodes))
    node = _int_var(env, "SLURM_NODEID", 0)
    raise_if(
        not 0 <= node < len(nodes), ValueError, f"SLURM_NODEID={node} is outside the step's node list {nodes}"
    )
    port = (
        _int_var(env, "MASTER_PORT", 0)
        or 10000 + (_int_var(env, "SLURM_JOB_ID", 0) * 31 + _int_var(env, "SLURM_STEP_ID", 0)) % 50000
    )
    return Launch(
        "srun", _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_STEP_NUM_TASKS"), _int_var(env, "SLURM_LOCALID"),
        per_node[node], env.get("MASTER_ADDR") or nodes[0], port,
    )  # fmt: skip


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    raise_if(
        value is None or not re.fullmatch(r"[0-9]+", value.strip()),
        ValueError,
        f"environment variable {name}={value!r}; allowed: a non-negative integer",
    )
    return int(value)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names: ``"a,b"``, ``"node[01-03]"``, ``"gpu[1,3-4],cpu7"``."""
    items = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)
    raise_if(
        not items,
        ValueError,
        f"SLURM_STEP_NODELIST={nodelist!r}; allowed: SLURM's host list, e.g. node[01-04]",
    )
    return [host for item in items for host in _expand_hosts(item, nodelist)]


def _expand_hosts(item: str, nodelist: str) -> list[str]:
    """One item of a host list, its bracket groups expanded (zero padding kept): ``rack[1-2]-n[01-02]``."""
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
    if match is None:
        return [item]
    prefix, ranges, rest = match.groups()
    tails = _expand_hosts(rest, nodelist) if rest else [""]
    hosts = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        raise_if(
            not re.fullmatch(r"[0-9]+", first) or not re.fullmatch(r"[0-9]*", last),
            ValueError,
            f"SLURM_STEP_NODELIST={nodelist!r}: cannot read the range {part!r}",
        )
        for number in range(int(first), int(last or first) + 1):
            hosts += [f"{prefix}{str(number).zfill(len(first))}{tail}" for tail in tails]
    return hosts


def tasks_per_node(spec: str, nodes: int) -> list[int]:
    """SLURM's tasks-per-node form -> a count per node: ``"8"``, ``"8(x2)"``, ``"2(x3),1"``."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"([0-9]+)(?:\(x([0-9]+)\))?", part.strip())
        raise_if(
            match is None,
            ValueError,
            f"SLURM_STEP_TASKS_PER_NODE={spec!r}; allowed: SLURM's form, e.g. 8(x2),4",
        )
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if len(counts) == 1 and nodes > 1:
        counts *= nodes
    raise_if(
        len(counts) != nodes,
        ValueError,
        f"SLURM_STEP_TASKS_PER_NODE={spec!r} gives {len(counts)} nodes, the node list {nodes}",
    )
    return counts


def _init_process_group(timeout: float, launch: Launch) -> bool:
    """Join the launch's world (torchrun's or a SLURM step's), or make a world of one. Returns whether we
    created the group."""
    if dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available()
    backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
    td = datetime.timedelta(seconds=timeout)
    if use_cuda:
        torch.cuda.set_device(launch.local_rank)  # 0 in a world of one
    if launch.launcher != "none":
        _warn_about_shared_rendezvous_store()
        dist.init_process_group(backend)  # the rendezvous waits for late ranks as long as torch's default
        dist.set_timeout(td)  # the collectives get collective_timeout
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=td)
    return True


def start(config: LiteGenConfig) -> Runtime:
    """Validate the config against the world, then build the process group, device and meshes."""
    launch = detect_launch(os.environ)
    if launch.launcher == "srun" and not dist.is_initialized():
        # what torchrun would have set: read by torch's env:// rendezvous, grouped ZeRO-3 and encoder.group
        os.environ.update(
            RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
            LOCAL_WORLD_SIZE=str(launch.local_world_size), MASTER_ADDR=launch.master_addr,
            MASTER_PORT=str(launch.master_port),
        )  # fmt: skip
    if not dist.is_initialized():
        check_world(config, launch.world_size, launch.local_world_size)  # every rank, before any collective
    owns = _init_process_group(config.collective_timeout, launch)
    world, rank = dist.get_world_size(), dist.get_rank()
    node = launch.local_world_size if launch.launcher != "none" else world  # a group made outside: one node
    if owns and rank == 0:
        logger.info(
            "%s; layout dp %d x sp %d x tp %d",
            launch.describe(),
            world // (config.sp_size * config.tp_size),
            config.sp_size,
            config.tp_size,
        )
    check_world(config, world, node)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in dist.get_backend()
        else torch.device("cpu")
    )
    sp, tp = config.sp_size, config.tp_size
    timeout = datetime.timedelta(seconds=config.collective_timeout)
    if tp > 1:  # TP innermost; FSDP2 shards over mesh["dp"] (config: sp 1, no group_zero)
        mesh = _mesh(device.type, (world // (sp * tp), sp, tp), ("dp", "sp", "tp"), timeout)
    else:
        mesh = _mesh(device.type, (world // sp, sp), ("dp", "sp"), timeout)
    splits = usp_meshes(device.type, world // sp, sp, config.sp_ring, timeout)
    splits[sp] = (mesh.get_group("sp"), None)
    group = config.group_size(node) if config.zero_degree == 3 else None
    world_mesh = _mesh(device.type, (world,), ("shard",), timeout)
    if tp > 1:
        zero_mesh = mesh["dp"]
    else:
        zero_mesh = grouped_mesh(device.type, group, timeout) if group is not None else world_mesh
    frozen_mesh = None  # what encoder.fsdp shards frozen modules over: the world, or each node
    if config.encoder.fsdp:
        frozen_mesh = grouped_mesh(device.type, node, timeout) if config.encoder.group else world_mesh
    if config.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(
        device=device,
        rank=rank,
        world_size=world,
        dp_rank=rank // (sp * tp),
        dp_size=world // (sp * tp),
        sp_size=sp,
        tp_size=tp,
        mesh=mesh,
        zero_mesh=zero_mesh,
        frozen_mesh=frozen_mesh,
        owns_process_group=owns,
        sp_splits=splits,
        node_size=node,
        group_size=group,
    )


def usp_meshes(device_type: str, dp: int, sp: int, ring: int | None, timeout: datetime.timedelta) -> dict:
    """For each Ulysses x Ring split of the SP groups (only ``sp / ring x ring`` when ``ring`` is set;
    pure Ulysses reuses the SP group): a ``("dp", "ring", "ulysses")`` mesh, Ulysses innermost, and its
    (Ulysses group, ring group)."""
    degrees = {sp // ring} if ring is not None else {u for u in range(1, sp + 1) if sp % u == 0}
    splits = {}
    for ulysses in sorted(degrees - {sp}):
        mesh = _mesh(device_type, (dp, sp // ulysses, ulysses), ("dp", "ring", "ulysses"), timeout)
        splits[ulysses] = (mesh.get_group("ulysses"), mesh.get_group("ring"))
    return splits


def grouped_mesh(device_type: str, group_size: int, timeout: datetime.timedelta) -> DeviceMesh:
    """``("replicate", "shard")``: shard within contiguous groups of ``group_size`` ranks, replicate across."""
    world = dist.get_world_size()
    return _mesh(device_type, (world // group_size, group_size), ("replicate", "shard"), timeout)


def _mesh(
    device_type: str, shape: tuple[int, ...], names: tuple[str, ...], timeout: datetime.timedelta
) -> DeviceMesh:
    """A named mesh whose new groups time out after ``timeout`` (torch gives new groups 30 minutes)."""
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    for name in names:
        group = mesh.get_group(name)
        if group is not dist.group.WORLD:  # the default group's was set when it was created
            dist.set_timeout(timeout, group)
    return mesh


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python and numpy (when installed) with one value."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)
