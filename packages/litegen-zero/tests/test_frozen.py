"""shard_frozen(): the same output as the unsharded model, and each rank keeps only its shard at rest."""

from __future__ import annotations

import pytest
import torch
from litegen_zero import shard_frozen
from torch import nn
from torch.distributed.tensor import DTensor


class Encoder(nn.Module):
    """tokens: (batch, seq) int64 -> (batch, seq, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def make_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder().eval()


def local_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds; raises if any is not a sharded DTensor."""
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params), [type(p).__name__ for p in params]
    return sum(p.to_local().numel() * p.to_local().element_size() for p in params)


def run_frozen(configs: list[dict]) -> list[dict]:
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    reference = make_encoder()
    out = []
    for config in configs:
        dtype = config.get("dtype")
        expected_model = make_encoder().to(dtype) if dtype else reference
        with torch.no_grad():
            expected = expected_model(tokens)
        full_bytes = sum(p.numel() * p.element_size() for p in expected_model.parameters())
        model = shard_frozen(make_encoder(), **config)
        with torch.no_grad():
            got = model(tokens)
            again = model(tokens)
        out.append(
            {
                "max_error": max((got - expected).abs().max().item(), (again - expected).abs().max().item()),
                "bytes_over_full": local_bytes(model) / full_bytes,  # measured after two forwards: at rest
                "trainable": sum(p.requires_grad for p in model.parameters()),
                "dtype": got.dtype,
            }
        )
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_frozen_output_equals_unsharded_and_bytes_are_a_shard(dist_pool, world):
    configs = [{}, {"dtype": torch.bfloat16}] + ([{"group_size": 2}] if world == 4 else [])
    results = dist_pool.run(run_frozen, configs, world_size=world, timeout=120)
    for per_rank in results:
        for config, r in zip(configs, per_rank, strict=True):
            assert r["max_error"] <= 1e-6 and r["trainable"] == 0, (config, r)
            assert r["dtype"] == config.get("dtype", torch.float32)
            shards = config.get("group_size", world)
            # dim-0 shards of uneven sizes (world 3) hold at most one extra row per parameter
            assert 0.95 / shards <= r["bytes_over_full"] <= 1.1 / shards, (config, r)
    assert sum(per_rank[0]["bytes_over_full"] for per_rank in results) == pytest.approx(1.0)
