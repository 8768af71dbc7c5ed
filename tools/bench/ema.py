"""ShardedEMA's memory per rank and update() time, against the model's fp32 size and the optimizer step.

    uv run torchrun --nproc-per-node 4 tools/bench/ema.py

For DDP (plain parameters, EMA sharded along dim 0) and ZeRO-3 (FSDP2, EMA mirrors the DTensor
shards) on a stack of MLP blocks: per-rank EMA bytes (the largest rank) over the full model's fp32
bytes, and the median update() time over the median AdamW (foreach) step time, slowest rank.
CUDA + NCCL when available, else CPU + gloo. The last two lines are the worst over the strategies.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from litegen_ema import ShardedEMA
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger("bench.ema")


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def build(strategy: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(args.dim) for _ in range(args.depth)]).to(device)
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def median_seconds(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first two warm up


def measure(strategy: str, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(largest rank's EMA bytes / full fp32 bytes, slowest rank's update time / optimizer step time)."""
    model = build(strategy, args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(args.batch, args.dim, device=device)
    model(x).square().mean().backward()  # gradients for the optimizer step
    ema = ShardedEMA(model, decay=0.9999)
    local = sum((v.to_local() if isinstance(v, DTensor) else v).nbytes for v in ema.state_dict().values())
    full = sum(p.numel() for p in model.parameters()) * 4
    step = median_seconds(optimizer.step, args.repeats, device)
    update = median_seconds(lambda: ema.update(10), args.repeats, device)
    local_max = max_over_ranks(float(local), device)
    step_max, update_max = max_over_ranks(step, device), max_over_ranks(update, device)
    logger.info(
        "%s: %.1f MiB model, EMA %.2f MiB on the largest rank (%.4f of full, 1/N = %.4f); "
        "optimizer step %.2f ms, ema.update %.2f ms (slowest rank)",
        strategy,
        full / 2**20,
        local_max / 2**20,
        local_max / full,
        1 / dist.get_world_size(),
        step_max * 1e3,
        update_max * 1e3,
    )
    return local_max / full, update_max / step_max


def max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "zero3"], choices=["ddp", "zero3"])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING, format="%(message)s")
    logger.info("world %d on %s", dist.get_world_size(), device.type)
    results = [measure(strategy, args, device) for strategy in args.strategies]
    if dist.get_rank() == 0:
        print(f"RESULT ema_bytes_per_rank_over_full={max(r[0] for r in results):.4f}")
        print(f"RESULT ema_update_over_optimizer_step={max(r[1] for r in results):.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
