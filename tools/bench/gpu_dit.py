"""A ~1B-parameter DiT trained in bf16 on one GPU: throughput / MFU and the longest trainable sequence.

    python tools/bench/gpu_dit.py                 # on an H100/H200 (PYTHONPATH=packages/*/src:tools)
    python tools/bench/gpu_dit.py --tiny          # a few-second CPU run of the same code paths

1. Throughput: tokens/s and MFU (6·params·tokens + attention FLOPs over the GPU's dense bf16 peak)
   of (a) plain eager PyTorch with SDPA and (b) LiteGen's single-GPU config (torch.compile per block,
   SDPA's flash backend, selective checkpointing), measured in the same run, interleaved.
2. Longest sequence: binary search (in frames of 256 tokens) for the longest sequence that trains
   one step without OOM, for: no checkpointing; full checkpointing; full checkpointing + activation
   offload; selective (0.5) + offload; then the step time of each at a common length.

Timing: warm-up steps, CUDA events, the median of many steps; inputs are random normal latents.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (dit.py)

from dit import DiT, sincos_pos_embed  # noqa: E402
from litegen import LiteGen  # noqa: E402

TEXT_TOKENS, TEXT_DIM, CHANNELS, PATCH = 120, 384, 4, 2
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # FLOP/s, dense (no sparsity)


def build(args: argparse.Namespace, frames: int, size: int) -> DiT:
    return DiT(
        in_channels=CHANNELS,
        input_size=size,
        num_frames=frames,
        patch_size=PATCH,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        text_dim=TEXT_DIM,
    )


def set_frames(model: torch.nn.Module, frames: int, size: int) -> None:
    """Reuse one model for another sequence length: only the positional table depends on it."""
    dit = model.module if hasattr(model, "module") else model
    grid = size // PATCH
    dit.num_frames = frames
    dit.pos_embed = sincos_pos_embed(dit.pos_embed.shape[-1], frames, grid, grid).to(dit.pos_embed.device)


def flops_per_step(params: int, args: argparse.Namespace, tokens: int) -> float:
    """Model FLOPs of one training step: 6·N·tokens (dense) + attention scores/values (fwd + bwd)."""
    per_sample_attn = 12 * args.depth * args.dim * (tokens * tokens + tokens * TEXT_TOKENS)
    return 6 * params * tokens * args.batch + per_sample_attn * args.batch


def make_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    args: argparse.Namespace,
    frames: int,
    size: int,
    device: torch.device,
) -> Callable[[], float]:
    """One bf16-autocast training step on fresh random latents (never all-zero)."""
    x = torch.randn(args.batch, CHANNELS, frames, size, size, device=device)
    text = torch.randn(args.batch, TEXT_TOKENS, TEXT_DIM, device=device)
    t = torch.rand(args.batch, device=device)

    def step() -> float:
        noise = torch.randn_like(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            xt = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * noise
            loss = F.mse_loss(model(xt, t, text).float(), noise - x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step: Callable[[], float], warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per step (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def setup(args: argparse.Namespace, config: dict | None, frames: int, size: int):
    """(model, optimizer, gen) — plain eager when config is None, else through LiteGen.initialize()."""
    gen = LiteGen({**(config or {}), "global_batch_size": args.batch, "log_level": "WARNING"})
    model = build(args, frames, size).to(gen.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gen.device.type == "cuda")
    if config is not None:
        model, opt = gen.initialize(model, opt)
    return model, opt, gen


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def longest(args: argparse.Namespace, config: dict, size: int, device: torch.device) -> int:
    """Largest frame count (binary search in [1, args.max_frames]) whose training step does not OOM."""
    model, opt, gen = setup(args, config, 1, size)

    def fits(frames: int) -> bool:
        set_frames(model, frames, size)
        try:
            make_step(model, opt, args, frames, size, device)()
            return True
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            return False
        finally:
            free(device)

    lo, hi = 0, args.max_frames
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    gen.close()
    free(device)
    return lo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=128, help="latent size: (128/2)^2 = 4096 tokens")
    p.add_argument("--frame-size", type=int, default=32, help="video latent size: 256 tokens per frame")
    p.add_argument("--max-frames", type=int, default=512)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a small CPU run of every code path")
    args = p.parse_args()
    if args.tiny:
        args.dim, args.depth, args.heads, args.batch = 32, 2, 4, 1
        args.image_size, args.frame_size, args.max_frames, args.warmup, args.iters = 8, 4, 4, 1, 2
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)
    print(f"device={name} torch={torch.__version__} dim={args.dim} depth={args.depth} heads={args.heads}")

    # 1. throughput at the image length, eager vs LiteGen, interleaved in one run
    size = args.image_size
    tokens = (size // PATCH) ** 2
    runs = {"eager": None, "litegen": {"compile": device.type == "cuda", "selective_ratio": 1.0}}
    steps, params = {}, 0
    for label, config in runs.items():
        model, opt, gen = setup(args, config, 1, size)
        params = sum(p.numel() for p in model.parameters())
        steps[label] = (make_step(model, opt, args, 1, size, device), model, opt, gen)
    seconds = {label: [] for label in runs}
    for _ in range(3):  # interleave so drift affects both alike
        for label, (step, *_rest) in steps.items():
            seconds[label].append(time_steps(step, args.warmup, args.iters, device))
    for label in runs:
        steps[label][3].close()
    steps.clear()
    free(device)
    flops = flops_per_step(params, args, tokens)
    tps = {label: args.batch * tokens / statistics.median(s) for label, s in seconds.items()}
    for label in runs:
        mfu = flops / statistics.median(seconds[label]) / peak if peak else float("nan")
        print(
            f"{label:8s} params={params / 1e9:.3f}B tokens/step={args.batch * tokens} "
            f"step={statistics.median(seconds[label]) * 1e3:.1f} ms tokens/s={tps[label]:.0f} MFU={mfu:.3f}"
        )

    # 2. longest sequence per activation strategy
    strategies = {
        "no_ac": {"selective_ratio": 1.0},
        "full_ac": {"selective_ratio": 0.0},
        "full_ac_offload": {"selective_ratio": 0.0, "ac_offload": True},
        "selective_offload": {"selective_ratio": 0.5, "ac_offload": True},
    }
    frame_tokens = (args.frame_size // PATCH) ** 2
    best = {label: longest(args, cfg, args.frame_size, device) for label, cfg in strategies.items()}
    common = max(1, min(best.values()))
    step_time = {}
    for label, cfg in strategies.items():
        model, opt, gen = setup(args, cfg, common, args.frame_size)
        step_time[label] = time_steps(
            make_step(model, opt, args, common, args.frame_size, device), args.warmup, args.iters, device
        )
        del model, opt
        gen.close()
        free(device)
    for label in strategies:
        print(
            f"{label:18s} longest={best[label] * frame_tokens} tokens "
            f"step@{common * frame_tokens}={step_time[label] * 1e3:.1f} ms"
        )

    mfu_litegen = flops / statistics.median(seconds["litegen"]) / peak if peak else float("nan")
    print(f"RESULT mfu_litegen={mfu_litegen:.3f}")
    print(f"RESULT litegen_over_eager_tokens_per_s={tps['litegen'] / tps['eager']:.3f}")
    print(f"RESULT offload_max_seq_gain={best['full_ac_offload'] / max(best['full_ac'], 1):.3f}")
    print(f"RESULT offload_step_time_cost={step_time['full_ac_offload'] / step_time['full_ac']:.3f}")


if __name__ == "__main__":
    main()
