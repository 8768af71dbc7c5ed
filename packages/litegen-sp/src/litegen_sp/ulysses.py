"""Ulysses sequence parallelism: sequence split/gather and all-to-all attention.

Layout everywhere: ``(batch, seq, heads, head_dim)``. A sequence of ``seq_len`` tokens is padded at
its end to a multiple of the group size ``P`` and cut into ``P`` contiguous slices of
``local_len = padded_len / P`` tokens, one per rank of the group, in group-rank order.

``ulysses_attention`` trades the sequence split for a head split with one all-to-all (q, k and v in
one buffer), drops the pad tokens, runs the local kernel over the whole true sequence for ``heads / P``
heads, pads again and trades back with a second all-to-all. Gradients flow through both.

Gradient rule: every rank of an SP group ends with the full output (``gather_sequence``) and the same
loss. ``gather_sequence``'s backward returns this rank's slice of the gradient times ``P`` and
``split_sequence``'s backward places the local gradient into zeros of the full size, so the sum of any
parameter's gradient over the ranks of one SP group is ``P`` times the true gradient: averaging
gradients over the whole world (data parallel x sequence parallel) gives the exact data-parallel mean.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .ring import Chunk, _put, _take, ring_attention_chunks

AttentionFn = Callable[..., Tensor]
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
SEQ, HEADS = 1, 2  # the dims of (batch, seq, heads, head_dim)


def raise_if(bad: bool, error: type[Exception], message: str | Callable[[], str]) -> None:
    """``if bad: raise error(message)``: the package's argument checks (on every rank, before any collective).

    ``message`` may be a zero-argument callable, called only when ``bad``: per-call checks format nothing.
    """
    if bad:
        raise error(message if isinstance(message, str) else message())


@dataclass(frozen=True)
class SequenceInfo:
    """How ``split_sequence`` cut a sequence: true length, padded length, dim and group size."""

    seq_len: int
    padded_len: int
    dim: int
    group_size: int

    @property
    def local_len(self) -> int:
        """Tokens per rank (pad included)."""
        return self.padded_len // self.group_size


def _group_size_and_rank(group: dist.ProcessGroup | None, where: str, name: str = "group") -> tuple[int, int]:
    raise_if(
        not dist.is_available() or not dist.is_initialized(),
        RuntimeError,
        lambda: f"{where} needs an initialized torch.distributed process group",
    )
    raise_if(
        group is not None and not isinstance(group, dist.ProcessGroup),
        TypeError,
        lambda: (
            f"{where}: {name}={group!r} ({type(group).__name__}); allowed: a ProcessGroup or None (the world)"
        ),
    )
    return dist.get_world_size(group), dist.get_rank(group)


def _normalize_dim(dim: int, x: Tensor, where: str) -> int:
    raise_if(
        isinstance(dim, bool) or not isinstance(dim, int),
        TypeError,
        lambda: f"{where}: dim={dim!r} ({type(dim).__name__}); allowed: an int",
    )
    raise_if(
        not -x.dim() <= dim < x.dim(),
        ValueError,
        lambda: f"{where}: dim={dim} is out of range for a tensor of shape {tuple(x.shape)}",
    )
    return dim % x.dim()


def _all_gather(x: Tensor, group: dist.ProcessGroup | None, size: int, dim: int) -> Tensor:
    """Every rank's ``x`` concatenated along ``dim`` (>= 0), in rank order."""
    x = x.contiguous()
    gathered = x.new_empty((size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(gathered, x, group=group)
    return gathered.unflatten(0, (size, x.shape[0])).movedim(0, dim).flatten(dim, dim + 1)


# ----------------------------------------------------------------------------- split / gather


class _GatherSequence(torch.autograd.Function):
    """All-gather the local slices along ``dim`` and trim the pad; backward: own slice x group size."""

    @staticmethod
    def forward(
        ctx, x_local: Tensor, group: dist.ProcessGroup | None, info: SequenceInfo, dim: int
    ) -> Tensor:
        ctx.info, ctx.dim, ctx.rank = info, dim, dist.get_rank(group)
        return _all_gather(x_local, group, info.group_size, dim).narrow(dim, 0, info.seq_len)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _local_slice(grad, ctx.info, ctx.dim, ctx.rank) * ctx.info.group_size, None, None, None


def _local_slice(x: Tensor, info: SequenceInfo, dim: int, rank: int) -> Tensor:
    """This rank's ``local_len`` tokens of the unpadded ``x`` along ``dim``, zero-padded at the end."""
    start = min(rank * info.local_len, info.seq_len)
    real = x.narrow(dim, start, min(info.local_len, info.seq_len - start))
    pad = info.local_len - real.shape[dim]
    return F.pad(real, [0, 0] * (x.dim() - 1 - dim) + [0, pad]).contiguous()  # F.pad lists dims from the last


def split_sequence(
    x: Tensor, group: dist.ProcessGroup | None, dim: int = 1, *, local_len: int | None = None
) -> tuple[Tensor, SequenceInfo]:
    """This rank's slice of ``x`` along ``dim``, padded with zeros to ``ceil(seq / P)`` tokens.

    ``x``: the full tensor, identical on every rank of ``group`` (e.g. ``(batch, seq, channels)``).
    ``local_len``: tokens per rank when more than ``ceil(seq / P)`` are wanted (rank r holds tokens
    ``r * local_len ...``, the last ranks more pad). Returns ``(x_local, info)``; ``x_local`` has
    ``info.local_len`` tokens along ``dim``. No communication; the backward places the local gradient
    into zeros of ``x``'s shape.
    """
    raise_if(
        not isinstance(x, Tensor),
        TypeError,
        lambda: f"split_sequence: x must be a Tensor, got {type(x).__name__}",
    )
    dim = _normalize_dim(dim, x, "split_sequence (x)")
    seq_len = x.shape[dim]
    raise_if(
        seq_len == 0,
        ValueError,
        lambda: f"split_sequence: x has no tokens along dim={dim} (shape {tuple(x.shape)})",
    )
    size, rank = _group_size_and_rank(group, "split_sequence")
    fewest = -(-seq_len // size)
    raise_if(
        local_len is not None
        and (isinstance(local_len, bool) or not isinstance(local_len, int) or local_len < fewest),
        ValueError,
        lambda: (
            f"split_sequence: local_len={local_len!r}; allowed: an int >= ceil({seq_len} / {size}) = {fewest}"
        ),
    )
    padded_len = (fewest if local_len is None else local_len) * size
    info = SequenceInfo(seq_len=seq_len, padded_len=padded_len, dim=dim, group_size=size)
    return _local_slice(x, info, dim, rank), info


def gather_sequence(
    x_local: Tensor, group: dist.ProcessGroup | None, info: SequenceInfo, dim: int | None = None
) -> Tensor:
    """All ranks' slices concatenated along ``dim`` (default ``info.dim``), pad removed.

    ``x_local``: ``info.local_len`` tokens along ``dim``. Returns ``info.seq_len`` tokens on every
    rank. Backward: this rank's slice of the incoming gradient times the group size (no communication).
    """
    raise_if(
        not isinstance(x_local, Tensor),
        TypeError,
        lambda: f"gather_sequence: x_local must be a Tensor, got {type(x_local).__name__}",
    )
    raise_if(
        not isinstance(info, SequenceInfo),
        TypeError,
        lambda: f"gather_sequence: info must be the SequenceInfo from split_sequence, got {info!r}",
    )
    dim = _normalize_dim(info.dim if dim is None else dim, x_local, "gather_sequence (x_local)")
    size, _ = _group_size_and_rank(group, "gather_sequence")
    raise_if(
        size != info.group_size,
        ValueError,
        lambda: f"gather_sequence: the group has {size} ranks but info was made for {info.group_size}",
    )
    raise_if(
        x_local.shape[dim] != info.local_len,
        ValueError,
        lambda: (
            f"gather_sequence: x_local has shape {tuple(x_local.shape)}, {x_local.shape[dim]} tokens along "
            f"dim={dim}; info expects local_len={info.local_len} (seq_len={info.seq_len}, P={size})"
        ),
    )
    return _GatherSequence.apply(x_local, group, info, dim)


# ----------------------------------------------------------------------------- all-to-all


def _all_to_all(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None, scatter: int, gather: int
) -> tuple[Tensor, ...]:
    """One ``all_to_all_single`` for several tensors: each one's dim ``scatter`` is cut into ``P`` parts, part
    ``j`` going to rank ``j``; the parts received are laid along dim ``gather``, in rank order."""
    size = dist.get_world_size(group)
    pieces = [t.unflatten(scatter, (size, -1)).movedim(scatter, 0) for t in tensors]  # (P, ...)
    numels = [piece[0].numel() for piece in pieces]
    send = pieces[0].new_empty((size, sum(numels)))
    for piece, chunk in zip(pieces, send.split(numels, dim=1), strict=True):
        chunk.view(piece.shape).copy_(piece)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    received = [
        chunk.view(piece.shape) for piece, chunk in zip(pieces, recv.split(numels, dim=1), strict=True)
    ]
    return tuple(r.movedim(0, gather).flatten(gather, gather + 1) for r in received)


# ``(b, s_local, h, d)`` per rank -> ``(b, P * s_local, h / P, d)``: all tokens, this rank's heads; and back.
_seq_to_heads = functools.partial(_all_to_all, scatter=HEADS, gather=SEQ)
_heads_to_seq = functools.partial(_all_to_all, scatter=SEQ, gather=HEADS)


class _AllToAll(torch.autograd.Function):
    """``_all_to_all`` with autograd: the backward trades back (``scatter`` and ``gather`` swapped)."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup | None, scatter: int, gather: int, *tensors: Tensor):
        ctx.group, ctx.dims = group, (gather, scatter)
        return _all_to_all(tensors, group, scatter, gather)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        return (None, None, None, *_all_to_all(grads, ctx.group, *ctx.dims))


# ----------------------------------------------------------------------------- local kernel


def _check_options(where: str, causal: bool, scale: float | None, dropout_p: float) -> None:
    raise_if(
        not isinstance(causal, bool), TypeError, lambda: f"{where}: causal={causal!r}; allowed: True or False"
    )
    raise_if(
        scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))),
        TypeError,
        lambda: f"{where}: scale={scale!r}; allowed: None (1/sqrt(head_dim)) or a number",
    )
    raise_if(
        isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)),
        TypeError,
        lambda: f"{where}: dropout_p={dropout_p!r}; allowed: a number in [0, 1)",
    )
    raise_if(
        not 0.0 <= dropout_p < 1.0,
        ValueError,
        lambda: f"{where}: dropout_p={dropout_p!r}; allowed: a number in [0, 1)",
    )


def _check_attention_shapes(where: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """``q``: (b, s, h, d); ``k``, ``v``: (b, s_kv, h_kv, d) and (b, s_kv, h_kv, d_v) with h % h_kv == 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{where}: {name} has shape {tuple(t.shape)}; expected 4 dims (batch, seq, heads, head_dim)"
            )
    raise_if(
        not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device),
        ValueError,
        lambda: f"{where}: q, k, v must share dtype and device ({q.dtype}/{k.dtype}/{v.dtype})",
    )
    raise_if(
        not q.shape[0] == k.shape[0] == v.shape[0] or q.shape[3] != k.shape[3],
        ValueError,
        lambda: f"{where}: batch and q/k head_dim must match: {_shapes(q, k, v)}",
    )
    raise_if(
        k.shape[1:3] != v.shape[1:3],
        ValueError,
        lambda: f"{where}: k and v must have the same seq and heads: {_shapes(q, k, v)}",
    )
    raise_if(
        k.shape[2] == 0 or q.shape[2] % k.shape[2],
        ValueError,
        lambda: (
            f"{where}: heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]} (GQA): {_shapes(q, k, v)}"
        ),
    )


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


@functools.cache
def _flash_attn_func() -> AttentionFn | None:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Local attention. ``q``: ``(b, s, h, d)``; ``k``, ``v``: ``(b, s_kv, h_kv, d)``; returns ``(b, s, h, d_v)``.

    flash-attn's ``flash_attn_func`` when it is installed, the tensors are on CUDA in fp16/bf16 with
    ``d <= 256``, there is no mask and a causal mask is square; otherwise
    ``F.scaled_dot_product_attention`` (GQA through ``enable_gqa``; causal is top-left aligned).
    ``attn_mask`` is in SDPA's layout, broadcastable to ``(b, h, s, s_kv)``.
    """
    _check_attention_shapes("attention", q, k, v)
    _check_options("attention", causal, scale, dropout_p)
    if (
        q.is_cuda
        and q.dtype in FLASH_DTYPES
        and q.shape[-1] <= FLASH_MAX_HEAD_DIM
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and attn_mask is None
        and (not causal or q.shape[1] == k.shape[1])
        and (flash := _flash_attn_func()) is not None
    ):
        return flash(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=causal,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- Ulysses

Layout = tuple[SequenceInfo, ...]


def _layout(where: str, spec: int | Sequence[SequenceInfo] | None, local_len: int, size: int) -> Layout:
    """How a rank's ``local_len`` tokens are made: the local slices of these sequences, in this order."""
    if spec is None or (isinstance(spec, int) and not isinstance(spec, bool)):
        padded = local_len * size
        seq_len = padded if spec is None else spec
        raise_if(
            not padded - size < seq_len <= padded,
            ValueError,
            lambda: (
                f"ulysses_attention: {where}={spec!r} does not fit a local length of {local_len} on {size} ranks; "
                f"allowed: {max(1, padded - size + 1)}..{padded} (SequenceInfo.seq_len)"
            ),
        )
        return (SequenceInfo(seq_len=seq_len, padded_len=padded, dim=1, group_size=size),)
    raise_if(
        isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec,
        TypeError,
        lambda: f"ulysses_attention: {where}={spec!r}; allowed: None, an int or a list of SequenceInfo",
    )
    raise_if(
        not all(isinstance(info, SequenceInfo) and info.group_size == size for info in spec),
        ValueError,
        lambda: (
            f"ulysses_attention: {where}={spec!r}; allowed: the SequenceInfos that split_sequence returned on "
            f"this group of {size} ranks"
        ),
    )
    lengths = [info.local_len for info in spec]
    raise_if(
        sum(lengths) != local_len,
        ValueError,
        lambda: (
            f"ulysses_attention: {where} describes {sum(lengths)} local tokens "
            f"({' + '.join(map(str, lengths))}), but the tensor has {local_len}"
        ),
    )
    return tuple(spec)


def _chunk(layout: Layout, device: torch.device, ranks: range, whole: bool, pads: bool = False) -> Chunk:
    """``ranks``' local tokens laid end to end, as a rank holds them after the sequence-to-heads exchange: rank
    ``r``'s slice of each sequence of the layout, in order, after rank ``r - 1``'s; real tokens first in each.

    ``Chunk.real`` indexes the real ones among them (None: no pad); with ``whole`` (a query x key mask),
    ``Chunk.positions`` gives their places in the whole sequence, the layout's sequences one after another
    (``pads``: every token's, a pad at its sequence's first token).
    """
    real, positions, start = [], [], 0
    for rank in ranks:
        offset = 0
        for info in layout:
            first = rank * info.local_len
            count = min(info.local_len, max(0, info.seq_len - first))
            real.append(range(start, start + count))
            if whole:
                local = torch.arange(first, first + (info.local_len if pads else count), device=device)
                positions.append(offset + local.where(local < info.seq_len, 0))
            start, offset = start + info.local_len, offset + info.seq_len
    total = sum(len(r) for r in real)
    index = (
        None if total == start else torch.cat([torch.arange(r.start, r.stop, device=device) for r in real])
    )
    return Chunk(index, torch.cat(positions) if whole else None, total)


def _gather_keys(mask: Tensor, group: dist.ProcessGroup | None, size: int) -> Tensor:
    """All ranks' key slices of a per-key mask ``(b, h, 1, keys)``, concatenated in rank order."""
    if mask.dtype == torch.bool:  # gloo has no bool collectives
        return _all_gather(mask.detach().to(torch.uint8), group, size, 3).bool()
    return _all_gather(mask.detach(), group, size, 3)


def _check_mask(
    mask: Tensor | None, q: Tensor, forms: Sequence[tuple[int, int]], where: str
) -> Tensor | None:
    """``mask``: SDPA's ``(b|1, h|1, query, key)`` with ``(query, key)`` one of ``forms`` (a 1 broadcasts
    where the form has 1); returned 4-D."""
    if mask is None:
        return None
    raise_if(
        not isinstance(mask, Tensor),
        TypeError,
        lambda: f"{where}: attn_mask must be a Tensor or None, got {type(mask).__name__}",
    )
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    batch, heads = q.shape[0], q.shape[2]
    fits = any(shape[2] == fq and shape[3] in (1, fk) for fq, fk in forms)
    if mask.dim() > 4 or shape[0] not in (1, batch) or shape[1] not in (1, heads) or not fits:
        allowed = " or ".join(f"({batch}|1, {heads}|1, {fq}, {fk}|1)" for fq, fk in forms)
        raise ValueError(
            f"{where}: attn_mask of shape {tuple(mask.shape)} is not supported; allowed (batch, heads, query, "
            f"key): {allowed}; per-key masks are split like k, query x key masks are whole"
        )
    return mask.reshape(shape)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None,
    ring_group: dist.ProcessGroup | None = None,
    causal: bool = False,
    scale: float | None = None,
    attn_fn: AttentionFn | None = None,
    kv_replicated: bool = False,
    seq_len: int | Sequence[SequenceInfo] | None = None,
    kv_seq_len: int | Sequence[SequenceInfo] | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention over the whole sequence of the SP group; inputs and output stay sequence-sharded.

    ``q``: ``(batch, seq_local, heads, head_dim)``, this rank's slice (``split_sequence``).
    ``seq_len`` says how those local tokens are made: ``None`` (all real), an int (one sequence of that
    true length, ``SequenceInfo.seq_len``) or a list of ``SequenceInfo`` (joint attention: the local
    slices of these sequences concatenated in this order, e.g. ``[text_info, image_info]``). Pad tokens
    are dropped before the kernel, so they never act as keys.
    ``k``, ``v``: ``(batch, kv_local, kv_heads, head_dim)`` sharded like ``q`` or, with ``kv_seq_len``,
    made of other split sequences (cross-attention to a split text stream). With ``kv_replicated=True``
    every rank holds the whole ``(batch, seq_kv, kv_heads, head_dim)`` k/v: attention runs locally for
    this rank's queries and all heads, with no communication (gradient: this rank's share).
    ``group``: the Ulysses group (``heads`` and ``kv_heads`` divisible by its size; GQA kept). With
    ``ring_group`` the SP group is Ulysses x Ring (USP): ``group`` holds ``U`` consecutive SP ranks
    (SP rank = ring rank * U + Ulysses rank), the ``R`` ring ranks run ring attention over the Ulysses
    groups' chunks (``ring.py``; causal, ``attn_fn`` and dropout need ``R = 1``).
    ``attn_fn(q, k, v, causal=, scale=, attn_mask=, dropout_p=)`` replaces the local kernel (default:
    ``attention``). ``attn_mask``: per-key ``(batch|1, heads|1, 1, kv|1)`` split like k, or a whole
    ``(batch|1, heads|1, seq, seq_kv)`` over the true sequences (SDPA's convention). Returns
    ``(batch, seq_local, heads, head_dim_v)``.
    """
    ulysses, u_rank = _group_size_and_rank(group, "ulysses_attention")
    ring, r_rank = (
        (1, 0) if ring_group is None else _group_size_and_rank(ring_group, "ulysses_attention", "ring_group")
    )
    size, rank = ulysses * ring, r_rank * ulysses + u_rank
    if (
        isinstance(attn_mask, Tensor)
        and attn_mask.dim() > 1
        and attn_mask.shape[-2] > 1
        and attn_mask.stride(-2) == 0
    ):
        attn_mask = attn_mask[..., :1, :]  # a per-key mask expanded over the queries (Lumina-Next) is per key
    _check_attention_shapes("ulysses_attention", q, k, v)
    _check_options("ulysses_attention", causal, scale, dropout_p)
    raise_if(
        not isinstance(kv_replicated, bool),
        TypeError,
        lambda: f"ulysses_attention: kv_replicated={kv_replicated!r}; allowed: True or False",
    )
    raise_if(
        not kv_replicated and (q.shape[2] % ulysses or k.shape[2] % ulysses),
        ValueError,
        lambda: (
            f"ulysses_attention: heads={q.shape[2]} and kv_heads={k.shape[2]} must both be divisible by the Ulysses "
            f"group size {ulysses} (q {tuple(q.shape)}, k {tuple(k.shape)}); a ring_group takes the rest of the "
            "sequence-parallel degree"
        ),
    )
    raise_if(
        attn_fn is not None and not callable(attn_fn),
        TypeError,
        lambda: f"ulysses_attention: attn_fn={attn_fn!r}; allowed: None or a callable",
    )
    kernel = attn_fn or attention
    q_layout = _layout("seq_len", seq_len, q.shape[1], size)
    if kv_replicated:
        raise_if(
            causal, ValueError, "ulysses_attention: causal=True needs sequence-sharded k/v, not kv_replicated"
        )
        forms = [(1, k.shape[1]), (q.shape[1], k.shape[1]), (_true_len(q_layout), k.shape[1])]
        mask = _check_mask(attn_mask, q, forms, "ulysses_attention")
        if mask is not None and mask.shape[2] not in (1, q.shape[1]):  # whole query x key: this rank's rows
            mask = mask.index_select(
                2, _chunk(q_layout, q.device, range(rank, rank + 1), True, pads=True).positions
            )
        out = kernel(q, k, v, causal=False, scale=scale, attn_mask=mask, dropout_p=dropout_p)
        return _checked_output(out, (*q.shape[:3], v.shape[3]))
    raise_if(
        kv_seq_len is None and k.shape[1] != q.shape[1],
        ValueError,
        lambda: (
            f"ulysses_attention: k/v have {k.shape[1]} local tokens and q {q.shape[1]}; pass kv_seq_len when k/v "
            "are split from other sequences, or kv_replicated=True when every rank holds the whole k/v"
        ),
    )
    kv_layout = q_layout if kv_seq_len is None else _layout("kv_seq_len", kv_seq_len, k.shape[1], size)
    raise_if(
        causal and (len(q_layout) > 1 or kv_layout != q_layout or ring > 1),
        ValueError,
        "ulysses_attention: causal=True needs q and k/v made of the same single sequence, and no ring_group",
    )
    raise_if(
        ring > 1 and (attn_fn is not None or dropout_p),
        ValueError,
        "ulysses_attention: attn_fn and dropout_p need ring_group=None (ring kernels are fixed)",
    )
    forms = [(1, k.shape[1]), (_true_len(q_layout), _true_len(kv_layout))]
    mask = _check_mask(attn_mask, q, forms, "ulysses_attention")
    keyed = mask is not None and mask.shape[2] == 1 and mask.shape[3] == k.shape[1]  # split like k
    whole = mask is not None and not keyed and mask.shape[2] > 1  # query x key over the true sequences
    if keyed and ulysses > 1:  # this Ulysses group's keys, like k after the exchange
        mask = _gather_keys(mask, group, ulysses)
    if mask is not None and mask.shape[1] > 1:
        local = q.shape[2] // ulysses
        mask = mask[:, u_rank * local : (u_rank + 1) * local]
    q_heads, k_heads, v_heads = _AllToAll.apply(group, HEADS, SEQ, q, k, v) if ulysses > 1 else (q, k, v)
    mine = range(r_rank * ulysses, (r_rank + 1) * ulysses)  # the SP ranks whose tokens this rank now holds
    q_chunk = _chunk(q_layout, q.device, mine, whole)
    # With a ring: ring attention over the Ulysses groups' chunks, chunk i holding SP ranks i * U ... i * U + U - 1.
    if ring > 1:
        kv_chunks = [
            _chunk(kv_layout, q.device, range(i * ulysses, (i + 1) * ulysses), whole) for i in range(ring)
        ]
        out = ring_attention_chunks(
            q_heads, k_heads, v_heads, group=ring_group, q_chunk=q_chunk, kv_chunks=kv_chunks,
            key_mask=mask if keyed else None, whole_mask=mask.index_select(2, q_chunk.positions) if whole else None,
            scale=scale,
        )  # fmt: skip
    else:
        kv_chunk = q_chunk if kv_layout == q_layout else _chunk(kv_layout, q.device, mine, whole)
        if keyed:
            mask = _take(mask, kv_chunk.real, 3)
        elif whole and (q_chunk.real is not None or kv_chunk.real is not None):
            mask = mask.index_select(2, q_chunk.positions).index_select(3, kv_chunk.positions)
        out = kernel(
            _take(q_heads, q_chunk.real, 1),
            _take(k_heads, kv_chunk.real, 1),
            _take(v_heads, kv_chunk.real, 1),
            causal=causal,
            scale=scale,
            attn_mask=mask,
            dropout_p=dropout_p,
        )
        out = _checked_output(out, (q.shape[0], _true_len(q_layout), q.shape[2] // ulysses, v.shape[3]))
        out = _put(out, q_chunk.real, q_heads.shape[1], 1)
    if ulysses > 1:
        (out,) = _AllToAll.apply(group, SEQ, HEADS, out)
    return out


def _true_len(layout: Layout) -> int:
    return sum(info.seq_len for info in layout)


def _checked_output(out: Tensor, expected: tuple[int, ...]) -> Tensor:
    raise_if(
        tuple(out.shape) != expected,
        ValueError,
        lambda: (
            f"ulysses_attention: attn_fn returned shape {tuple(out.shape)}, expected {expected} "
            "(batch, seq, heads, head_dim)"
        ),
    )
    return out
