"""ShardedEMA against an fp64 EMA computed on one process, under DDP, ZeRO-1/2/3 and grouped ZeRO-3.

Every rank trains on the same batch, so each strategy trains the single-process model; the EMA that
comes back from ``full_state_dict()`` must match the reference EMA of that model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from litegen_ema import ShardedEMA
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

LR = 0.1
# two EMAs ride along every training run: a sharded warm-up one and a constant full-replica one
EMA_A = dict(decay=0.8, warmup=(2.0, 1.0), update_after_step=2)
EMA_B = dict(decay=0.7, sharded=False)
STRATEGIES = {
    1: ["ddp", "zero1", "zero2", "zero3"],
    2: ["ddp", "zero1", "zero2", "zero3"],
    3: ["ddp", "zero2", "zero3"],
    4: ["ddp", "zero1", "zero2", "zero3", "hsdp"],
}


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class Net(nn.Module):
    """A tiny DiT-like stack: a 3-row head (empty shards at world 4), a frozen parameter, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([Block(8) for _ in range(2)])
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.full((3,), 2.0), requires_grad=False)
        self.register_buffer("shift", torch.arange(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h) * self.scale + self.shift


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, emas: list[ShardedEMA], steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for ema in emas:
            ema.update(step)


def build(strategy: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same seeded Net under one strategy, built with plain torch calls."""
    torch.manual_seed(0)
    net = Net()
    world = dist.get_world_size()
    if strategy in ("ddp", "zero1"):
        model = DistributedDataParallel(net)
        if strategy == "zero1":
            return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=LR)
        return model, torch.optim.SGD(model.parameters(), lr=LR)
    if strategy == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    for block in net.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=strategy != "zero2")
    fully_shard(net, mesh=mesh, reshard_after_forward=strategy != "zero2")
    return net, torch.optim.SGD(net.parameters(), lr=LR)


def local_bytes(ema: ShardedEMA) -> int:
    return sum((v.to_local() if isinstance(v, DTensor) else v).nbytes for v in ema.state_dict().values())


def train_every_strategy(strategies: list[str], steps: int) -> dict:
    out = {}
    for strategy in strategies:
        model, optimizer = build(strategy)
        emas = [ShardedEMA(model, **EMA_A), ShardedEMA(model, **EMA_B)]
        train(model, optimizer, emas, range(1, steps + 1))
        out[strategy] = {"bytes": local_bytes(emas[0]), "full": [ema.full_state_dict() for ema in emas]}
    return out


def reference_decay(
    step: int, decay: float, warmup=None, update_after_step: int = 0, sharded: bool = True
) -> float:
    if step < update_after_step:
        return 0.0
    if warmup is None:
        return decay
    gamma, power = warmup
    return min(max(1 - (1 + (step - update_after_step) / gamma) ** -power, 0.0), decay)


def reference(steps: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """Single-process training with fp64 EMAs of EMA_A's and EMA_B's settings."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    emas = [
        {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad} for _ in "ab"
    ]
    for step in range(1, steps + 1):
        train(model, optimizer, [], range(step, step + 1))
        for ema, settings in zip(emas, [EMA_A, EMA_B], strict=True):
            d = reference_decay(step, **settings)
            for n, v in ema.items():
                ema[n] = d * v + (1 - d) * dict(model.named_parameters())[n].detach().double()
    return model, emas


def assert_matches_reference(
    full: dict[str, torch.Tensor], model: nn.Module, ema: dict[str, torch.Tensor]
) -> None:
    expected = model.state_dict()
    assert full.keys() == expected.keys()
    for name, value in full.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu", name
        if name in ema:
            error = (value.double() - ema[name]).norm() / ema[name].norm()
            assert error <= 1e-6, (name, error.item())
        else:  # buffers and frozen parameters follow the model
            assert torch.equal(value, expected[name].float()), name


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_consolidated_ema_matches_fp64_reference(dist_pool, world_size):
    steps = 5
    results = dist_pool.run(train_every_strategy, STRATEGIES[world_size], steps, world_size=world_size)
    model, ref_emas = reference(steps)
    full_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    for strategy in STRATEGIES[world_size]:
        for full, ref in zip(results[0][strategy]["full"], ref_emas, strict=True):
            assert_matches_reference(full, model, ref)
        assert all(r[strategy]["full"] == [{}, {}] for r in results[1:])  # consolidated on rank 0 only
        per_rank = [r[strategy]["bytes"] for r in results]
        replicas = 2 if strategy == "hsdp" else 1
        assert sum(per_rank) == full_bytes * replicas, (strategy, per_rank)


def save_after_training(strategy: str, path: str) -> None:
    model, optimizer = build(strategy)
    ema = ShardedEMA(model, **EMA_A)
    train(model, optimizer, [ema], range(1, 4))
    dcp.save({"model": get_model_state_dict(model), "ema": ema}, checkpoint_id=path)


def load_and_continue(strategy: str, path: str) -> dict[str, torch.Tensor]:
    model, optimizer = build(strategy)
    ema = ShardedEMA(model, **EMA_A)
    state = {"model": get_model_state_dict(model), "ema": ema}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    train(model, optimizer, [ema], range(4, 6))
    return ema.full_state_dict()


def test_checkpoint_saved_at_world_4_loads_at_world_2_and_continues(dist_pool, tmp_path):
    pairs = [("zero3", "zero3"), ("hsdp", "ddp"), ("ddp", "zero2")]  # (saved under, loaded under)
    for saved, _ in pairs:
        dist_pool.run(save_after_training, saved, str(tmp_path / saved), world_size=4)
    model, (ref_ema, _) = reference(5)
    for saved, loaded in pairs:
        full = dist_pool.run(load_and_continue, loaded, str(tmp_path / saved), world_size=2)[0]
        assert_matches_reference(full, model, ref_ema)


def local_params(model: nn.Module) -> list[torch.Tensor]:
    return [(p.to_local() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def evaluate_swapped(strategy: str) -> dict:
    model, optimizer = build(strategy)
    ema, replica = ShardedEMA(model, decay=0.5), ShardedEMA(model, decay=0.5, sharded=False)
    train(model, optimizer, [ema, replica], range(1, 3))
    x, _ = batch(0)
    before = local_params(model)
    with torch.no_grad():
        out_before = model(x)
        with replica.swapped(model):
            out_replica = model(x)
        with ema.swapped(model):
            out_ema = model(x)
        restored = local_params(model)
        out_after = model(x)
        try:
            with ema.swapped(model):
                model(x)
                raise KeyError("inside the block")
        except KeyError:
            pass
    return {
        "bit_exact": all(torch.equal(a, b) for a, b in zip(before, restored, strict=True)),
        "bit_exact_after_raise": all(
            torch.equal(a, b) for a, b in zip(before, local_params(model), strict=True)
        ),
        "same_output_after": torch.equal(out_before, out_after),
        "out_ema": out_ema,
        "out_replica": out_replica,
        "full": ema.full_state_dict(),
    }


def build_ema_then_shard() -> str:
    torch.manual_seed(0)
    net = Net()
    ema = ShardedEMA(net)
    fully_shard(net, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    with pytest.raises(RuntimeError, match="Build the EMA after sharding") as info:
        ema.update(1)
    ddp_after = Net()
    ema = ShardedEMA(ddp_after)  # DDP keeps the parameters: an EMA built before it stays valid
    ema.update(1)
    with ema.swapped(DistributedDataParallel(ddp_after)):
        pass
    return str(info.value)


def test_swapped_evaluates_with_ema_weights_and_restores_bit_exactly(dist_pool):
    for strategy in ["ddp", "zero2", "zero3"]:
        results = dist_pool.run(evaluate_swapped, strategy, world_size=3)
        for r in results:
            assert r["bit_exact"] and r["bit_exact_after_raise"] and r["same_output_after"], (strategy, r)
        reference_model = Net()
        reference_model.load_state_dict(results[0]["full"])
        with torch.no_grad():
            expected = reference_model(batch(0)[0])
        for r in results:
            torch.testing.assert_close(r["out_ema"], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["out_replica"], expected, rtol=1e-5, atol=1e-6)
    messages = dist_pool.run(build_ema_then_shard, world_size=3)
    assert "parameters are not the ones this EMA was built from" in messages[0]


def test_warmup_schedule_matches_the_formula():
    ema = ShardedEMA(nn.Linear(2, 2), decay=0.9999, warmup=(1.0, 2 / 3))
    assert ema.decay_at(0) == 0.0
    assert math.isclose(ema.decay_at(1), 1 - 2 ** (-2 / 3), rel_tol=1e-12)
    assert math.isclose(ema.decay_at(10), 1 - 11 ** (-2 / 3), rel_tol=1e-12)
    assert ema.decay_at(10**9) == 0.9999  # clamped
    late = ShardedEMA(nn.Linear(2, 2), decay=0.99, warmup=(10.0, 1.0), update_after_step=5)
    assert [late.decay_at(s) for s in (0, 4, 5)] == [0.0, 0.0, 0.0]
    assert math.isclose(late.decay_at(15), 0.5, rel_tol=1e-12)
    constant = ShardedEMA(nn.Linear(2, 2), decay=0.9)
    assert [constant.decay_at(s) for s in (0, 1, 1000)] == [0.9, 0.9, 0.9]


def test_single_process_update_swap_and_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    net = Net()
    net.blocks[0] = checkpoint_wrapper(net.blocks[0])
    ema = ShardedEMA(net, decay=0.5)
    assert "blocks.0.fc.weight" in ema.state_dict()
    compiled = (
        nn.Module()
    )  # torch.compile's OptimizedModule holds the model as `_orig_mod` (importing dynamo is slow)
    compiled._orig_mod = net
    assert set(ShardedEMA(compiled).state_dict()) == set(ema.state_dict())
    # the EMA's private name cleaning (no cross-package import) gives torch's names, which litegen_zero's
    # full_state_dict and litegen_ckpt's export use: the same few lines, tested against each other
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = set(get_model_state_dict(net))
    assert set(ema.state_dict()) <= names and "blocks.0.fc.weight" in names
    assert set(ema.full_state_dict()) == names
    original = net.head.weight.detach().clone()
    with torch.no_grad():
        net.head.weight.add_(1.0)
    ema.update(1)
    torch.testing.assert_close(ema.state_dict()["head.weight"], original + 0.5)
    with ema.swapped(net):
        assert torch.equal(net.head.weight, ema.state_dict()["head.weight"])
    assert torch.equal(net.head.weight, original + 1.0)
    full = ema.full_state_dict()
    assert set(full) == set(Net().state_dict())
    fp64 = ShardedEMA(net, decay=0.5, dtype=torch.float64, update_after_step=2)
    fp64.update(1)  # copies
    assert torch.equal(fp64.state_dict()["head.weight"], net.head.weight.double())
    with torch.no_grad():
        net.head.weight.add_(2.0)
    fp64.update(2)  # averages
    torch.testing.assert_close(fp64.state_dict()["head.weight"], (original + 2.0).double())
    ema.load_state_dict({k: v for k, v in full.items() if k in ema.state_dict()})
    ema.load_state_dict(full, strict=False)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(decay=1.5), ValueError, "decay=1.5"),
        (dict(decay=-0.1), ValueError, "decay=-0.1"),
        (dict(decay=float("nan")), ValueError, "decay=nan"),
        (dict(decay=True), ValueError, "decay=True"),
        (dict(warmup=(0.0, 1.0)), ValueError, "warmup=(0.0, 1.0)"),
        (dict(warmup=1.0), ValueError, "gamma, power"),
        (dict(update_after_step=-1), ValueError, "update_after_step=-1"),
        (dict(dtype=torch.int64), TypeError, "dtype=torch.int64"),
        (dict(sharded="yes"), TypeError, "sharded='yes'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    with pytest.raises(error, match="allowed") as info:
        ShardedEMA(nn.Linear(2, 2), **kwargs)
    assert words in str(info.value)


def test_bad_models_and_state_dicts():
    with pytest.raises(TypeError, match="nn.Module"):
        ShardedEMA({"w": torch.zeros(2)})
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        ShardedEMA(frozen)
    ema = ShardedEMA(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="step='3'"):
        ema.update("3")
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        ema.load_state_dict({"weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"shape \(3, 2\); allowed: \(2, 2\)"):
        ema.load_state_dict({"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not the ones this EMA was built from"):  # a bad argument (issue 10)
        with ema.swapped(other):
            pass
