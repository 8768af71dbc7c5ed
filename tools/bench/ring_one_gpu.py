"""Ring attention on one GPU: the chunk step every ring rank runs, against SDPA; the overlap needs more GPUs.

    PYTHONPATH=<every packages/*/src> python3 tools/bench/ring_one_gpu.py      # a GPU, seconds
    python tools/bench/ring_one_gpu.py --tiny                                   # a CPU, seconds

A ring of one rank (a ``cuda:nccl,cpu:gloo`` world of one) runs ``ring_attention_chunks`` forward and backward:
the chunk kernel with its log-sum-exp, the online-softmax merge and the backward from the merged output, with no
transfer. Timed (median of CUDA-event-timed calls after warm-up) against ``F.scaled_dot_product_attention``
forward and backward on the same bf16 tensors (batch 1, 16 heads of 128, 16384 tokens), and its error against
SDPA. Then the masked chunk (a per-key mask, the efficient kernel with a bias) at a length that is no multiple of
8, reported or its error shown. The overlap of ring transfers with compute needs two GPUs or more.

RESULT ``ring_chunk_over_sdpa_time`` and ``ring_chunk_rel_err_bf16`` (output and gradients, the largest).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen_sp.ring import Chunk, ring_attention_chunks


def timed(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ring(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``ring_attention_chunks`` on a ring of one; q, k, v ``(b, s, h, d)``."""
    chunk = Chunk(None, None, q.shape[1])
    return ring_attention_chunks(
        q, k, v, group=dist.group.WORLD, q_chunk=chunk, kv_chunks=[chunk], key_mask=key_mask
    )


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask
    )
    return out.transpose(1, 2)


def forward_backward(
    attend: Callable[..., torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor, **kw
):
    """One forward + backward; returns the output and the q, k, v gradients (then cleared)."""
    out = attend(*leaves, **kw)
    out.backward(grad)
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return [out.detach(), *grads]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def compare(shape: tuple[int, ...], device: torch.device, masked: bool) -> tuple[float, float, float]:
    """(ring seconds, SDPA seconds, the largest relative difference of output and gradients) at ``shape``."""
    b, s, h, d = shape
    leaves = [torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    kw = {}
    if masked:
        kw["key_mask"] = torch.rand(b, 1, 1, s, device=device) > 0.1
    ring_out = forward_backward(ring, leaves, grad, **kw)
    sdpa_out = forward_backward(sdpa, leaves, grad, **kw)
    error = max(rel_error(x, y) for x, y in zip(ring_out, sdpa_out, strict=True))
    ring_s = timed(lambda: forward_backward(ring, leaves, grad, **kw), device)
    sdpa_s = timed(lambda: forward_backward(sdpa, leaves, grad, **kw), device)
    return ring_s, sdpa_s, error


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--tiny", action="store_true", help="a small CPU run of the code path")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "cuda:nccl,cpu:gloo" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1
    )
    seq = 64 if args.tiny else args.seq
    heads, head_dim = (2, 16) if args.tiny else (16, 128)
    ok = True
    # then masked at a length that is no multiple of 8, where the efficient kernel's alignment rules bite
    for masked, length in ((False, seq), (True, seq - 3)):
        what = f"bf16, {length} tokens, {heads} heads of {head_dim}" + (", a per-key mask" if masked else "")
        try:
            ring_s, sdpa_s, error = compare((1, length, heads, head_dim), device, masked)
        except RuntimeError as failure:
            ok = False
            print(f"FAILED ring {what}: {str(failure).splitlines()[0]}\n{traceback.format_exc()}")
            ring_s = sdpa_s = error = math.nan
        print(
            f"{what}: ring chunk {ring_s * 1e3:.2f} ms, SDPA {sdpa_s * 1e3:.2f} ms, largest rel. difference {error:.2e}"
        )
        if not masked:
            print(f"RESULT ring_chunk_over_sdpa_time={ring_s / sdpa_s:.3f}")
            print(f"RESULT ring_chunk_rel_err_bf16={error:.2e}", flush=True)
    dist.destroy_process_group()
    print("NOT MEASURED ring_overlap: the overlap of ring transfers with compute needs >1 GPU")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
