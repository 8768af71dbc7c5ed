"""Ulysses attention: bytes on the wire vs the Ulysses formula, and error vs single-rank attention.

    uv run torchrun --nproc-per-node 4 tools/bench/sp.py            # CPU/gloo, or CUDA/NCCL when present

For each attention case (self, causal, GQA, cross-attention to replicated text; a sequence length
that the group size does not divide) every rank runs ``ulysses_attention`` forward and backward on its
slice. Bytes are counted from the tensors actually handed to ``all_to_all_single`` (the chunks sent
to the other ranks; the own chunk stays local) and compared with the Ulysses formula: one exchange of
(P-1)/P of each local slice that moves — q, k, v, o forward (q, o for cross-attention), their
gradients backward. The error is the max |difference| of the output and of the q/k/v gradients from
``F.scaled_dot_product_attention`` on the whole sequence on one rank, in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen_sp import gather_sequence, split_sequence, ulysses_attention


@contextlib.contextmanager
def count_all_to_all_bytes(counter: list[int]) -> Iterator[None]:
    """Add to ``counter[0]`` the bytes each ``all_to_all_single`` call sends to other ranks."""
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = input.shape[0]
        splits = input_split_sizes or [rows // size] * size
        row_bytes = input[0].numel() * input.element_size() if rows else 0
        counter[0] += sum(n for j, n in enumerate(splits) if j != rank) * row_bytes
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    with mock.patch.object(dist, "all_to_all_single", counting):
        yield


def run_case(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    size = dist.get_world_size()
    cross, causal, gqa = name == "cross", name == "causal", name == "gqa"
    kv_heads = args.heads // 4 if gqa else args.heads
    kv_len = args.text_len if cross else args.seq
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    q = randn(args.batch, args.seq, args.heads, args.head_dim).requires_grad_()
    k = randn(args.batch, kv_len, kv_heads, args.head_dim).requires_grad_()
    v = randn(args.batch, kv_len, kv_heads, args.head_dim).requires_grad_()
    weight = randn(args.batch, args.seq, args.heads, args.head_dim)

    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=gqa
    ).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))

    q_local, info = split_sequence(q, None)
    k_local, v_local = (k, v) if cross else (split_sequence(k, None)[0], split_sequence(v, None)[0])
    fwd, bwd = [0], [0]
    times = []
    for _ in range(args.repeats):
        fwd[0] = bwd[0] = 0
        start = time.perf_counter()
        with count_all_to_all_bytes(fwd):
            out_local = ulysses_attention(
                q_local,
                k_local,
                v_local,
                group=None,
                causal=causal,
                kv_replicated=cross,
                seq_len=info.seq_len,
            )
        w_local = split_sequence(weight, None)[0]
        with count_all_to_all_bytes(bwd):
            grads = torch.autograd.grad((out_local * w_local).sum(), (q_local, k_local, v_local))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    moved = [q_local] + ([] if cross else [k_local, v_local])
    theory = (size - 1) / size * (sum(t.numel() * t.element_size() for t in moved) + out_local.nbytes)

    out = gather_sequence(out_local.detach(), None, info)
    err = (out - ref).abs().max().item()
    # split's backward puts this rank's rows into the full gradient (replicated k/v: its heads);
    # summed over the ranks, that is the full gradient
    full_grads = torch.autograd.grad((q_local, k_local, v_local), (q, k, v), grad_outputs=grads)
    for grad in full_grads:
        dist.all_reduce(grad)
    err = max([err] + [(g - e).abs().max().item() for g, e in zip(full_grads, ref_grads, strict=True)])
    return {
        "case": name,
        "fwd_bytes": fwd[0],
        "bwd_bytes": bwd[0],
        "theory": theory,
        "err": err,
        "ms": 1e3 * statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=None, help="default: 1030 on CPU, 32770 on CUDA")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    args.seq = args.seq or (32770 if cuda else 1030)
    rank, size = dist.get_rank(), dist.get_world_size()

    rows = [run_case(name, args, device) for name in ("self", "causal", "gqa", "cross")]
    everyone = [None] * size
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        print(
            f"Ulysses over {size} ranks ({device.type}), batch {args.batch}, seq {args.seq}, heads "
            f"{args.heads}, head_dim {args.head_dim}, fp32; bytes per rank per attention call"
        )
        print(
            f"{'rank':>4} {'case':>6} {'fwd bytes':>12} {'bwd bytes':>12} {'theory':>12} {'fwd/th':>7} "
            f"{'bwd/th':>7} {'max err':>9} {'ms':>8}"
        )
        ratio, err = 0.0, 0.0
        for r, per_rank in enumerate(everyone):
            for row in per_rank:
                f, b = row["fwd_bytes"] / row["theory"], row["bwd_bytes"] / row["theory"]
                ratio, err = max(ratio, f, b), max(err, row["err"])
                print(
                    f"{r:>4} {row['case']:>6} {row['fwd_bytes']:>12} {row['bwd_bytes']:>12} "
                    f"{row['theory']:>12.0f} {f:>7.4f} {b:>7.4f} {row['err']:>9.2e} {row['ms']:>8.1f}"
                )
        print(f"RESULT ulysses_bytes_over_theory={ratio:.4f}")
        print(f"RESULT ulysses_max_abs_err_fp32={err:.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
