"""Bad input: a ValueError / TypeError naming the value and what is allowed, on every rank, before any collective."""

from __future__ import annotations

import torch
import torch.distributed as dist
from litegen_zero import shard, shard_frozen
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters())


def bad_calls() -> list[str]:
    """Each bad call's error as 'Type: message'; a last good call proves no rank is left inside a collective."""
    model = Net()
    frozen = Net().requires_grad_(False)
    outsider = torch.optim.AdamW(list(model.parameters()) + [nn.Parameter(torch.zeros(3, 5))])
    calls = [
        lambda: shard(model, adamw(model), degree=4),
        lambda: shard(model, adamw(model), degree=True),
        lambda: shard(model, adamw(model), degree=3, group_size=3),
        lambda: shard(model, adamw(model), degree=2, group_size=2),
        lambda: shard(model, adamw(model), degree=3, mesh="rows"),
        lambda: shard(frozen, adamw(model), degree=0),
        lambda: shard(model, outsider, degree=1),
        lambda: shard(model, adamw(model), degree=2, offload=True),
        lambda: shard(model, adamw(model), degree=0, param_dtype=torch.bfloat16),
        lambda: shard(model, adamw(model), degree=3, reduce_dtype="int8"),
        lambda: shard(model, adamw(model), degree=3, blocks=[nn.Conv2d]),
        lambda: shard(model, "adamw", degree=0),
        lambda: shard(model, torch.optim.Adafactor(model.parameters()), degree=3),
        lambda: shard_frozen(frozen, group_size=0),
    ]
    errors = []
    for call in calls:
        try:
            call()
            errors.append("no error")
        except (ValueError, TypeError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    shard(model, adamw(model), degree=3)
    t = torch.ones(1)
    dist.all_reduce(t)
    return errors + [t.item()]


def test_bad_input_fails_clearly_on_every_rank(dist_pool):
    results = dist_pool.run(bad_calls, world_size=2)
    assert results[0] == results[1]
    *errors, total = results[0]
    assert total == 2.0
    expected = [
        ("ValueError", "degree=4", "allowed: 0 (DDP)"),
        ("ValueError", "degree=True", "allowed: 0 (DDP)"),
        ("ValueError", "group_size=3", "allowed: [1, 2]"),
        ("ValueError", "group_size=2 with degree=2", "needs degree=3"),
        ("TypeError", "mesh='rows'", "DeviceMesh"),
        ("ValueError", "no trainable parameter", "Net"),
        ("ValueError", "not in the model", "(3, 5)"),
        ("ValueError", "offload=True with degree=2", "True with degree=3"),
        ("ValueError", "param_dtype=torch.bfloat16 with degree=0", "degree 2 or 3"),
        ("ValueError", "reduce_dtype='int8'", "'bf16'"),
        ("ValueError", "Conv2d", "allowed: nn.Module subclasses"),
        ("TypeError", "optimizer='adamw'", "factory"),
        ("ValueError", "Adafactor with degree=3", "allowed: degree 0 or 1"),
        ("ValueError", "group_size=0", "allowed: [1, 2]"),
    ]
    assert len(errors) == len(expected)
    for error, (kind, *parts) in zip(errors, expected, strict=True):
        assert error.startswith(kind) and all(p in error for p in parts), (error, parts)
