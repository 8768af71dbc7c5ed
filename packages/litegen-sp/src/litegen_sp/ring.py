"""Ring attention: exact attention over key/value blocks that travel around a group of ranks.

Each rank keeps its query chunk; the key/value chunks of the ring's ranks travel around it (rank ``r``
sends to ``r + 1``, the next chunk's transfer running while the current one is attended). Each chunk's
attention comes with its log-sum-exp, and the chunks are merged with the online-softmax rule, so no
rank holds more than one chunk's scores. The backward runs the ring again with flash attention's
backward (it needs only the final output and log-sum-exp); each chunk's key/value gradient travels
with it and is handed back to its owner. Forward sends each rank's k and v ``R - 1`` times; backward
sends k, v and their gradients ``R - 1`` times each.

Chunks hold pad tokens (sequences padded to a multiple of the SP size): ``Chunk.real`` lists the real
tokens of a chunk, and only those enter a kernel; a chunk without real keys (or whose keys a mask
hides from a query) never enters the merge for it. Layout: ``(batch, seq, heads, head_dim)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Chunk:
    """One ring rank's chunk: ``real`` indexes its real tokens (None: all are); ``positions`` gives
    each real token's place in the whole sequence (for a whole query x key mask; None: no such mask)."""

    real: Tensor | None
    positions: Tensor | None
    count: int


def _take(x: Tensor, index: Tensor | None, dim: int) -> Tensor:
    """The tokens of ``x`` at ``index`` along ``dim`` (None: all of them)."""
    return x if index is None else x.index_select(dim, index)


def _put(x: Tensor, index: Tensor | None, length: int, dim: int) -> Tensor:
    """Inverse of ``_take``: ``x``'s tokens at ``index`` along ``dim`` among ``length`` zeros (None: ``x``)."""
    if index is None:
        return x
    shape = list(x.shape)
    shape[dim] = length
    return x.new_zeros(shape).index_copy(dim, index, x)


def _flash(q: Tensor, bias: Tensor | None) -> bool:
    """CUDA flash kernel: fp16/bf16, no bias, a head dim it takes unpadded (a multiple of 8, at most 256)."""
    d = q.shape[-1]
    return (
        q.is_cuda and bias is None and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    )


def _efficient_bias(bias: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The bias as the CUDA memory-efficient kernel takes it (what SDPA prepares): ``(b, h, sq, sk)``, broadcast
    dims expanded with stride 0, rows stored at a multiple of 16 elements."""
    if bias is None:
        return None
    b, h, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bias = bias.expand(*bias.shape[:-1], sk)
    if sk % 16:
        bias = F.pad(bias, (0, -sk % 16))[..., :sk]
    return bias.expand(b, h, sq, sk)


def _kernel(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Attention and its log-sum-exp; q, k, v ``(b, h, s, d)`` (k, v expanded to q's heads)."""
    if _flash(q, bias):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )[:2]
        return out, lse
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _efficient_bias(bias, q, k), True, 0.0, False, scale=scale
        )[:2]
        return out, lse[..., : q.shape[2]]  # the kernel pads the queries to a multiple of 32
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )


def _kernel_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one chunk's attention, given the merged output and log-sum-exp of all chunks."""
    if _flash(q, bias):
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad,
            q,
            k,
            v,
            out,
            lse.float(),
            empty,
            empty,
            q.shape[2],
            k.shape[2],
            0.0,
            False,
            empty,
            empty,
            scale=scale,
        )
    if q.is_cuda:
        seed = offset = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad,
            q,
            k,
            v,
            _efficient_bias(bias, q, k),
            out,
            F.pad(lse.float(), (0, -lse.shape[-1] % 32)),  # padded to 32 queries, as the forward returns it
            seed,
            offset,
            0.0,
            [True, True, True, False],
            False,
            scale=scale,
        )
        return dq, dk, dv
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


def _expand(kv: Tensor, heads: int) -> Tensor:
    """``(b, h_kv, s, d)`` -> ``(b, heads, s, d)``: each kv head serves ``heads / h_kv`` query heads."""
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _reduce(grad: Tensor, kv_heads: int) -> Tensor:
    return grad if grad.shape[1] == kv_heads else grad.unflatten(1, (kv_heads, -1)).sum(2)


class _Ring:
    """The static facts of one ring call: group, key chunks, masks, scale."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        kv_chunks: list[Chunk],
        key_mask: Tensor | None,
        whole_mask: Tensor | None,
        scale: float | None,
    ) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self.kv_chunks = kv_chunks
        self.key_mask, self.whole_mask = key_mask, whole_mask
        self.scale = scale

    def steps(self, k: Tensor, v: Tensor) -> Iterator[tuple[Chunk, list[Tensor]]]:
        """Each ring rank's chunk in turn, this rank's first: its ``Chunk`` and its ``[k, v, key mask]``; the
        next chunk travels in while the caller attends this one."""
        blocks = [t.contiguous() for t in (k, v, self.key_mask) if t is not None]
        for step in range(self.size):
            incoming, works = self.swap(blocks) if step + 1 < self.size else (blocks, [])
            yield self.kv_chunks[(self.rank - step) % self.size], blocks
            _wait(works)
            blocks = incoming

    def inputs(self, chunk: Chunk, blocks: list[Tensor], q: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """A chunk's real keys and values expanded to ``q``'s heads, and its additive bias in ``q``'s dtype:
        its per-key mask and/or the whole mask's columns for its keys."""
        k, v = (_expand(_take(t, chunk.real, 2), q.shape[1]) for t in blocks[:2])
        bias = None if self.key_mask is None else _take(blocks[2], chunk.real, 3)
        if self.whole_mask is not None:
            cols = self.whole_mask.index_select(3, chunk.positions)
            bias = cols if bias is None else bias + cols
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=bias.device).masked_fill(~bias, NEG_INF)
        return k, v, None if bias is None else bias.to(q.dtype)

    def swap(self, tensors: list[Tensor]) -> tuple[list[Tensor], list]:
        """Start sending ``tensors`` to the next rank and receiving the previous rank's into new buffers."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag=i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag=i) for i, r in enumerate(received)]
        return received, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


class _RingAttention(torch.autograd.Function):
    """q: ``(b, h, sq, d)`` real queries; k, v: ``(b, h_kv, s_chunk, d)`` this rank's chunk, pads included."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> Tensor:
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros((*q.shape[:3], v.shape[3]), dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], NEG_INF, dtype=acc, device=q.device)
        for chunk, blocks in ring.steps(k, v):
            if chunk.count and q.shape[2]:
                kk, vv, bias = ring.inputs(chunk, blocks, q)
                chunk_out, chunk_lse = _kernel(q, kk, vv, bias, ring.scale)
                chunk_lse = chunk_lse.to(acc)
                if bias is not None:  # a query whose keys here are all masked gets no say (the kernel: lse 0)
                    chunk_lse = chunk_lse.masked_fill(
                        torch.isneginf(bias).all(-1).expand_as(chunk_lse), NEG_INF
                    )
                merged = torch.logaddexp(lse, chunk_lse)
                old = torch.exp(lse - merged).nan_to_num(0.0).unsqueeze(-1)
                new = torch.exp(chunk_lse - merged).nan_to_num(0.0).unsqueeze(-1)
                out = out * old + chunk_out.to(acc) * new
                lse = merged
        # a query with no key at all: output 0, as SDPA's kernels
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        acc = lse.dtype
        grad = grad.contiguous()
        dq = torch.zeros_like(q, dtype=acc)
        own = travel = None
        travel_works: list = []
        for step, (chunk, blocks) in enumerate(ring.steps(k, v)):
            if chunk.count and q.shape[2]:
                kk, vv, bias = ring.inputs(chunk, blocks, q)
                dq_, dk, dv = _kernel_backward(grad, q, kk, vv, out, lse, bias, ring.scale)
                dq += dq_.to(acc)
                dkv = [_put(_reduce(d.to(acc), k.shape[1]), chunk.real, k.shape[2], 2) for d in (dk, dv)]
            else:
                dkv = [torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)]
            if step == 0:
                own = dkv
            else:  # add to the gradient travelling with this chunk and pass it on (to its owner, at the end)
                if step > 1:
                    _wait(travel_works)
                    dkv = [mine + theirs for mine, theirs in zip(dkv, travel, strict=True)]
                travel, travel_works = ring.swap(dkv)
        if ring.size > 1:
            _wait(travel_works)
            own = [mine + theirs for mine, theirs in zip(own, travel, strict=True)]
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None


def ring_attention_chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup,
    q_chunk: Chunk,
    kv_chunks: list[Chunk],
    key_mask: Tensor | None = None,
    whole_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention of this rank's queries over every ring rank's key/value chunk.

    ``q``: ``(b, s_chunk, h, d)``; ``k``, ``v``: ``(b, s_kv_chunk, h_kv, d)``, this rank's chunks, pad
    included. ``q_chunk`` / ``kv_chunks[i]``: the real tokens of this rank's query chunk and of ring rank
    i's key chunk. ``key_mask``: this rank's per-key mask ``(b|1, h|1, 1, s_kv_chunk)``, travelling with k;
    ``whole_mask``: rows of a whole query x key mask for the real queries, ``(b|1, h|1, real q, seq_kv)``.
    Returns ``(b, s_chunk, h, d_v)`` with zeros for pad queries.
    """
    ring = _Ring(group, kv_chunks, key_mask, whole_mask, scale)
    q_real = _take(q, q_chunk.real, 1).transpose(1, 2)
    out = _RingAttention.apply(q_real, k.transpose(1, 2), v.transpose(1, 2), ring).transpose(1, 2)
    return _put(out, q_chunk.real, q.shape[1], 1)


def usp_split(
    sp_size: int, heads: int, kv_heads: int | None = None, ring: int | None = None
) -> tuple[int, int]:
    """``(ulysses, ring)`` with ``ulysses * ring == sp_size`` for attention with ``heads`` (and ``kv_heads``).

    ``ring=None``: the largest Ulysses degree that divides the SP size, the heads and the kv heads (their
    greatest common divisor), the rest ring; any head count works with any SP size. A given ``ring``
    must divide ``sp_size`` and leave a Ulysses degree that divides the heads, else ``ValueError``
    listing the splits that work.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    for name, value in (("sp_size", sp_size), ("heads", heads), ("kv_heads", kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"usp_split: {name}={value!r}; allowed: an int >= 1")
    ulysses = math.gcd(sp_size, heads, kv_heads)
    if ring is None:
        return ulysses, sp_size // ulysses
    valid = [
        f"{u} x {sp_size // u} (sp_ring={sp_size // u})" for u in range(ulysses, 0, -1) if ulysses % u == 0
    ]
    if (
        isinstance(ring, bool)
        or not isinstance(ring, int)
        or ring < 1
        or sp_size % ring
        or ulysses % (sp_size // ring)
    ):
        raise ValueError(
            f"sp_ring={ring!r} with sp_size={sp_size} and attention of {heads} heads ({kv_heads} for k/v): the "
            f"Ulysses degree sp_size / sp_ring must divide the heads; valid Ulysses x Ring splits: {', '.join(valid)}"
        )
    return sp_size // ring, ring
