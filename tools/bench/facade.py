"""The facade's overhead and its activation checkpointing, measured.

    uv run torchrun --nproc-per-node 2 tools/bench/facade.py

1. Step time of a DiT set up by ``LiteGen.initialize()`` (ZeRO-3) vs the same setup composed by hand
   from ``litegen_zero.shard`` in the same run, interleaved, median of many steps.
2. Bytes of activations saved for backward per step at selective ratios 1.0 (no checkpointing), 0.5
   and 0.0 (every block), counted with ``saved_tensors_hooks`` (unique storages, parameters excluded).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (dit.py)

import litegen_zero  # noqa: E402
from dit import DiT  # noqa: E402
from litegen import LiteGen  # noqa: E402


def make(seed: int = 0) -> tuple[DiT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = DiT(in_channels=4, input_size=16, patch_size=2, dim=192, depth=6, heads=6, text_dim=64)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def batch(n: int) -> tuple[torch.Tensor, ...]:
    return torch.randn(n, 4, 16, 16), torch.rand(n), torch.randn(n, 8, 64), torch.randn(n, 4, 16, 16)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, ...]) -> None:
    x, t, text, target = data
    F.mse_loss(model(x, t, text), target).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def median_step_time(model, opt, data, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step(model, opt, data)
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        step(model, opt, data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_activation_bytes(model: torch.nn.Module, data: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the unique tensors autograd saves during one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x, t, text, target = data
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.mse_loss(model(x, t, text), target)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # ours: each LiteGen below joins it and frees only its own groups

    gen = LiteGen({"zero_degree": 3, "global_batch_size": args.batch, "log_level": "WARNING"})
    facade_model, facade_opt = gen.initialize(*make())
    hand_model, hand_opt = litegen_zero.shard(*make(), degree=3)
    data = batch(args.batch // gen.runtime.dp_size)
    times = {"facade": [], "by_hand": []}
    for _ in range(args.rounds):  # interleaved so load changes hit both alike
        times["facade"].append(median_step_time(facade_model, facade_opt, data, args.warmup, args.iters))
        times["by_hand"].append(median_step_time(hand_model, hand_opt, data, args.warmup, args.iters))
    gen.close()

    saved = {}
    for ratio in (1.0, 0.5, 0.0):
        g = LiteGen(
            {
                "zero_degree": 0,
                "selective_ratio": ratio,
                "global_batch_size": args.batch,
                "log_level": "WARNING",
            }
        )
        model, _ = g.initialize(*make())
        saved[ratio] = saved_activation_bytes(model, data)
        g.close()

    if dist.get_rank() == 0:
        facade, by_hand = statistics.median(times["facade"]), statistics.median(times["by_hand"])
        print(
            f"world={dist.get_world_size()} step facade={facade * 1e3:.1f} ms by_hand={by_hand * 1e3:.1f} ms"
        )
        for ratio, n in saved.items():
            print(f"selective_ratio={ratio}: saved activations {n / 2**20:.2f} MiB per step")
        print(f"RESULT facade_step_time_over_by_hand={facade / by_hand:.3f}")
        print(f"RESULT saved_activation_bytes_half_over_none={saved[0.5] / saved[1.0]:.3f}")
        print(f"RESULT saved_activation_bytes_full_over_none={saved[0.0] / saved[1.0]:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
