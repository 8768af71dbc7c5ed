"""Ulysses attention: bytes on the wire and attention FLOPs vs the Ulysses formula, error vs one rank.

    uv run torchrun --nproc-per-node 4 tools/bench/sp.py            # CPU/gloo, or CUDA/NCCL when present

Cases: self, causal, GQA, cross-attention to a split text, cross-attention to a replicated text
(attended locally: nothing moves), and joint attention (MMDiT: text then image tokens in one call,
each stream split on its own; with and without a text padding mask). Sequence lengths the group size
does not divide. Every rank runs ``ulysses_attention`` forward and backward on its slice.

Bytes are counted from the tensors handed to ``all_to_all_single`` and ``all_gather_into_tensor``
(the chunks sent to other ranks; the own chunk stays local) and compared with the Ulysses formula:
(P-1)/P of each rank's share of q, k, v and o forward and of their gradients backward, each share
taken at the true (unpadded) length / P, so pad tokens count against us. FLOPs are those of the
local kernel (4 * batch * heads * q_len * kv_len * head_dim) over the whole-sequence attention's / P.
The error is the max |difference| of the output and of the q/k/v gradients from
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
from litegen_sp import SequenceInfo, attention, gather_sequence, split_sequence, ulysses_attention


@contextlib.contextmanager
def count_bytes(counter: list[int]) -> Iterator[None]:
    """Add to ``counter[0]`` the bytes each all-to-all / all-gather call sends to other ranks."""
    real_a2a, real_gather = dist.all_to_all_single, dist.all_gather_into_tensor

    def all_to_all(
        output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = input.shape[0]
        splits = input_split_sizes or [rows // size] * size
        row_bytes = input[0].numel() * input.element_size() if rows else 0
        counter[0] += sum(n for j, n in enumerate(splits) if j != rank) * row_bytes
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def all_gather(output, input, group=None, async_op=False):
        counter[0] += (dist.get_world_size(group) - 1) * input.nbytes
        return real_gather(output, input, group=group, async_op=async_op)

    with (
        mock.patch.object(dist, "all_to_all_single", all_to_all),
        mock.patch.object(dist, "all_gather_into_tensor", all_gather),
    ):
        yield


def split_streams(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[SequenceInfo]]:
    """Each stream of ``x`` (concatenated along dim 1, ``lengths`` tokens each) split on its own, rejoined."""
    pieces = [split_sequence(part, None) for part in x.split(lengths, 1)]
    return torch.cat([p for p, _ in pieces], 1), [info for _, info in pieces]


def gather_streams(x_local: torch.Tensor, infos: list[SequenceInfo]) -> torch.Tensor:
    parts = x_local.split([info.local_len for info in infos], 1)
    return torch.cat([gather_sequence(p, None, info) for p, info in zip(parts, infos, strict=True)], 1)


def run_case(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    size = dist.get_world_size()
    joint, causal, gqa = name.startswith("joint"), name == "causal", name == "gqa"
    text_kv, replicated = name.startswith("cross"), name == "cross_replicated"
    kv_heads = args.heads // 4 if gqa else args.heads
    q_lengths = [args.text_len, args.seq] if joint else [args.seq]
    kv_lengths = [args.text_len] if text_kv else q_lengths
    q_len, kv_len = sum(q_lengths), sum(kv_lengths)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    q = randn(args.batch, q_len, args.heads, args.head_dim).requires_grad_()
    k = randn(args.batch, kv_len, kv_heads, args.head_dim).requires_grad_()
    v = randn(args.batch, kv_len, kv_heads, args.head_dim).requires_grad_()
    weight = randn(args.batch, q_len, args.heads, args.head_dim)
    mask = None
    if name == "joint_mask":  # the second half of the samples have 10% of their text padded
        mask = torch.ones(args.batch, 1, 1, kv_len, dtype=torch.bool, device=device)
        mask[args.batch // 2 :, ..., args.text_len - args.text_len // 10 : args.text_len] = False

    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=gqa,
    ).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))

    q_local, q_infos = split_streams(q, q_lengths)
    if replicated:
        k_local, v_local, kv_infos, mask_local = k, v, None, mask
    else:
        (k_local, kv_infos), (v_local, _) = split_streams(k, kv_lengths), split_streams(v, kv_lengths)
        mask_local = (
            None
            if mask is None
            else torch.cat([split_sequence(m, None, 3)[0] for m in mask.split(kv_lengths, 3)], 3)
        )
    flops = [0]

    def counting_attention(q_, k_, v_, **kwargs):
        flops[0] += 4 * q_.shape[0] * q_.shape[2] * q_.shape[1] * k_.shape[1] * q_.shape[3]
        return attention(q_, k_, v_, **kwargs)

    fwd, bwd = [0], [0]
    times = []
    for _ in range(args.repeats):
        fwd[0] = bwd[0] = flops[0] = 0
        start = time.perf_counter()
        with count_bytes(fwd):
            out_local = ulysses_attention(
                q_local,
                k_local,
                v_local,
                group=None,
                causal=causal,
                kv_replicated=replicated,
                seq_len=q_infos,
                kv_seq_len=kv_infos,
                attn_mask=mask_local,
                attn_fn=counting_attention,
            )
        w_local = split_streams(weight, q_lengths)[0]
        with count_bytes(bwd):
            grads = torch.autograd.grad((out_local * w_local).sum(), (q_local, k_local, v_local))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    def share(length: int, heads: int) -> float:  # bytes of one rank's true share of a tensor
        return args.batch * length / size * heads * args.head_dim * 4

    moved = [] if replicated else [share(q_len, args.heads), share(kv_len, kv_heads), share(kv_len, kv_heads)]
    theory = (size - 1) / size * (sum(moved) + (0 if replicated else share(q_len, args.heads)))
    ideal_flops = 4 * args.batch * args.heads * q_len * kv_len * args.head_dim / size

    out = gather_streams(out_local.detach(), q_infos)
    err = (out - ref).abs().max().item()
    # split's backward puts this rank's rows into the full gradient (replicated k/v: its queries' share);
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
        "flops": flops[0] / ideal_flops,
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

    cases = ("self", "causal", "gqa", "cross_split", "cross_replicated", "joint", "joint_mask")
    rows = [run_case(name, args, device) for name in cases]
    everyone = [None] * size
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        print(
            f"Ulysses over {size} ranks ({device.type}), batch {args.batch}, seq {args.seq} (+ text "
            f"{args.text_len}), heads {args.heads}, head_dim {args.head_dim}, fp32; per rank per attention call"
        )
        print(
            f"{'rank':>4} {'case':>16} {'fwd bytes':>12} {'bwd bytes':>12} {'theory':>12} {'fwd/th':>7} "
            f"{'bwd/th':>7} {'flops/id':>8} {'max err':>9} {'ms':>8}"
        )
        worst: dict[str, float] = {}
        for r, per_rank in enumerate(everyone):
            for row in per_rank:
                if row["theory"]:
                    f, b = row["fwd_bytes"] / row["theory"], row["bwd_bytes"] / row["theory"]
                else:  # replicated k/v: nothing may move
                    f, b = float(row["fwd_bytes"] > 0), float(row["bwd_bytes"] > 0)
                group = "joint" if row["case"].startswith("joint") else "ulysses"
                for key, value in (
                    (f"{group}_bytes", max(f, b)),
                    (f"{group}_flops", row["flops"]),
                    (f"{group}_err", row["err"]),
                ):
                    worst[key] = max(worst.get(key, 0.0), value)
                print(
                    f"{r:>4} {row['case']:>16} {row['fwd_bytes']:>12} {row['bwd_bytes']:>12} "
                    f"{row['theory']:>12.0f} {f:>7.4f} {b:>7.4f} {row['flops']:>8.4f} {row['err']:>9.2e} "
                    f"{row['ms']:>8.1f}"
                )
        print(f"RESULT ulysses_bytes_over_theory={worst['ulysses_bytes']:.4f}")
        print(f"RESULT ulysses_max_abs_err_fp32={worst['ulysses_err']:.3e}")
        print(f"RESULT joint_bytes_over_theory={worst['joint_bytes']:.4f}")
        print(f"RESULT joint_attn_flops_over_ideal={worst['joint_flops']:.4f}")
        print(f"RESULT joint_max_abs_err_fp32={worst['joint_err']:.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
