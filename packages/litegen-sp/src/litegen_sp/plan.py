"""Run an unmodified model's transformer blocks under Ulysses sequence parallelism.

``sequence_parallel(model, group, blocks=blocks)`` installs forward hooks on the blocks; the model's
code and parameter names are unchanged. The SP region is the outermost of the given block stacks, in
the given (execution) order: Flux's dual-stream then single-stream blocks, say, while the blocks of a
text refiner nested inside an embedder stay whole.

- Entering the region's first block, each token stream is cut into this rank's slice: the block
  arguments ``SPPlan.streams`` names, else those the model's diffusers ``_cp_plan`` splits, else
  ``hidden_states`` (argument 0) and ``encoder_hidden_states``.
- Entering every block, each other tensor argument (inside tuples, lists and dicts too) with a token
  dim as long as a stream, or as two streams together, is cut the same way (see ``_token_dim``): rotary
  tables ``(tokens, d)``, key masks ``(batch, 1, 1, tokens)``, per-token timesteps ``(batch, tokens, ...)``.
  A two-stream table is cut segment by segment, in the order joint attention uses; a query x key mask
  stays whole and attention maps it onto the tokens it sees.
- During a block call a ``TorchFunctionMode`` routes each ``F.scaled_dot_product_attention`` through
  ``ulysses_attention`` and watches ``torch.cat``, which is how joint attention puts the streams
  together (text first in Flux, image first in SD3). Keys from a split stream are exchanged; keys no
  stream describes (a replicated text) are attended locally, without communication.
- Leaving the region's last block, the streams it returns are gathered.

Streams are told apart by their per-rank lengths: ``ceil(len / P)``, raised where needed so that no
two streams, no two streams together and no dim of a replicated argument share a length. The mode is
entered per block call, so it is also active when activation checkpointing re-runs a block, and it
composes with FSDP2 applied to the blocks afterwards.
"""

from __future__ import annotations

import fnmatch
import inspect
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only

from .ring import usp_split
from .ulysses import (
    SequenceInfo,
    _group_size_and_rank,
    gather_sequence,
    raise_if,
    split_sequence,
    ulysses_attention,
)

logger = logging.getLogger(__name__)

ArgSpec = int | str
Splits = Mapping[int, tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]]
_CATS = (torch.cat, torch.concat, torch.concatenate)
_DEFAULT_STREAMS: dict[ArgSpec, int] = {0: 1, "encoder_hidden_states": 1}


@dataclass(frozen=True)
class SPPlan:
    """What flows into a model's SP region, for models the defaults do not fit.

    streams: block arguments carrying token streams, ``{position or name: seq dim}``; split entering the
        region, gathered leaving it (when returned). ``None``: what the model's diffusers ``_cp_plan``
        splits, else ``hidden_states`` (argument 0) and ``encoder_hidden_states``.
    split: other per-token block arguments, ``{position or name: token dim}``; without an entry such
        arguments are found by length (a dim as long as a stream, or as two streams together).
    replicate: block arguments never split (passed whole to every rank).
    """

    streams: Mapping[ArgSpec, int] | None = None
    split: Mapping[ArgSpec, int] = field(default_factory=dict)
    replicate: tuple[ArgSpec, ...] = ()


@dataclass(frozen=True)
class _ArgSlot:
    """Where one forward argument lives: its position (if positional) and its name (if known)."""

    label: ArgSpec
    position: int | None
    name: str | None

    @classmethod
    def resolve(cls, forward: Callable[..., Any], spec: ArgSpec) -> _ArgSlot:
        params = list(inspect.signature(forward).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if isinstance(spec, int):
            return cls(spec, spec, positional[spec].name if spec < len(positional) else None)
        position = next((i for i, p in enumerate(positional) if p.name == spec), None)
        return cls(spec, position, spec)

    @property
    def key(self) -> str:
        return self.name if self.name is not None else f"argument {self.position}"

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.name is not None and self.name in kwargs:
            return kwargs[self.name]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        return None

    def set(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> tuple[tuple[Any, ...], dict]:
        if self.name is not None and self.name in kwargs:
            return args, {**kwargs, self.name: value}
        assert self.position is not None and self.position < len(args), "set() after a successful get()"
        return (*args[: self.position], value, *args[self.position + 1 :]), kwargs


@dataclass(frozen=True)
class _Slots:
    """One block class's arguments: its streams ``(slot, seq dim)``, named splits and replicated ones."""

    streams: tuple[tuple[_ArgSlot, int], ...]
    split: tuple[tuple[_ArgSlot, int], ...]
    replicate: tuple[_ArgSlot, ...]

    def claimed(self, args: tuple, kwargs: dict) -> set[int]:
        """ids of the argument values the plan decides (streams, named splits, replicated)."""
        slots = [s for s, _ in self.streams] + [s for s, _ in self.split] + list(self.replicate)
        return {id(v) for s in slots if (v := s.get(args, kwargs)) is not None}


@dataclass(frozen=True)
class _Forward:
    """One model call's split: each stream's ``SequenceInfo`` (by argument key, in entry order), and the
    concatenations of streams seen so far (local length -> streams in order; None: two orders seen)."""

    streams: dict[str, SequenceInfo]
    batch: int
    joined: dict[int, tuple[str, ...] | None] = field(default_factory=dict)

    def keys(self, length: int) -> tuple[str, ...] | None:
        """The streams ``length`` local tokens are made of: one stream, or streams joined in this order (None:
        neither, or joined in two orders)."""
        key = next((k for k, i in self.streams.items() if i.local_len == length), None)
        return (key,) if key is not None else self.joined.get(length)

    def lengths(self) -> dict[int, tuple[str, ...]]:
        """Full length of each stream, and of each two streams together (unless equally long but split
        differently) -> those streams; a stream wins over a pair, the first stream over a later one."""
        items = list(self.streams.items())
        pairs = {
            a.seq_len + b.seq_len: (ka, kb)
            for (ka, a), (kb, b) in itertools.combinations(items, 2)
            if a.seq_len != b.seq_len or a.local_len == b.local_len
        }
        return {**pairs, **{i.seq_len: (k,) for k, i in reversed(items)}}

    def describe(self) -> str:
        parts = [f"{k}: {i.local_len} per rank (of {i.seq_len})" for k, i in self.streams.items()]
        joined = sorted(n for n, streams in self.joined.items() if streams)
        return "; ".join(parts) + (f"; joined into {joined}" if joined else "")

    def watch_cat(
        self, tensors: Sequence[Tensor], dim: int = 0, axis: int | None = None, **_: Any
    ) -> tuple[str, ...] | None:
        """Record a ``torch.cat`` of local streams (or of their concatenations); returns their order."""
        dim = dim if axis is None else axis
        if not isinstance(tensors, (tuple, list)) or len(tensors) < 2:
            return None
        parts = [
            self.keys(t.shape[dim]) if isinstance(t, Tensor) and -t.dim() <= dim < t.dim() else None
            for t in tensors
        ]
        if None in parts:
            return None
        streams = tuple(k for part in parts for k in part)
        total = sum(t.shape[dim] for t in tensors)
        if any(info.local_len == total for info in self.streams.values()):  # reads as that stream
            return None
        known = self.joined.get(total, streams)
        self.joined[total] = streams if known == streams else None
        return streams

    def layout(self, length: int, where: str) -> tuple[SequenceInfo, ...] | None:
        """The split sequences a local length of ``length`` tokens is made of; None: no split sequence."""
        if length in self.joined and self.joined[length] is None:
            raise ValueError(
                f"{where}: sequences of {length} tokens put the streams together in different orders "
                f"({self.describe()}); SP cannot tell which tokens are which"
            )
        keys = self.keys(length)
        return None if keys is None else tuple(self.streams[k] for k in keys)


def _local_lengths(full: dict[str, int], size: int, reserved: set[int]) -> dict[str, int]:
    """Per-rank length of each stream: ``ceil(len / size)``, raised until every stream length and
    every sum of two differs from the others and from ``reserved`` (full lengths, replicated dims)."""
    chosen: dict[str, int] = {}
    for key, n in full.items():
        same = [chosen[k] for k in chosen if full[k] == n]  # as long as an earlier stream: split alike
        length = same[0] if same else -(-n // size)
        while not same and not _distinct([*set(chosen.values()), length], reserved):
            length += 1
        chosen[key] = length
    return chosen


def _distinct(singles: list[int], reserved: set[int]) -> bool:
    """Whether these lengths and the sums of each two of them all differ, and none is reserved."""
    lengths = singles + [a + b for a, b in itertools.combinations(singles, 2)]
    return len(set(lengths)) == len(lengths) and not reserved.intersection(lengths)


class _SPRuntime:
    """One model's SP state: the group, the region, its blocks' argument slots and the current split."""

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup | None,
        plan: SPPlan,
        region: list[nn.Module],
        names: dict[int, str],
        splits: Splits,
    ) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.splits = splits
        self.plan = plan
        self.region = region
        self.names = names
        self.stream_specs = (
            plan.streams if plan.streams is not None else _streams_from_cp_plan(model, region, names)
        )
        self.slots: dict[type, _Slots] = {}
        self.forward: _Forward | None = None
        self.joint_orders: dict[frozenset[str], tuple[str, ...]] = {}
        self.calls: list[_BlockCall] = []
        self.watch: _BetweenBlocks | None = None

    def name(self, block: nn.Module) -> str:
        return f"{self.names[id(block)]!r} ({type(block).__name__})"

    def split_for(
        self, heads: int, kv_heads: int, where: str
    ) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """The (Ulysses, ring) groups for attention with these head counts (``usp_split``)."""
        ring = self.size // next(iter(self.splits)) if len(self.splits) == 1 else None
        try:
            ulysses, _ = usp_split(self.size, heads, kv_heads, ring)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if ulysses not in self.splits:
            raise ValueError(
                f"{where}: attention of {heads} heads ({kv_heads} for k/v) over {self.size} ranks needs the Ulysses "
                f"degree {ulysses}; sequence_parallel got splits for {sorted(self.splits)}"
            )
        return self.splits[ulysses]

    def slots_for(self, block: nn.Module) -> _Slots:
        if type(block) not in self.slots:
            forward = block.forward
            streams = tuple(
                (slot, dim)
                for spec, dim in self.stream_specs.items()
                if (slot := _ArgSlot.resolve(forward, spec)).position is not None or _accepts(forward, spec)
            )
            self.slots[type(block)] = _Slots(
                streams=streams,
                split=tuple((_ArgSlot.resolve(forward, spec), dim) for spec, dim in self.plan.split.items()),
                replicate=tuple(_ArgSlot.resolve(forward, spec) for spec in self.plan.replicate),
            )
        return self.slots[type(block)]

    # ---- entering a block -------------------------------------------------------------------------
    @torch.compiler.disable
    def enter(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._stop_watching()  # the mode between blocks, or one left over by a forward that raised
        slots = self.slots_for(block)
        streams = [(slot, dim, x) for slot, dim in slots.streams if (x := slot.get(args, kwargs)) is not None]
        for slot, dim, x in streams:
            if not isinstance(x, Tensor) or not -x.dim() <= dim < x.dim():
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"sequence_parallel: block {self.name(block)} got {shape} as the token stream "
                    f"{slot.key!r}; expected a tensor with its tokens along dim {dim} (SPPlan.streams)"
                )
        if block is self.region[0]:
            self.forward = self._split_streams(block, slots, streams, args, kwargs)
        elif self.forward is None:
            raise RuntimeError(
                f"sequence_parallel: block {self.name(block)} ran before the region's first block"
            )
        # Each stream: whole (entering the region, or passed whole to every block, as a text) -> this rank's
        # slice; already this rank's slice, or streams the model joined between blocks -> as it is.
        for slot, dim, x in streams:
            info, length = self.forward.streams.get(slot.key), x.shape[dim]
            if info is not None and length == info.seq_len:
                args, kwargs = slot.set(
                    args, kwargs, split_sequence(x, self.group, dim, local_len=info.local_len)[0]
                )
            elif (info is None or length != info.local_len) and not self.forward.joined.get(length):
                raise ValueError(
                    f"sequence_parallel: block {self.name(block)} got the stream {slot.key!r} with "
                    f"{length} tokens along dim {dim}; this rank's split is {self.forward.describe()}"
                )
        call = _BlockCall(self, block)
        args, kwargs = call.split_inputs(slots, args, kwargs)
        call.__enter__()
        self.calls.append(call)
        return args, kwargs

    def _split_streams(
        self, block: nn.Module, slots: _Slots, streams: list, args: tuple, kwargs: dict
    ) -> _Forward:
        """Choose each stream's per-rank length for this model call (at the region's first block)."""
        if not streams:
            raise ValueError(
                f"sequence_parallel: the region's first block {self.name(block)} got none of its token streams "
                f"{list(self.stream_specs)}; its arguments are {list(inspect.signature(block.forward).parameters)}: "
                "name the token streams with SPPlan(streams={argument: seq dim})"
            )
        full = {slot.key: x.shape[dim] for slot, dim, x in streams}
        probe = _Forward({k: SequenceInfo(n, n, 1, 1) for k, n in full.items()}, streams[0][2].shape[0])
        reserved = set(full.values())
        claimed = slots.claimed(args, kwargs)
        # a replicated tensor's non-batch dims: lengths its keys may have
        for t in tree_leaves((args, kwargs)):
            if (
                isinstance(t, Tensor)
                and id(t) not in claimed
                and t.dim() > 1
                and _token_dim(t, probe) is None
            ):
                reserved.update(t.shape[1:])
        lengths = _local_lengths(full, self.size, reserved)
        infos = {
            slot.key: SequenceInfo(full[slot.key], lengths[slot.key] * self.size, dim, self.size)
            for slot, dim, _ in streams
        }
        return _Forward(infos, probe.batch)

    # ---- leaving a block --------------------------------------------------------------------------
    @torch.compiler.disable
    def leave(self, block: nn.Module, args: tuple, out: Any) -> Any:
        call = self.calls.pop()
        call.__exit__(None, None, None)
        if out is None:  # the block raised; torch re-raises after the hooks
            return None
        if not call.routed:
            raise ValueError(
                f"{call.where}: no attention over the stream {next(iter(self.forward.streams))!r} went through "
                "F.scaled_dot_product_attention, so SP cannot split this block: its tokens are mixed some other "
                "way (e.g. linear attention, as in Sana, or an attention kernel called directly)"
            )
        if block is not self.region[-1]:
            if torch._C._current_graph_task_id() == -1:  # not a checkpointed block re-run in backward
                self.watch = _BetweenBlocks(self.forward)
                self.watch.__enter__()
            return None
        return tree_map_only(Tensor, self._gather, out)

    def _stop_watching(self, *_: Any) -> None:
        """Leave the between-blocks mode, if it is the innermost one (also as the model's exit hook)."""
        modes = torch.overrides._get_current_function_mode_stack()
        if self.watch is not None and modes and modes[-1] is self.watch:
            self.watch.__exit__(None, None, None)
        self.watch = None

    def _gather(self, t: Tensor) -> Tensor:
        """A returned local stream (or streams joined in the region) -> the full sequence, in model order."""
        dim = next(iter(self.forward.streams.values())).dim
        if t.dim() <= dim:
            return t
        layout = self.forward.layout(t.shape[dim], "sequence_parallel: the region's last block")
        if layout is None:
            return t
        parts = t.split([info.local_len for info in layout], dim)
        full = [
            gather_sequence(part, self.group, info, dim) for part, info in zip(parts, layout, strict=True)
        ]
        return full[0] if len(full) == 1 else torch.cat(full, dim)


def _accepts(forward: Callable[..., Any], name: ArgSpec) -> bool:
    params = inspect.signature(forward).parameters
    return isinstance(name, str) and (name in params or any(p.kind == p.VAR_KEYWORD for p in params.values()))


def _token_dim(t: Tensor, forward: _Forward) -> tuple[int, tuple[str, ...]] | None:
    """The token dim of a per-token input and the streams it spans; None: not a per-token input.

    The dim must be as long as a stream or two together. It is the leading dim after a batch (or
    broadcast) dim and singleton dims — ``(tokens, d)`` rotary tables, ``(1, tokens, 1, d)``,
    ``(batch, 1, 1, tokens)`` key masks, ``(batch, tokens, ...)`` per-token embeddings — or else the only
    later one that matches, the last dim of a 3-D+ tensor excepted: ``(batch, 6, tokens, channels)``
    modulations count, a ``(batch, text, channels)`` context whose channels equal a stream does not.
    A query x key mask (its last two dims both streams) is taken whole by attention.
    """
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == forward.batch):
        return None
    lengths = forward.lengths()
    if (
        (t.dim() > 2 or t.dtype == torch.bool)
        and t.dim() > 1
        and t.shape[-2] in lengths
        and t.shape[-1] in lengths
    ):
        return None
    start = 1 if t.dim() > 1 and t.shape[0] in (forward.batch, 1) else 0
    lead = next((d for d in range(start, t.dim()) if t.shape[d] != 1), None)
    if lead is None:
        return None
    if t.shape[lead] in lengths:
        return lead, lengths[t.shape[lead]]
    later = [d for d in range(lead + 1, t.dim() - (t.dim() > 2)) if t.shape[d] in lengths]
    return (later[0], lengths[t.shape[later[0]]]) if len(later) == 1 else None


class _BetweenBlocks(TorchFunctionMode):
    """Active between two blocks of the region: sees the model join streams (Flux2's text + image)."""

    def __init__(self, forward: _Forward) -> None:
        super().__init__()
        self.forward = forward

    def __torch_function__(
        self, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CATS:
            self.forward.watch_cat(*args, **kwargs)
        return func(*args, **kwargs)


class _BlockCall(TorchFunctionMode):
    """One block call: routes attention, watches how streams are concatenated, cuts joint inputs late."""

    def __init__(self, runtime: _SPRuntime, block: nn.Module) -> None:
        super().__init__()
        self.runtime = runtime
        self.block = block
        self.forward: _Forward = runtime.forward
        self.pending: dict[int, tuple[Tensor, int, tuple[str, ...]]] = {}  # id -> a joint input, dim, streams
        self.done: dict[int, Tensor] = {}
        self.routed = False

    @property
    def where(self) -> str:
        return f"sequence_parallel: block {self.runtime.name(self.block)}"

    # ---- per-token inputs ------------------------------------------------------------------------
    def split_inputs(self, slots: _Slots, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for slot, dim in slots.split:
            value = slot.get(args, kwargs)
            if value is not None:
                args, kwargs = slot.set(
                    args, kwargs, tree_map_only(Tensor, lambda t, d=dim, s=slot: self._named(t, d, s), value)
                )
        claimed = slots.claimed(args, kwargs)
        args = tuple(a if id(a) in claimed else tree_map_only(Tensor, self._found, a) for a in args)
        kwargs = {
            k: v if id(v) in claimed else tree_map_only(Tensor, self._found, v) for k, v in kwargs.items()
        }
        return args, kwargs

    def _named(self, t: Tensor, dim: int, slot: _ArgSlot) -> Tensor:
        lengths = self.forward.lengths()
        if not -t.dim() <= dim < t.dim() or t.shape[dim] not in lengths:
            raise ValueError(
                f"{self.where}: SPPlan.split[{slot.label!r}] got shape {tuple(t.shape)}; expected one of "
                f"{sorted(lengths)} tokens (a stream, or two together) along dim {dim}"
            )
        return self._cut(t, dim % t.dim(), lengths[t.shape[dim]])

    def _found(self, t: Tensor) -> Tensor:
        found = _token_dim(t, self.forward)
        return t if found is None else self._cut(t, *found)

    def _cut(self, t: Tensor, dim: int, streams: tuple[str, ...]) -> Tensor:
        """This rank's tokens of a per-token input spanning ``streams`` along ``dim``, each stream cut on its own."""
        infos = [self.forward.streams[key] for key in streams]
        if len(infos) == 2 and infos[0].seq_len != infos[1].seq_len:
            order = self.runtime.joint_orders.get(frozenset(streams))
            if order is None:  # cut when first used, once the block has shown its joint order
                self.pending[id(t)] = (t, dim, streams)
                return t
            infos = [self.forward.streams[key] for key in order]
        parts = t.split([info.seq_len for info in infos], dim)
        pieces = [
            split_sequence(part, self.runtime.group, dim, local_len=info.local_len)[0]
            for part, info in zip(parts, infos, strict=True)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    @torch.compiler.disable
    def _resolve_all(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tree_map_only(Tensor, self._resolve, (args, kwargs))

    def _resolve(self, t: Tensor) -> Tensor:
        """A joint input waiting for its order: cut now (once); any other tensor as it is."""
        if id(t) in self.pending and id(t) not in self.done:
            _, dim, streams = self.pending[id(t)]
            if frozenset(streams) not in self.runtime.joint_orders:
                raise ValueError(
                    f"{self.where}: the argument of shape {tuple(t.shape)} spans the streams "
                    f"{' + '.join(streams)} but was used before the block concatenated them, so its "
                    "order is unknown; name the streams in the order of this input in SPPlan.streams"
                )
            self.done[id(t)] = self._cut(t, dim, streams)
        return self.done.get(id(t), t)

    # ---- the mode ----------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.pending:
            args, kwargs = self._resolve_all(args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        if func in _CATS:
            self._watch_cat(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except RuntimeError as error:
            if isinstance(error, (dist.DistError, torch.OutOfMemoryError)):
                raise
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise ValueError(
                f"{self.where}: {name} failed on this rank's slice of the tokens ({self.forward.describe()}): "
                f"{error}. SP cannot split this block: it cuts the tokens before the block, so a block that lays "
                "them out as an image or video grid (a convolution, as in Sana's Mix-FFN) or mixes them without "
                "F.scaled_dot_product_attention (linear attention) does not work on a slice"
            ) from error

    @torch.compiler.disable  # the mode's other work traces into compiled blocks; this and attention break the graph
    def _watch_cat(self, *args: Any, **kwargs: Any) -> None:
        streams = self.forward.watch_cat(*args, **kwargs)
        if streams is not None and len(streams) == 2 and len(set(streams)) == 2:
            self.runtime.joint_orders.setdefault(frozenset(streams), streams)

    @torch.compiler.disable
    def attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """A routed ``F.scaled_dot_product_attention`` call: ``(b, h, s_local, d)`` in and out."""
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(
                f"{self.where}: scaled_dot_product_attention needs 4-D (batch, heads, seq, head_dim) tensors "
                f"under SP, got q {tuple(query.shape)}, k {tuple(key.shape)}"
            )
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise ValueError(
                f"{self.where}: scaled_dot_product_attention got q with {query.shape[1]} heads and k with "
                f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention"
            )
        q_layout = self.forward.layout(query.shape[2], self.where)
        if q_layout is None:
            raise ValueError(
                f"{self.where}: an attention query has {query.shape[2]} tokens (q {tuple(query.shape)}); this "
                f"rank's split is {self.forward.describe()}; queries must be one stream's tokens or streams "
                "joined with torch.cat"
            )
        kv_layout = self.forward.layout(key.shape[2], self.where)
        ulysses, ring = self.runtime.group, None
        if kv_layout is not None:
            ulysses, ring = self.runtime.split_for(query.shape[1], key.shape[1], self.where)
        primary = next(iter(self.forward.streams.values()))
        self.routed |= kv_layout is not None and primary in kv_layout
        out = ulysses_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            group=ulysses,
            ring_group=ring,
            causal=is_causal,
            scale=scale,
            kv_replicated=kv_layout is None,
            seq_len=list(q_layout),
            kv_seq_len=list(kv_layout) if kv_layout is not None else None,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
        )
        return out.transpose(1, 2)


def _streams_from_cp_plan(
    model: nn.Module, region: list[nn.Module], names: dict[int, str]
) -> dict[ArgSpec, int]:
    """The token streams a diffusers ``_cp_plan`` splits on entering the model or its first block.

    Only 3-D inputs that are arguments of the first block count (``img_ids`` and the like are left to
    the per-token search); without such a plan: ``hidden_states`` (argument 0) and ``encoder_hidden_states``.
    """
    cp_plan = getattr(model, "_cp_plan", None)
    first = region[0]
    params = inspect.signature(first.forward).parameters
    streams: dict[ArgSpec, int] = {}
    for path, entry in cp_plan.items() if isinstance(cp_plan, Mapping) else ():
        if isinstance(path, str) and (path == "" or fnmatch.fnmatchcase(names[id(first)], path)):
            for arg, spec in entry.items() if isinstance(entry, Mapping) else ():
                dim = getattr(spec, "split_dim", None)
                if (
                    isinstance(arg, str)
                    and arg in params
                    and isinstance(dim, int)
                    and getattr(spec, "expected_dims", None) in (3, None)
                    and not getattr(spec, "split_output", False)
                ):
                    streams[arg] = dim
    return streams or dict(_DEFAULT_STREAMS)


def _check_plan(plan: SPPlan) -> None:
    """Every field's type, so a bad plan fails here, naming the field, before any block runs."""

    def is_arg(spec: Any) -> bool:
        return (isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0) or isinstance(spec, str)

    def is_dim(dim: Any) -> bool:
        return isinstance(dim, int) and not isinstance(dim, bool)

    for name, mapping in (("streams", {} if plan.streams is None else plan.streams), ("split", plan.split)):
        raise_if(
            not isinstance(mapping, Mapping) or not all(is_arg(k) and is_dim(d) for k, d in mapping.items()),
            TypeError,
            f"SPPlan.{name}={mapping!r}; allowed: a mapping {{argument position (>= 0) or name: dim (int)}}",
        )
    raise_if(
        plan.streams is not None and not plan.streams,
        ValueError,
        "SPPlan.streams is empty; name at least one block argument carrying the token stream",
    )
    raise_if(
        not isinstance(plan.replicate, (tuple, list)) or not all(is_arg(k) for k in plan.replicate),
        TypeError,
        f"SPPlan.replicate={plan.replicate!r}; allowed: a tuple of argument positions or names",
    )


def _check_splits(splits: Any, group: dist.ProcessGroup | None, size: int) -> Splits:
    """``{ulysses degree u: (group of u ranks, ring group of size / u ranks or None when u == size)}``."""

    def has_size(group: Any, n: int) -> bool:
        return isinstance(group, dist.ProcessGroup) and dist.get_world_size(group) == n

    if splits is None:
        return {size: (group, None)}
    raise_if(
        not isinstance(splits, Mapping) or not splits,
        TypeError,
        f"sequence_parallel: splits={splits!r}; allowed: {{ulysses degree: (group, ring group)}}",
    )
    for ulysses, pair in splits.items():
        ok = (
            isinstance(ulysses, int)
            and not isinstance(ulysses, bool)
            and ulysses >= 1
            and size % ulysses == 0
            and isinstance(pair, tuple)
            and len(pair) == 2
            and has_size(pair[0], ulysses)
            and (pair[1] is None if ulysses == size else has_size(pair[1], size // ulysses))
        )
        raise_if(
            not ok,
            ValueError,
            f"sequence_parallel: splits[{ulysses!r}]={pair!r}; allowed: for a Ulysses degree u dividing {size}, "
            f"(a group of u ranks, a ring group of {size} / u ranks or None when u == {size})",
        )
    return dict(splits)


def _unwrap_checkpoint(block: nn.Module) -> nn.Module:
    while isinstance(getattr(block, "_checkpoint_wrapped_module", None), nn.Module):
        block = block._checkpoint_wrapped_module
    return block


def _region(model: nn.Module, blocks: Sequence[nn.Module]) -> tuple[list[nn.Module], dict[int, str]]:
    """The outermost of ``blocks`` (fewest dots in their names), unwrapped, with their clean names."""
    raise_if(
        not isinstance(blocks, (nn.ModuleList, nn.Sequential, list, tuple)),
        TypeError,
        f"sequence_parallel: blocks={type(blocks).__name__}; allowed: a list of the model's blocks",
    )
    blocks = list(blocks)
    if not blocks or not all(
        isinstance(b, nn.Module) for b in blocks
    ):  # the message only then: reprs of blocks
        raise ValueError(f"sequence_parallel: blocks must be a non-empty list of modules, got {blocks!r}")
    qualified = {id(m): name for name, m in model.named_modules()}
    missing = [type(b).__name__ for b in blocks if id(b) not in qualified]
    if missing:
        raise ValueError(
            f"sequence_parallel: {len(missing)} of the blocks ({missing[0]}, ...) are not in the model"
        )
    names = {id(b): qualified[id(b)].replace("._checkpoint_wrapped_module", "") for b in blocks}
    depth = min(names[id(b)].count(".") for b in blocks)
    region = [b for b in blocks if names[id(b)].count(".") == depth]
    return [_unwrap_checkpoint(b) for b in region], {id(_unwrap_checkpoint(b)): names[id(b)] for b in region}


def sequence_parallel(
    model: nn.Module,
    group: dist.ProcessGroup | None,
    plan: SPPlan | None = None,
    *,
    blocks: Sequence[nn.Module],
    splits: Splits | None = None,
) -> nn.Module:
    """Run ``model``'s blocks under Ulysses SP over ``group``, in place; returns ``model``.

    ``blocks``: the model's transformer blocks in execution order, e.g. ``model.blocks`` or
    ``[*model.transformer_blocks, *model.single_transformer_blocks]`` (``litegen_zero.find_blocks``).
    ``splits``: Ulysses x Ring groups of the ``P`` ranks of ``group``, ``{ulysses degree u: (group of u
    consecutive ranks, ring group of the P / u ranks at the same place in theirs, or None)}``; each
    attention call takes the split ``usp_split`` picks from its head counts (one entry: that split for
    every call). ``None``: Ulysses only, ``{P: (group, None)}``.
    Every rank of ``group`` must call the model with the same full inputs; every rank gets the same
    full output. Parameter names and the model's code are unchanged. Apply before activation
    checkpointing, ``torch.compile`` and FSDP2 ``fully_shard``. See ``SPPlan`` for what is split.
    """
    raise_if(
        not isinstance(model, nn.Module),
        TypeError,
        f"sequence_parallel: model must be an nn.Module, got {type(model).__name__}",
    )
    plan = SPPlan() if plan is None else plan
    raise_if(
        not isinstance(plan, SPPlan),
        TypeError,
        f"sequence_parallel: plan must be an SPPlan, got {type(plan).__name__}",
    )
    _check_plan(plan)
    size, _ = _group_size_and_rank(group, "sequence_parallel")
    splits = _check_splits(splits, group, size)
    region, names = _region(model, blocks)
    taken = [
        names[id(b)]
        for b in region
        if any(isinstance(getattr(h, "__self__", None), _SPRuntime) for h in b._forward_pre_hooks.values())
    ]
    if taken:
        raise ValueError(
            f"sequence_parallel: block {taken[0]!r} of {type(model).__name__} is already sequence-parallel"
        )
    runtime = _SPRuntime(model, group, plan, region, names, splits)
    for block in region:
        runtime.slots_for(block)
        block.register_forward_pre_hook(runtime.enter, with_kwargs=True)
        block.register_forward_hook(runtime.leave, always_call=True)
    model.register_forward_hook(runtime._stop_watching, always_call=True)
    if runtime.rank == 0:
        logger.info(
            "litegen_sp: %d blocks (%s ... %s) run SP over %d ranks (Ulysses degrees %s); streams: %s",
            len(region),
            names[id(region[0])],
            names[id(region[-1])],
            runtime.size,
            sorted(splits),
            ", ".join(f"{s!r} (dim {d})" for s, d in runtime.stream_specs.items()),
        )
    return model
