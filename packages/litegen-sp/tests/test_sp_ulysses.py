"""ulysses_attention, split_sequence and gather_sequence against single-rank attention (gloo, CPU)."""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from litegen_sp import SequenceInfo, attention, gather_sequence, split_sequence, ulysses_attention
from litegen_sp.ulysses import _heads_to_seq, _seq_to_heads
from torch.distributed.device_mesh import init_device_mesh

HEADS = 12  # divisible by 2, 3 and 4
HEAD_DIM = 8
TEXT_LEN = 5
CASES = [
    "self", "self_gqa", "self_mask", "self_square", "cross", "cross_gqa", "cross_mask", "cross_square",
    "cross_split", "joint", "joint_mask", "joint_square",
]  # fmt: skip
CAUSAL_CASES = ("self", "self_gqa")


def reference_attention(q, k, v, causal, mask):
    """Plain SDPA on the whole sequence; layout (batch, seq, heads, head_dim)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def split_joint(x: torch.Tensor, lengths: list[int], dim: int = 1) -> tuple[torch.Tensor, list[SequenceInfo]]:
    """Split each of the sequences concatenated in ``x`` (``lengths`` along ``dim``) and concatenate the slices."""
    pieces = [split_sequence(part, None, dim) for part in x.split(lengths, dim)]
    return torch.cat([p for p, _ in pieces], dim), [info for _, info in pieces]


def gather_joint(x_local: torch.Tensor, infos: list[SequenceInfo]) -> torch.Tensor:
    parts = x_local.split([info.local_len for info in infos], 1)
    return torch.cat([gather_sequence(p, None, info) for p, info in zip(parts, infos, strict=True)], 1)


def ulysses_matches_full_attention(heads: int = HEADS, ulysses: int | None = None) -> dict[str, float]:
    """Max |error| of forward and q/k/v gradients per (dtype, seq, causal, case) on this rank.

    self: k/v split like q; cross: k/v a replicated text (attended locally); cross_split: k/v a split
    text; joint: q, k, v the text then the image tokens, each split on its own; *_mask: a per-key
    additive bias with a padded key, split like k; *_square: a whole query x key bias with masked pairs.
    """
    size = dist.get_world_size()
    groups = {"group": None}
    if ulysses is not None:  # Ulysses x Ring: (ring, ulysses) mesh, Ulysses groups contiguous
        mesh = init_device_mesh("cpu", (size // ulysses, ulysses), mesh_dim_names=("ring", "ulysses"))
        groups = {"group": mesh.get_group("ulysses"), "ring_group": mesh.get_group("ring")}
    errors = {}
    for dtype, seq, causal, case in itertools.product(
        (torch.float64, torch.float32), (7, 2, 3 * size), (False, True), CASES
    ):
        if causal and (case not in CAUSAL_CASES or ulysses is not None):
            continue
        gen = torch.Generator().manual_seed(seq * 10 + causal)
        joint, text_kv = case.startswith("joint"), case.startswith("cross")
        q_len = TEXT_LEN + seq if joint else seq
        kv_len = TEXT_LEN if text_kv else q_len
        kv_heads = (ulysses or size) if case.endswith("gqa") else heads
        q = torch.randn(2, q_len, heads, HEAD_DIM, generator=gen, dtype=dtype, requires_grad=True)
        k = torch.randn(2, kv_len, kv_heads, HEAD_DIM, generator=gen, dtype=dtype, requires_grad=True)
        v = torch.randn(2, kv_len, kv_heads, HEAD_DIM, generator=gen, dtype=dtype, requires_grad=True)
        weight = torch.randn(2, q_len, heads, HEAD_DIM, generator=gen, dtype=dtype)
        mask = None
        if case.endswith("mask"):  # per-head additive bias and a padded key in sample 1
            mask = torch.randn(2, heads, 1, kv_len, generator=gen, dtype=dtype)
            mask[1, :, :, -1] = float("-inf")
        if case.endswith("square"):  # per-head bias over every (query, key) pair, every fifth pair masked
            mask = torch.randn(2, heads, q_len, kv_len, generator=gen, dtype=dtype)
            rows, cols = torch.meshgrid(torch.arange(q_len), torch.arange(kv_len), indexing="ij")
            mask.masked_fill_((rows * 7 + cols) % 5 == 0, float("-inf"))

        expected = reference_attention(q, k, v, causal, mask)
        (expected * weight).sum().backward()
        ref_grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None

        q_lengths = [TEXT_LEN, seq] if joint else [seq]
        kv_lengths = [TEXT_LEN] if text_kv else q_lengths
        q_local, q_infos = split_joint(q, q_lengths)
        replicated = case in ("cross", "cross_gqa", "cross_mask", "cross_square")
        if replicated:
            (k_local, v_local), kv_infos, mask_local = (k, v), None, mask
        else:
            (k_local, kv_infos), (v_local, _) = split_joint(k, kv_lengths), split_joint(v, kv_lengths)
            keyed = mask is not None and mask.shape[2] == 1
            mask_local = split_joint(mask, kv_lengths, dim=3)[0] if keyed else mask  # query x key: whole
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
        )
        out = gather_joint(out_local, q_infos)
        (out * weight).sum().backward()
        err = (out - expected).abs().max().item()
        for t, ref in zip((q, k, v), ref_grads, strict=True):
            grad = t.grad.clone()
            dist.all_reduce(grad)  # every rank holds size x its share: the sum is size x the gradient
            err = max(err, (grad / size - ref).abs().max().item())
        errors[f"{dtype} seq={seq} causal={causal} {case}"] = err
    return errors


def coded(batch: int, seq: int, heads: int, offset: float) -> torch.Tensor:
    """(batch, seq, heads, 1) whose values say where they are: batch * 1e4 + token * 1e2 + head + offset."""
    b, s, h = torch.meshgrid(torch.arange(batch), torch.arange(seq), torch.arange(heads), indexing="ij")
    return (b * 10_000 + s * 100 + h + offset).double().unsqueeze(-1)


def tokens_land_where_they_should() -> None:
    size, rank = dist.get_world_size(), dist.get_rank()
    local_len, heads, kv_heads = 3, 2 * size, size
    q_full, k_full = coded(2, size * local_len, heads, 0.25), coded(2, size * local_len, kv_heads, 0.5)
    v_full = coded(2, size * local_len, kv_heads, 0.75)
    own = slice(rank * local_len, (rank + 1) * local_len)
    q, k, v = q_full[:, own], k_full[:, own], v_full[:, own]

    # sequence -> heads: every token of the group, this rank's heads; and back
    q_h, k_h, v_h = _seq_to_heads([q, k, v], None)
    assert torch.equal(q_h, q_full[:, :, rank * 2 : rank * 2 + 2])
    assert torch.equal(k_h, k_full[:, :, rank : rank + 1])
    assert torch.equal(v_h, v_full[:, :, rank : rank + 1])
    (q_back,) = _heads_to_seq([q_h], None)
    assert torch.equal(q_back, q)

    # through ulysses_attention, with pad tokens (true length one less than padded) and replicated k/v
    seq_len = size * local_len - 1
    seen = {}

    def identity(q_, k_, v_, **kwargs):
        seen.update(q=q_, k=k_, v=v_)
        return q_

    out = ulysses_attention(q, k, v, group=None, attn_fn=identity, seq_len=seq_len)
    assert torch.equal(seen["q"], q_full[:, :seq_len, rank * 2 : rank * 2 + 2])
    assert torch.equal(seen["k"], k_full[:, :seq_len, rank : rank + 1])
    assert torch.equal(seen["v"], v_full[:, :seq_len, rank : rank + 1])
    expected = q.clone()
    if rank == size - 1:
        expected[:, -1] = 0  # the pad token's output is zero
    assert torch.equal(out, expected)

    # replicated k/v: no exchange, this rank's queries, all heads, the whole k/v
    out = ulysses_attention(
        q, k_full, v_full, group=None, attn_fn=identity, kv_replicated=True, seq_len=seq_len
    )
    assert torch.equal(seen["q"], q) and torch.equal(seen["k"], k_full) and torch.equal(seen["v"], v_full)
    assert torch.equal(out, q)

    # joint: two sequences of 2 * size - 1 and size + 1 tokens, each split on its own, then concatenated;
    # the kernel sees every real token of both (rank-major), never a pad
    a_full, b_full = coded(1, 2 * size - 1, heads, 0.25), coded(1, size + 1, heads, 0.5)
    (a, a_info), (b, b_info) = split_sequence(a_full, None), split_sequence(b_full, None)
    joint = torch.cat([a, b], 1)
    out = ulysses_attention(joint, joint, joint, group=None, attn_fn=identity, seq_len=[a_info, b_info])
    mine = slice(rank * 2, rank * 2 + 2)
    expected_tokens = torch.cat(
        [torch.cat([a_full[:, r * 2 : r * 2 + 2], b_full[:, r * 2 : r * 2 + 2]], 1) for r in range(size)], 1
    )
    assert torch.equal(seen["q"], expected_tokens[..., mine, :])
    assert torch.equal(out[:, : a_info.local_len], a)  # pad rows of the slice are zeros in and out
    assert torch.equal(gather_sequence(out[:, a_info.local_len :], None, b_info), b_full)

    # split / gather: pad at the end, each rank its contiguous slice, gather trims
    x = coded(2, 2 * size + 1, 1, 0.0)
    x_local, info = split_sequence(x, None, dim=1)
    assert info == SequenceInfo(seq_len=2 * size + 1, padded_len=3 * size, dim=1, group_size=size)
    padded = torch.cat([x, x.new_zeros(2, size - 1, 1, 1)], dim=1)
    assert torch.equal(x_local, padded[:, rank * 3 : rank * 3 + 3])
    assert torch.equal(gather_sequence(x_local, None, info), x)


@pytest.mark.parametrize("world_size", [4, 2])
def test_every_token_lands_where_it_should(dist_pool, world_size):
    dist_pool.run(tokens_land_where_they_should, world_size=world_size)


def bad_calls_raise_before_any_collective() -> list[tuple[str, str, str]]:
    x = torch.randn(1, 4, 4, 8)
    info = SequenceInfo(seq_len=7, padded_len=8, dim=1, group_size=2)
    cases = {
        "heads": lambda: ulysses_attention(torch.randn(1, 4, 3, 8), x[:, :, :3], x[:, :, :3], group=None),
        "kv_heads": lambda: ulysses_attention(x, x[:, :, :1], x[:, :, :1], group=None),
        "gqa": lambda: ulysses_attention(x, torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), group=None),
        "kv_len": lambda: ulysses_attention(x, x[:, :3], x[:, :3], group=None),
        "seq_len": lambda: ulysses_attention(x, x, x, group=None, seq_len=3),
        "ndim": lambda: ulysses_attention(x[0], x, x, group=None),
        "dtype": lambda: ulysses_attention(x, x.double(), x, group=None),
        "mask": lambda: ulysses_attention(x, x, x, group=None, attn_mask=torch.zeros(1, 1, 7, 7)),
        "gather_len": lambda: gather_sequence(x[:, :3], None, info),
        "gather_info": lambda: gather_sequence(x, None, (7, 8)),
        "split_empty": lambda: split_sequence(torch.randn(2, 0, 3), None),
        "split_dim": lambda: split_sequence(x, None, dim=4),
    }
    forbidden = mock.Mock(side_effect=AssertionError("a collective ran before the error"))
    results = []
    with (
        mock.patch.object(dist, "all_to_all_single", forbidden),
        mock.patch.object(dist, "all_gather_into_tensor", forbidden),
    ):
        for name, call in cases.items():
            try:
                call()
            except (ValueError, TypeError) as exc:
                results.append((name, type(exc).__name__, str(exc)))
            else:
                results.append((name, "no error", ""))
    return results


def test_bad_inputs_raise_on_every_rank_before_any_collective(dist_pool):
    per_rank = dist_pool.run(bad_calls_raise_before_any_collective, world_size=2)
    expected = {
        "heads": "heads=3",
        "kv_heads": "kv_heads=1",
        "gqa": "multiple of kv_heads=6",
        "kv_len": "kv_replicated=True",
        "seq_len": "seq_len=3",
        "ndim": "(4, 4, 8)",
        "dtype": "dtype",
        "mask": "(1, 1, 7, 7)",
        "gather_len": "local_len=4",
        "gather_info": "SequenceInfo",
        "split_empty": "no tokens",
        "split_dim": "dim=4",
    }
    assert per_rank[0] == per_rank[1]
    for name, kind, message in per_rank[0]:
        assert kind in ("ValueError", "TypeError"), (name, kind)
        assert expected[name] in message, (name, message)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ulysses_equals_full_sequence_attention(dist_pool, world_size):
    per_rank = dist_pool.run(ulysses_matches_full_attention, world_size=world_size)
    for errors in per_rank:
        assert len(errors) == 2 * 3 * (len(CASES) + len(CAUSAL_CASES))
        for name, err in errors.items():
            tolerance = 1e-12 if "float64" in name else 1e-5
            assert err <= tolerance, (world_size, name, err)


@pytest.mark.parametrize(
    "world_size, heads, ulysses",
    [(2, 3, 1), (3, 3, 1), (4, 3, 1), (4, 4, 2), (4, 6, 2)],  # ring only, then 2 x 2
)
def test_ulysses_x_ring_equals_full_sequence_attention(dist_pool, world_size, heads, ulysses):
    per_rank = dist_pool.run(ulysses_matches_full_attention, heads, ulysses, world_size=world_size)
    for errors in per_rank:
        assert len(errors) == 2 * 3 * len(CASES)
        for name, err in errors.items():
            tolerance = 1e-12 if "float64" in name else 1e-5
            assert err <= tolerance, (world_size, heads, ulysses, name, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_path_matches_sdpa_in_bf16():
    pytest.importorskip("flash_attn")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)
    )
    for causal in (False, True):
        flash = attention(q, k, v, causal=causal)
        sdpa = reference_attention(q, k, v, causal, None)
        assert (flash.float() - sdpa.float()).abs().max().item() < 2e-2
