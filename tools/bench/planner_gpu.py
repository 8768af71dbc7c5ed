"""The planner on one GPU: its predicted peak (fake tensors, a fake world of one) against the real step's CUDA memory.

    PYTHONPATH=<every packages/*/src>:tools python3 tools/bench/planner_gpu.py     # a GPU, under a minute
    python tools/bench/planner_gpu.py --tiny                                        # a CPU, seconds

Workload: tools/dit.py's DiT (dim 1024, depth 4, 16 heads; 32 x 32 latents = 256 tokens, 8 samples, 120 text
tokens), AdamW. Configurations at a world of one: DDP in fp32 and in bf16 (autocast), ZeRO-3 in fp32 and with
bf16 parameters, ZeRO-3 with every block checkpointed, DDP with half the blocks checkpointed and activation offload,
ZeRO-3 with CPU offload. Predicted: ``litegen.plan.plans`` (the trace runs on the CPU). Measured:
``litegen.plan.measure`` (the same three steps on real tensors) in a ``cuda:nccl,cpu:gloo`` world of one: its
tracker's peak, and independently the growth of ``torch.cuda.max_memory_allocated`` over building the model,
``initialize`` and the steps.

Last lines: ``RESULT planner_cuda_max_rel_error`` (prediction vs max_memory_allocated, the largest relative error
over the configurations) and ``planner_cuda_tracked_max_rel_error`` (vs the tracker). On a CPU (``--tiny``) the
first is not measured (nan) and the second checks the code path.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (dit.py)

from dit import DiT  # noqa: E402
from litegen.plan import Workload, measure, plans  # noqa: E402

CONFIGS = {
    "ddp": {"zero_degree": 0},
    "ddp_bf16": {"zero_degree": 0, "precision": "bf16"},
    "zero3": {"zero_degree": 3},
    "zero3_bf16": {"zero_degree": 3, "precision": "bf16"},
    "zero3_full_ac": {"zero_degree": 3, "selective_ratio": 0.0},
    "ddp_half_ac_offload": {"zero_degree": 0, "selective_ratio": 0.5, "ac_offload": True},
    "zero3_cpu_offload": {"zero_degree": 3, "cpu_offload": True},
}
TINY_CONFIGS = ("ddp", "zero3")


def workload(args: argparse.Namespace, device: str) -> Workload:
    """The DiT (built on the CPU, as a trainer would) and one batch of inputs on ``device``."""

    def model() -> DiT:
        torch.manual_seed(0)
        return DiT(input_size=args.size, dim=args.dim, depth=args.depth, heads=args.heads)

    def inputs() -> dict[str, torch.Tensor]:
        return {
            "x": torch.randn(args.batch, 4, args.size, args.size, device=device),
            "t": torch.rand(args.batch, device=device),
            "text": torch.randn(args.batch, args.text, 384, device=device),
        }

    return Workload(model=model, inputs=inputs)


def measured(config: dict, work: Workload, cuda: bool) -> tuple[int, int | None]:
    """(the tracker's peak, the growth of torch.cuda.max_memory_allocated or None) of ``measure`` in this world."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    plan = measure(config, work)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return plan.peak, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="latent size: (32/2)^2 = 256 tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text", type=int, default=120)
    p.add_argument("--tiny", action="store_true", help="a small CPU run of the code path")
    args = p.parse_args()
    names = list(CONFIGS)
    if args.tiny:
        args.dim, args.depth, args.heads, args.size, args.batch, args.text = 32, 2, 2, 8, 2, 8
        names = list(TINY_CONFIGS)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"

    predicted = {}
    for name, plan in zip(
        names, plans([CONFIGS[n] for n in names], workload(args, "cpu"), world_size=1), strict=True
    ):
        if isinstance(plan, Exception):
            print(f"FAILED planner {name}: not planned: {type(plan).__name__}: {plan}")
            continue
        predicted[name] = plan.peak
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(
        "cuda:nccl,cpu:gloo" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1
    )
    errors: dict[str, list[float]] = {"cuda": [], "tracked": []}
    print(f"{'config':<22}{'predicted':>12}{'tracked':>12}{'max_alloc':>12}{'err':>8}{'trk err':>9}")
    failed = False
    for name in predicted:
        try:
            tracked, allocated = measured(CONFIGS[name], workload(args, device), cuda)
        except Exception as error:  # reported; the next configuration runs
            failed = True
            print(f"FAILED planner {name}: {type(error).__name__}: {error}")
            traceback.print_exc(file=sys.stdout)
            continue
        p_ = predicted[name]
        errors["tracked"].append(abs(p_ - tracked) / tracked)
        if allocated is not None:
            errors["cuda"].append(abs(p_ - allocated) / allocated)
        shown = (
            f"{allocated / 2**20:>10.1f}Mi{errors['cuda'][-1]:>8.3f}" if allocated else f"{'-':>12}{'-':>8}"
        )
        print(
            f"{name:<22}{p_ / 2**20:>10.1f}Mi{tracked / 2**20:>10.1f}Mi{shown}{errors['tracked'][-1]:>9.3f}"
        )
    dist.destroy_process_group()
    if not cuda:
        print("NOT MEASURED planner_cuda_max_rel_error: no CUDA (the tracker only)")
    print(f"RESULT planner_cuda_max_rel_error={max(errors['cuda'], default=math.nan):.4f}")
    print(f"RESULT planner_cuda_tracked_max_rel_error={max(errors['tracked'], default=math.nan):.4f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
