"""Checkpointer under real gloo worlds: resume equivalence per degree, resharding, async save and rotation.

Degrees are built with plain torch: 0 DDP, 1 DDP + ZeroRedundancyOptimizer, 2 FSDP2 without reshard after
forward, 3 FSDP2, "grouped" FSDP2 on a ("replicate", "shard") mesh (HSDP).
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time

import numpy
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen_ckpt import Checkpointer
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

LR, WEIGHT_DECAY, GLOBAL_BATCH = 1e-2, 0.1, 12
TIMEOUT = 240  # seconds per harness call: generous for a loaded machine


class Block(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(F.gelu(self.linear(x)))


class Net(nn.Module):
    """Uneven shards at worlds 3 and 4 (10 rows, 2 rows), a buffer, repeated blocks."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.blocks = nn.ModuleList(Block(10, dropout) for _ in range(2))
        self.head = nn.Linear(10, 2)
        self.register_buffer("scale", torch.tensor([1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h) * self.scale


class TinyEMA:
    """Shadow copies of the (possibly sharded) parameters, keyed by FQN, like a sharded EMA."""

    def __init__(self, net: nn.Module, decay: float = 0.5) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in net.named_parameters()}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for name, p in net.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)

    def full_state_dict(self) -> dict:
        return {n: t.full_tensor() if isinstance(t, DTensor) else t.clone() for n, t in self.shadow.items()}


class Sampler:
    def __init__(self) -> None:
        self.epoch, self.index = 0, 0

    def advance(self) -> None:
        self.index += 4
        if self.index >= 10:
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def param_groups(named) -> list[dict]:
    named = list(named)
    return [
        {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def build(degree, *, seed: int, dropout: float = 0.0):
    """(model, optimizer, ema, net): ``net`` is the unwrapped module whose parameters the EMA follows."""
    torch.manual_seed(seed)
    net = Net(dropout)
    if degree in (0, 1):
        # never rebuild buckets, so the all-reduce order (and so every bit) is the same in each run
        model = DistributedDataParallel(net, find_unused_parameters=True)
        if degree == 1:
            optimizer = ZeroRedundancyOptimizer(
                param_groups(model.named_parameters()), optimizer_class=torch.optim.AdamW, lr=LR
            )
        else:
            optimizer = torch.optim.AdamW(param_groups(model.named_parameters()), lr=LR)
        return model, optimizer, TinyEMA(net), net
    world = dist.get_world_size()
    if degree == "grouped":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    for block in net.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=degree != 2)
    fully_shard(net, mesh=mesh, reshard_after_forward=degree != 2)
    return net, torch.optim.AdamW(param_groups(net.named_parameters()), lr=LR), TinyEMA(net), net


def rank_local_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank data from every RNG a trainer touches (torch, python, numpy)."""
    x = torch.randn(3, 6)
    y = torch.randn(3, 2) * random.random() + float(numpy.random.rand())
    return x, y


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a global batch that depends only on the step (any world size)."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 2, generator=g)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    n = GLOBAL_BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def train(model, optimizer, ema, net, steps, batch=global_batch, sampler=None) -> None:
    for step in steps:
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(net)
        if sampler is not None:
            sampler.advance()


def local_state(model, optimizer, ema, sampler) -> dict:
    """Everything this rank holds, as plain local tensors / values."""

    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    osd = inner.state_dict()
    return {
        "model": {k: local(v) for k, v in model.state_dict().items()},
        "optimizer": {f"{i}.{k}": local(v) for i, s in osd["state"].items() for k, v in s.items()},
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]],
        "ema": {k: local(v) for k, v in ema.state_dict().items()},
        "sampler": sampler.state_dict(),
    }


def differences(a: dict, b: dict) -> list[str]:
    out = []
    for part in a:
        if isinstance(a[part], dict):
            if a[part].keys() != b[part].keys():
                out.append(f"{part}: keys {sorted(a[part])} != {sorted(b[part])}")
            out += [f"{part}.{k}" for k in a[part] if k in b[part] and not _same(a[part][k], b[part][k])]
        elif a[part] != b[part]:
            out.append(part)
    return out


def _same(x, y) -> bool:
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def seed_rngs() -> None:
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    random.seed(rank)
    numpy.random.seed(rank)


def resume_matches_straight(degree, root: str) -> tuple[int | None, list[str]]:
    model, optimizer, ema, net = build(degree, seed=0, dropout=0.1)
    sampler = Sampler()
    seed_rngs()
    train(model, optimizer, ema, net, range(6), rank_local_batch, sampler)
    straight = local_state(model, optimizer, ema, sampler)

    model, optimizer, ema, net = build(degree, seed=0, dropout=0.1)
    sampler = Sampler()
    seed_rngs()
    train(model, optimizer, ema, net, range(3), rank_local_batch, sampler)
    checkpointer = Checkpointer(root)
    checkpointer.save(3, model=model, optimizer=optimizer, ema=ema, sampler=sampler, rng=True)

    torch.manual_seed(999)
    model, optimizer, ema, net = build(degree, seed=1, dropout=0.1)
    sampler = Sampler()
    step = checkpointer.load(model=model, optimizer=optimizer, ema=ema, sampler=sampler, rng=True)
    train(model, optimizer, ema, net, range(3, 6), rank_local_batch, sampler)
    return step, differences(straight, local_state(model, optimizer, ema, sampler))


@pytest.mark.parametrize("degree", [0, 1, 2, 3, "grouped"])
def test_resume_is_bitwise_identical_to_straight_training(dist_pool, tmp_path, degree):
    results = dist_pool.run(resume_matches_straight, degree, str(tmp_path), world_size=4, timeout=TIMEOUT)
    assert [step for step, _ in results] == [3] * 4
    assert [diff for _, diff in results] == [[]] * 4


def save_after_three_steps(degree, root: str) -> None:
    model, optimizer, ema, net = build(degree, seed=0)
    train(model, optimizer, ema, net, range(3))
    Checkpointer(root).save(3, model=model, optimizer=optimizer, ema=ema)


def resume_and_finish(degree, root: str) -> tuple[int | None, dict, dict]:
    model, optimizer, ema, net = build(degree, seed=1)
    step = Checkpointer(root).load(model=model, optimizer=optimizer, ema=ema)
    train(model, optimizer, ema, net, range(3, 6))
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    ema_weights = ema.full_state_dict()
    return (step, weights, ema_weights) if dist.get_rank() == 0 else (step, {}, {})


def reference() -> tuple[dict, dict]:
    """Six steps in one process on the whole global batch."""
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.AdamW(param_groups(net.named_parameters()), lr=LR)
    ema = TinyEMA(net)
    train(net, optimizer, ema, net, range(6))
    return net.state_dict(), ema.full_state_dict()


@pytest.fixture(scope="module")
def world4_checkpoints(dist_pool, tmp_path_factory) -> dict[str, str]:
    roots = {}
    for degree in [3, 1]:
        roots[degree] = str(tmp_path_factory.mktemp(f"saved_degree{degree}"))
        dist_pool.run(save_after_three_steps, degree, roots[degree], world_size=4, timeout=TIMEOUT)
    return roots


@pytest.mark.parametrize(
    "world_size, saved_degree, degree",
    [(2, 3, 2), (2, 1, 3), (3, 3, 0), (3, 3, 1), (3, 1, 2)],
)
def test_resharded_resume_matches_the_reference(
    dist_pool, world4_checkpoints, world_size, saved_degree, degree
):
    results = dist_pool.run(
        resume_and_finish, degree, world4_checkpoints[saved_degree], world_size=world_size, timeout=TIMEOUT
    )
    step, weights, ema_weights = results[0]
    assert [r[0] for r in results] == [3] * world_size
    expected_weights, expected_ema = reference()
    assert weights.keys() == expected_weights.keys()
    for key in expected_weights:
        torch.testing.assert_close(weights[key], expected_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in expected_ema:
        torch.testing.assert_close(ema_weights[key], expected_ema[key], rtol=1e-5, atol=1e-6, msg=key)


def async_save_snapshot_and_rotate(root: str) -> tuple[list[str], int | None, list[str]]:
    model, optimizer, ema, net = build(3, seed=0)
    checkpointer = Checkpointer(root, keep=2, async_save=True)
    for step in range(1, 4):
        train(model, optimizer, ema, net, range(step - 1, step))
        snapshot = {k: v.to_local().clone() for k, v in model.state_dict().items() if isinstance(v, DTensor)}
        checkpointer.save(step, model=model, optimizer=optimizer)
        train(model, optimizer, ema, net, range(10, 11))  # changes the weights while the save is written
    checkpointer.wait()
    listing = sorted(n for n in os.listdir(root) if not n.endswith(".tmp"))  # minus those being deleted
    model, optimizer, ema, net = build(3, seed=1)
    step = checkpointer.load(model=model, optimizer=optimizer)
    checkpointer.close()
    loaded = model.state_dict()
    return listing, step, [k for k, v in snapshot.items() if not torch.equal(loaded[k].to_local(), v)]


def test_async_save_writes_the_state_at_save_time_and_keeps_the_newest(dist_pool, tmp_path):
    results = dist_pool.run(async_save_snapshot_and_rotate, str(tmp_path), world_size=3, timeout=TIMEOUT)
    assert results == [(["latest", "step_2", "step_3"], 3, [])] * 3
    assert (tmp_path / "latest").read_text() == "step_3"


def complete_steps(root) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())


def test_a_second_run_cannot_save_into_a_root_another_run_uses(tmp_path):
    first = Checkpointer(tmp_path, keep=2)
    first.save(1, model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(steps \[1\]"):
        Checkpointer(tmp_path).save(5, model=nn.Linear(2, 2))
    first.save(2, model=nn.Linear(2, 2))  # the first run goes on, untouched
    assert complete_steps(tmp_path) == [1, 2] and (tmp_path / "latest").read_text() == "step_2"
    resumed = Checkpointer(tmp_path, keep=2)  # a Checkpointer that loads continues that run
    assert resumed.load(model=nn.Linear(2, 2)) == 2
    resumed.save(3, model=nn.Linear(2, 2))
    assert complete_steps(tmp_path) == [2, 3]


def test_rotation_keeps_the_highest_steps_and_the_loaded_one_and_a_rewind_retires_later_steps(tmp_path):
    run = Checkpointer(tmp_path, keep=2)
    for step in (2, 4, 6, 8):
        run.save(step, model=nn.Linear(2, 2))
    assert complete_steps(tmp_path) == [6, 8]
    rewound = Checkpointer(tmp_path, keep=1)
    assert rewound.load(6, model=nn.Linear(2, 2)) == 6  # rewind: load step 6 while 8 exists
    rewound.save(7, model=nn.Linear(2, 2))  # retires the abandoned step 8, keeps the loaded 6
    assert complete_steps(tmp_path) == [6, 7] and (tmp_path / "latest").read_text() == "step_7"
    (tmp_path / "step_7" / "litegen.json").write_text("{garbled")  # fall-back can only go back, never to 8
    assert Checkpointer(tmp_path).load(model=nn.Linear(2, 2), fall_back=True) == 6


def test_close_waits_for_the_deletion_of_rotated_checkpoints(tmp_path, monkeypatch):
    rmtree = shutil.rmtree

    def slow_rmtree(path, **kwargs) -> None:  # deleting GBs takes a while
        time.sleep(0.3)
        rmtree(path, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    threads = set(threading.enumerate())
    run = Checkpointer(tmp_path, keep=1)
    for step in range(3):
        run.save(step, model=nn.Linear(2, 2))
    run.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2"]
    assert set(threading.enumerate()) <= threads
