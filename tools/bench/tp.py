"""Tensor parallelism × ZeRO-3 on the demo DiT: parameter bytes per rank and step time.

    uv run torchrun --nproc-per-node 4 tools/bench/tp.py

1. Parameter bytes per rank of tp 2 x dp 2 (``litegen_zero.tensor_parallel`` on a ("dp", "tp") mesh, then
   ``shard(degree=3)`` over its dp dim) over the ideal full / (tp x dp). Layers TP leaves replicated (the
   root's embeddings and adaLN, norms) are sharded over dp only, so the ratio is above 1 by their share.
2. Median step time of tp 2 x dp 2 over ZeRO-3 over all 4 ranks on the same model and global batch,
   measured in alternating steps of the same run (on CPU gloo this is a communication count, not a speed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (dit.py)

import litegen_zero  # noqa: E402
from dit import DiT  # noqa: E402


def make(args: argparse.Namespace) -> tuple[DiT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = DiT(
        in_channels=4, input_size=16, patch_size=2, dim=args.dim, depth=args.depth, heads=8, text_dim=64
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def batch(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 4, 16, 16, generator=g),
        torch.rand(n, generator=g),
        torch.randn(n, 8, 64, generator=g),
        torch.randn(n, 4, 16, 16, generator=g),
    )


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: tuple[torch.Tensor, ...]) -> float:
    """One timed training step (seconds), starting together on all ranks."""
    x, t, text, target = data
    dist.barrier()
    start = time.perf_counter()
    F.mse_loss(model(x, t, text), target).backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def param_bytes(model: torch.nn.Module) -> int:
    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())
    return sum(p.numel() * p.element_size() for p in local)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each layout")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, dp = 2, world // 2
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))

    model, opt = make(args)
    full = param_bytes(model)
    litegen_zero.tensor_parallel(model, mesh["tp"], optimizer=opt)
    tp_model, tp_opt = litegen_zero.shard(model, opt, degree=3, mesh=mesh["dp"])
    zero_model, zero_opt = litegen_zero.shard(*make(args), degree=3)

    measured = torch.tensor(float(param_bytes(tp_model)))
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    ratio = measured.item() / (full / world)
    tp_data = batch(args.batch, 0)
    per_dp, per_rank = args.batch // dp, args.batch // world
    tp_part = tuple(v[mesh.get_local_rank("dp") * per_dp :][:per_dp] for v in tp_data)
    zero_part = tuple(v[rank * per_rank :][:per_rank] for v in tp_data)
    for _ in range(2):  # warm-up
        step(tp_model, tp_opt, tp_part), step(zero_model, zero_opt, zero_part)
    times: dict[str, list[float]] = {"tp": [], "zero": []}
    for i in range(args.steps):  # alternate which goes first, so drift in machine load hits both
        order = [("tp", tp_model, tp_opt, tp_part), ("zero", zero_model, zero_opt, zero_part)][
            :: 1 if i % 2 else -1
        ]
        for key, m, o, data in order:
            times[key].append(step(m, o, data))
    tp_t, zero_t = statistics.median(times["tp"]), statistics.median(times["zero"])
    if rank == 0:
        print(
            f"\nDiT dim {args.dim}, depth {args.depth}: {full / 2**20:.2f} MiB of fp32 parameters, world {world} "
            f"(cpu gloo), global batch {args.batch}, median of {args.steps} steps\n"
            f"tp {tp} x dp {dp}: {measured.item() / 2**20:.3f} MiB parameters per rank, ideal "
            f"{full / world / 2**20:.3f} MiB (full / (tp x dp))\n"
            f"step time: tp {tp} x dp {dp} {tp_t * 1e3:.1f} ms, ZeRO-3 dp {world} {zero_t * 1e3:.1f} ms"
        )
        print(f"RESULT tp_param_bytes_over_theory={ratio:.4f}")
        print(f"RESULT tp2_dp2_over_zero3_step_time={tp_t / zero_t:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
