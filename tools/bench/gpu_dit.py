"""A ~1B-parameter DiT trained in bf16 on one GPU: LiteGen against eager PyTorch, and the longest sequence.

    PYTHONPATH=<every packages/*/src> python3 tools/bench/gpu_dit.py     # an H100/H200, 2-3 minutes
    python tools/bench/gpu_dit.py --tiny                                  # a CPU, seconds: every code path

1. Ceiling: the measured bf16 matrix-product rate (8192^3 on random data, median of 10 after 3 warm-ups);
   MFU is over it, not over the datasheet.
2. Throughput at an image length (128 x 128 latents, patch 2: 4096 tokens, batch 2), no activation
   checkpointing on either side: (a) eager PyTorch (the model, fused AdamW, bf16 autocast, SDPA) and
   (b) LiteGen's single-GPU config (``initialize`` with ``compile: true``: torch.compile per block), in
   interleaved rounds, each the median of CUDA-event-timed steps. Model FLOPs per step: 6 x each
   parameter x the tokens it acts on (image tokens, text tokens, or once per sample) + attention
   (12 x dim x queries x keys per block, forward and backward); recomputation is not counted.
3. Longest sequence of video latents (256 tokens per frame) that trains one step under a memory cap of
   the model's states (weights, gradient buckets, AdamW state) + ``--budget-gib``, by binary search on
   frames, for: no checkpointing, full checkpointing, full checkpointing + activation offload. A
   step that runs out of memory leaves DDP mid-backward, so the next probe starts from a fresh model.
   Then the step times of full checkpointing with and without offload at the longest sequence full
   checkpointing trains (both fit there).

RESULT lines: ``mfu_litegen``, ``litegen_over_eager_tokens_per_s`` (eager step time over LiteGen's),
``offload_max_seq_gain`` (longest tokens, offload over full checkpointing), ``offload_step_time_cost``
(offload's step time over full checkpointing's, at full checkpointing's longest sequence). Each is
printed as soon as it is known, so a run cut short still reports the ones before.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (dit.py)

from dit import DiT, sincos_pos_embed  # noqa: E402
from litegen import LiteGen  # noqa: E402

TEXT_TOKENS, TEXT_DIM, CHANNELS, PATCH = 120, 384, 4, 2
STRATEGIES = {
    "no_ac": {"selective_ratio": 1.0},
    "full_ac": {"selective_ratio": 0.0},
    "full_ac_offload": {"selective_ratio": 0.0, "ac_offload": True},
}
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def build(args: argparse.Namespace, frames: int, size: int, device: torch.device) -> DiT:
    """The DiT for ``frames`` frames of ``size`` x ``size`` latents, built directly on ``device``."""
    with torch.device(device):
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
    """Reuse one model for another number of frames: only the positional table depends on it."""
    dit = getattr(model, "module", model)
    grid = size // PATCH
    with torch.device(dit.pos_embed.device):
        dit.pos_embed = sincos_pos_embed(dit.pos_embed.shape[-1], frames, grid, grid)
    dit.num_frames = frames


def model_flops(dit: DiT, batch: int, tokens: int) -> float:
    """Model FLOPs of one training step (forward + backward): 6 x each parameter x the tokens it acts on, plus
    the attention products (QK^T and PV: 4 x dim per query-key pair forward, x3 with backward)."""
    dense = 0
    for name, param in dit.named_parameters():
        if name.startswith("text_proj.") or ".cross_attn.to_k." in name or ".cross_attn.to_v." in name:
            seen = TEXT_TOKENS
        elif name.startswith(("t_embedder.", "t_block.")) or name.endswith("scale_shift_table"):
            seen = 1  # once per sample
        else:
            seen = tokens
        dense += 6 * param.numel() * seen
    depth, dim = len(dit.blocks), dit.pos_embed.shape[-1]
    attention = 12 * depth * dim * (tokens * tokens + tokens * TEXT_TOKENS)
    return float(batch * (dense + attention))


def matmul_ceiling(device: torch.device, size: int) -> float:
    """FLOP/s of a bf16 ``size``^3 matrix product on random data: the median of 10 after 3 warm-ups."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / time_steps(lambda: a @ b, 3, 10, device)


def make_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace, frames: int, size: int
) -> Callable[[], torch.Tensor]:
    """One bf16-autocast training step on random latents (rectified flow), built on the model's device."""
    device = next(model.parameters()).device
    x = torch.randn(args.batch, CHANNELS, frames, size, size, device=device)
    text = torch.randn(args.batch, TEXT_TOKENS, TEXT_DIM, device=device)
    t = torch.rand(args.batch, device=device).view(-1, 1, 1, 1, 1)

    def step() -> torch.Tensor:
        noise = torch.randn_like(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model((1 - t) * x + t * noise, t.flatten(), text)
        loss = F.mse_loss(out.float(), noise - x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per call after ``warmup`` calls (CUDA events on a GPU, the host clock on a CPU)."""
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


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def litegen_trainer(
    args: argparse.Namespace, config: dict, frames: int, size: int, device: torch.device
) -> tuple[LiteGen, torch.nn.Module, torch.optim.Optimizer]:
    """``LiteGen(config)`` (a world of one), the DiT and fused AdamW through ``initialize``, after one step at one
    frame so that the optimizer state exists, as in every later step."""
    gen = LiteGen({**config, "global_batch_size": args.batch, "log_level": "WARNING"})
    model = build(args, 1, size, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    model, opt = gen.initialize(model, opt)
    make_step(model, opt, args, 1, size)()
    set_frames(model, frames, size)
    return gen, model, opt


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES)
    )


def throughput(args: argparse.Namespace, device: torch.device, ceiling: float) -> bool:
    """Eager PyTorch vs LiteGen at the image length, interleaved rounds; prints the first two RESULT lines."""
    size = args.image_size
    tokens = (size // PATCH) ** 2
    eager = build(args, 1, size, device)
    flops = model_flops(eager, args.batch, tokens)
    params = sum(p.numel() for p in eager.parameters())
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen, model, opt = litegen_trainer(args, {"compile": device.type == "cuda"}, 1, size, device)
    steps = {
        "eager": make_step(eager, eager_opt, args, 1, size),
        "litegen": make_step(model, opt, args, 1, size),
    }
    seconds: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.rounds):  # interleaved: drift affects both alike
        for label, step in steps.items():
            seconds[label].append(time_steps(step, args.warmup, args.iters, device))
    gen.close()
    del eager, eager_opt, model, opt, steps
    free(device)
    median = {label: statistics.median(s) for label, s in seconds.items()}
    for label, s in median.items():
        print(
            f"{label:8s} params={params / 1e9:.3f}B tokens/step={args.batch * tokens} step={s * 1e3:.1f} ms "
            f"tokens/s={args.batch * tokens / s:.0f} TFLOP/s={flops / s / 1e12:.1f} MFU={flops / s / ceiling:.3f} "
            f"rounds={' '.join(f'{x * 1e3:.1f}' for x in seconds[label])} ms"
        )
    print(f"RESULT mfu_litegen={flops / median['litegen'] / ceiling:.3f}")
    print(f"RESULT litegen_over_eager_tokens_per_s={median['eager'] / median['litegen']:.3f}", flush=True)
    return True


def longest(args: argparse.Namespace, config: dict, device: torch.device) -> int:
    """Largest frame count in [1, max_frames] whose training step fits (binary search; 0 if none does)."""
    size, current = args.frame_size, None

    def fits(frames: int) -> bool:
        nonlocal current
        if current is None:
            current = litegen_trainer(args, config, frames, size, device)
        gen, model, opt = current
        set_frames(model, frames, size)
        failed = False
        try:
            make_step(model, opt, args, frames, size)()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            failed = True
        if failed:  # outside the except clause: its traceback no longer holds the step's tensors
            gen.close()
            current = gen = model = opt = None
        free(device)
        if failed and device.type == "cuda" and torch.cuda.memory_allocated(device) > 2**29:
            print(
                f"  still allocated after an out-of-memory step: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB"
            )
        return not failed

    lo, hi = 0, args.max_frames
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    if current is not None:
        current[0].close()
    current = None
    free(device)
    return lo


def step_time(args: argparse.Namespace, config: dict, frames: int, device: torch.device, iters: int) -> float:
    gen, model, opt = litegen_trainer(args, config, frames, args.frame_size, device)
    seconds = time_steps(make_step(model, opt, args, frames, args.frame_size), 1, iters, device)
    gen.close()
    del model, opt
    free(device)
    return seconds


def cap_memory(args: argparse.Namespace, device: torch.device) -> None:
    """Cap this process's CUDA memory at the model's states + ``budget_gib``, so the searches end in seconds."""
    gen, model, opt = litegen_trainer(args, STRATEGIES["no_ac"], 1, args.frame_size, device)
    torch.cuda.synchronize()
    states = torch.cuda.memory_allocated(device)
    gen.close()
    del model, opt
    free(device)
    total = torch.cuda.get_device_properties(device).total_memory
    cap = states + args.budget_gib * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    print(
        f"memory cap: states {states / 2**30:.2f} GiB + budget {args.budget_gib:g} GiB = {cap / 2**30:.2f} GiB"
    )


def phase(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None after printing why it failed: one GPU run should report every phase it can."""
    try:
        return fn(*args)
    except Exception as error:  # reported; the next phase runs
        print(
            f"FAILED gpu_dit {name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        traceback.print_exc(file=sys.stdout)
    if dist.is_initialized():  # a LiteGen left open by the failure
        dist.destroy_process_group()
    free(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    return None


def sequences(args: argparse.Namespace, device: torch.device) -> dict[str, int]:
    """The longest sequence (frames) of each strategy under the memory cap; prints ``offload_max_seq_gain``."""
    if device.type == "cuda":
        cap_memory(args, device)
    frame_tokens = (args.frame_size // PATCH) ** 2
    best = {}
    for label, config in STRATEGIES.items():
        start = time.perf_counter()
        best[label] = longest(args, config, device)
        bound = " (the search's upper end: a lower bound)" if best[label] == args.max_frames else ""
        print(
            f"{label:16s} longest={best[label]} frames = {best[label] * frame_tokens} tokens per sample{bound} "
            f"(searched in {time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    print(f"RESULT offload_max_seq_gain={best['full_ac_offload'] / max(best['full_ac'], 1):.3f}", flush=True)
    return best


def offload_cost(args: argparse.Namespace, device: torch.device, best: dict[str, int]) -> bool:
    """Step times of full checkpointing with and without offload at full checkpointing's longest sequence."""
    at = max(best["full_ac"], 1)
    times = {
        label: step_time(args, STRATEGIES[label], at, device, 3) for label in ("full_ac", "full_ac_offload")
    }
    print(
        f"at {at * (args.frame_size // PATCH) ** 2} tokens per sample: full_ac {times['full_ac'] * 1e3:.1f} ms, "
        f"full_ac_offload {times['full_ac_offload'] * 1e3:.1f} ms"
    )
    print(f"RESULT offload_step_time_cost={times['full_ac_offload'] / times['full_ac']:.3f}", flush=True)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128, help="latent size: (128/2)^2 = 4096 tokens")
    p.add_argument("--frame-size", type=int, default=32, help="video latent size: 256 tokens per frame")
    p.add_argument("--max-frames", type=int, default=256)
    p.add_argument("--budget-gib", type=float, default=4.0, help="activation memory over the states")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a small CPU run of every code path")
    args = p.parse_args()
    if args.tiny:
        args.dim, args.depth, args.heads, args.batch = 32, 2, 4, 1
        args.image_size, args.frame_size, args.max_frames = 8, 4, 2
        args.warmup, args.iters, args.rounds = 1, 2, 2
    logging.basicConfig(level=logging.ERROR)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} dim={args.dim} depth={args.depth} heads={args.heads}")

    ceiling = matmul_ceiling(device, 8192 if device.type == "cuda" and not args.tiny else 256)
    print(f"bf16 matrix-product ceiling: {ceiling / 1e12:.1f} TFLOP/s", flush=True)
    measured = phase("throughput", throughput, args, device, ceiling)
    best = phase("longest sequence", sequences, args, device)
    costed = best is not None and phase("offload step time", offload_cost, args, device, best)
    sys.exit(0 if measured and costed else 1)


if __name__ == "__main__":
    main()
