"""Ulysses attention: bytes on the wire and attention FLOPs vs the Ulysses formula, error vs one rank.

    uv run torchrun --nproc-per-node 4 tools/bench/sp.py            # CPU/gloo, or CUDA/NCCL when present

Cases: self, causal, GQA, cross-attention to a split text, cross-attention to a replicated text
(attended locally: nothing moves), and joint attention (MMDiT: text then image tokens in one call,
each stream split on its own; with and without a text padding mask); then ring attention over all
ranks (self and joint) and, on 4 ranks or more, Ulysses 2 x Ring P/2 (self and joint). Sequence lengths
the group size does not divide. Every rank runs ``ulysses_attention`` forward and backward on its slice.

Bytes are counted from the tensors handed to ``all_to_all_single``, ``all_gather_into_tensor`` and
ring sends (the chunks sent to other ranks; the own chunk stays local) and compared with the Ulysses
formula: (P-1)/P of each rank's share of q, k, v and o forward and of their gradients backward, each
share taken at the true (unpadded) length / P, so pad tokens count against us. Ring: forward sends
each rank's k and v share R-1 times, backward k, v and their gradients R-1 times each. FLOPs are those of the
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
from torch.distributed.device_mesh import init_device_mesh


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

    real_p2p = dist.batch_isend_irecv

    def p2p(ops):
        counter[0] += sum(op.tensor.nbytes for op in ops if op.op is dist.isend)
        return real_p2p(ops)

    with (
        mock.patch.object(dist, "all_to_all_single", all_to_all),
        mock.patch.object(dist, "all_gather_into_tensor", all_gather),
        mock.patch.object(dist, "batch_isend_irecv", p2p),
    ):
        yield


def split_streams(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[SequenceInfo]]:
    """Each stream of ``x`` (concatenated along dim 1, ``lengths`` tokens each) split on its own, rejoined."""
    pieces = [split_sequence(part, None) for part in x.split(lengths, 1)]
    return torch.cat([p for p, _ in pieces], 1), [info for _, info in pieces]


def gather_streams(x_local: torch.Tensor, infos: list[SequenceInfo]) -> torch.Tensor:
    parts = x_local.split([info.local_len for info in infos], 1)
    return torch.cat([gather_sequence(p, None, info) for p, info in zip(parts, infos, strict=True)], 1)


def run_case(name: str, args: argparse.Namespace, device: torch.device, ulysses: int | None = None) -> dict:
    """``ulysses``: Ulysses x Ring with this Ulysses degree (1: ring only); None: Ulysses over the world."""
    size = dist.get_world_size()
    groups: dict = {"group": None}
    if ulysses is not None:
        mesh = init_device_mesh(device.type, (size // ulysses, ulysses), mesh_dim_names=("ring", "ulysses"))
        groups = {"group": mesh.get_group("ulysses"), "ring_group": mesh.get_group("ring")}
    ring = 1 if ulysses is None else size // ulysses
    base = name.split(":")[-1]
    joint, causal, gqa = base.startswith("joint"), base == "causal", base == "gqa"
    text_kv, replicated = base.startswith("cross"), base == "cross_replicated"
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
    if base == "joint_mask":  # the second half of the samples have 10% of their text padded
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
                **groups,
                causal=causal,
                kv_replicated=replicated,
                seq_len=q_infos,
                kv_seq_len=kv_infos,
                attn_mask=mask_local,
                attn_fn=counting_attention if ring == 1 else None,
            )
        w_local = split_streams(weight, q_lengths)[0]
        with count_bytes(bwd):
            grads = torch.autograd.grad((out_local * w_local).sum(), (q_local, k_local, v_local))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    def share(length: int, heads: int) -> float:  # bytes of one rank's true share of a tensor
        return args.batch * length / size * heads * args.head_dim * 4

    if ring > 1:  # ring: k and v shares R - 1 times (backward: their gradients too); Ulysses: U - 1 of U
        u = size // ring
        kv = share(kv_len, kv_heads) * 2
        exchange = (u - 1) / u * (2 * share(q_len, args.heads) + kv)
        theory, theory_bwd = (ring - 1) * kv + exchange, 2 * (ring - 1) * kv + exchange
    elif replicated:
        theory = theory_bwd = 0.0
    else:
        moved = [share(q_len, args.heads), share(kv_len, kv_heads), share(kv_len, kv_heads)]
        theory = theory_bwd = (size - 1) / size * (sum(moved) + share(q_len, args.heads))
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
        "ring": ring,
        "fwd_bytes": fwd[0],
        "bwd_bytes": bwd[0],
        "theory": theory,
        "theory_bwd": theory_bwd,
        "flops": flops[0] / ideal_flops if ring == 1 else 1.0,
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
    rows += [run_case(f"ring:{name}", args, device, ulysses=1) for name in ("self", "joint")]
    if size >= 4 and size % 2 == 0 and args.heads % 2 == 0:
        rows += [run_case(f"usp:{name}", args, device, ulysses=2) for name in ("self", "joint")]
    everyone = [None] * size
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        print(
            f"Ulysses over {size} ranks ({device.type}), batch {args.batch}, seq {args.seq} (+ text "
            f"{args.text_len}), heads {args.heads}, head_dim {args.head_dim}, fp32; per rank per attention call"
        )
        print(
            f"{'rank':>4} {'case':>16} {'fwd bytes':>12} {'bwd bytes':>12} {'fwd theory':>12} {'fwd/th':>7} "
            f"{'bwd/th':>7} {'flops/id':>8} {'max err':>9} {'ms':>8}"
        )
        worst: dict[str, float] = {}
        for r, per_rank in enumerate(everyone):
            for row in per_rank:
                if row["theory"]:
                    f, b = row["fwd_bytes"] / row["theory"], row["bwd_bytes"] / row["theory_bwd"]
                else:  # replicated k/v: nothing may move
                    f, b = float(row["fwd_bytes"] > 0), float(row["bwd_bytes"] > 0)
                group = row["case"].split(":")[0] if ":" in row["case"] else "ulysses"
                group = "joint" if row["case"].startswith("joint") else group
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
        print(f"RESULT ring_bytes_over_theory={worst['ring_bytes']:.4f}")
        if "usp_err" in worst:
            print(f"RESULT usp_max_abs_err_fp32={worst['usp_err']:.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
