"""Run an unmodified model's transformer blocks under Ulysses sequence parallelism.

``sequence_parallel(model, group, plan)`` rewires the chosen blocks in place, without touching the
model's code or its parameter names:

- the first block splits the token stream (``split_sequence``), the last block gathers it back
  (``gather_sequence``); the model's code before and after the blocks runs on the full sequence;
- during every block call a ``TorchFunctionMode`` routes each ``F.scaled_dot_product_attention``
  through ``ulysses_attention``. The mode is entered per block call, so it is also active when
  non-reentrant activation checkpointing re-runs a block in backward, and it composes with FSDP2
  ``fully_shard`` applied to the blocks afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .ulysses import SequenceInfo, gather_sequence, split_sequence, ulysses_attention

logger = logging.getLogger(__name__)


@dataclass
class SPPlan:
    """Where a model's sequence-parallel region is and what flows into it.

    blocks: dotted path of the ``nn.ModuleList`` / ``nn.Sequential`` of blocks (``"blocks"``);
        ``None``: the largest (by parameter count) ``nn.ModuleList`` whose members share one type.
    hidden: the block argument carrying the token stream, by position or name; split along
        ``hidden_dim`` on entry to the first block, gathered on exit from the last block.
    hidden_dim: the sequence dim of the token stream (``(batch, seq, channels)`` -> 1).
    output: when blocks return a tuple, the index of the token stream in it; ``None``: a tensor.
    split: other per-token block arguments (e.g. rotary tables), split at every block call:
        ``{position or name: seq dim}``; a tuple/list argument has each tensor split.
        Every other argument (text tokens, timestep embeddings, ...) is replicated: passed as is.
    cross_attention: name fragments (case-insensitive, matched against each part of a submodule's
        dotted name inside a block) of submodules whose attention attends to replicated k/v.

    Rule for each routed attention call: inside a ``cross_attention`` submodule, or with a key length
    different from the query's local length -> cross-attention (k/v replicated, sliced by head);
    otherwise self-attention (k/v sequence-sharded like q). Name a cross-attention module whose text
    length can equal the local token count, and clear ``cross_attention`` when a self-attention module
    matches a fragment (e.g. a second self-attention called ``attn2``).
    """

    blocks: str | None = None
    hidden: int | str = 0
    hidden_dim: int = 1
    output: int | None = None
    split: Mapping[int | str, int] = field(default_factory=dict)
    cross_attention: tuple[str, ...] = ("cross", "attn2")


@dataclass(frozen=True)
class _ArgSlot:
    """Where one forward argument lives: its position (if positional) and its name (if known)."""

    label: int | str
    position: int | None
    name: str | None

    @classmethod
    def resolve(cls, forward: Callable[..., Any], spec: int | str) -> _ArgSlot:
        params = list(inspect.signature(forward).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise TypeError(f"SPPlan: block arguments are given by position or name, got {spec!r}")
        if isinstance(spec, int):
            if spec < 0:
                raise ValueError(f"SPPlan: argument position {spec} must be >= 0")
            name = positional[spec].name if spec < len(positional) else None
            return cls(spec, spec, name)
        position = next((i for i, p in enumerate(positional) if p.name == spec), None)
        return cls(spec, position, spec)

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


class _SPRuntime:
    """State shared by one model's wrapped blocks: the group, the current split and cross-attention depth."""

    def __init__(self, group: dist.ProcessGroup | None, plan: SPPlan) -> None:
        self.group = group
        self.plan = plan
        self.info: SequenceInfo | None = None
        self.cross_depth = 0

    @contextlib.contextmanager
    def cross_attention(self) -> Iterator[None]:
        self.cross_depth += 1
        try:
            yield
        finally:
            self.cross_depth -= 1

    def split_hidden(self, slot: _ArgSlot, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = slot.get(args, kwargs)
        if not isinstance(x, Tensor):
            raise TypeError(
                f"SPPlan.hidden={slot.label!r}: the first block got {type(x).__name__}, not a Tensor"
            )
        if not -x.dim() <= self.plan.hidden_dim < x.dim():
            raise ValueError(
                f"SPPlan.hidden_dim={self.plan.hidden_dim} is out of range for the token stream of shape "
                f"{tuple(x.shape)}"
            )
        x_local, self.info = split_sequence(x, self.group, self.plan.hidden_dim)
        return slot.set(args, kwargs, x_local)

    def split_extra(self, slot: _ArgSlot, dim: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        value = slot.get(args, kwargs)
        if value is None:
            return args, kwargs
        parts = list(value) if isinstance(value, (tuple, list)) else [value]
        split = []
        for part in parts:
            if (
                not isinstance(part, Tensor)
                or not -part.dim() <= dim < part.dim()
                or part.shape[dim] != self.info.seq_len
            ):
                shape = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                raise ValueError(
                    f"SPPlan.split[{slot.label!r}]: got {shape}; expected tensors with the token stream's "
                    f"{self.info.seq_len} tokens along dim {dim}"
                )
            split.append(split_sequence(part, self.group, dim)[0])
        new = type(value)(split) if isinstance(value, (tuple, list)) else split[0]
        return slot.set(args, kwargs, new)

    def gather_output(self, out: Any) -> Any:
        index = self.plan.output
        if index is not None and (not isinstance(out, (tuple, list)) or not -len(out) <= index < len(out)):
            raise TypeError(
                f"SPPlan.output={index!r}: the last block returned {type(out).__name__}; SPPlan.output is the index "
                "of the token stream in the tuple blocks return (None: blocks return a tensor)"
            )
        stream = out if index is None else out[index]
        if not isinstance(stream, Tensor):
            raise TypeError(
                f"SPPlan.output={index!r}: the last block returned {type(out).__name__}; set SPPlan.output "
                "to the index of the token stream when blocks return tuples"
            )
        full = gather_sequence(stream, self.group, self.info, self.plan.hidden_dim)
        if index is None:
            return full
        return type(out)((*out[:index], full, *out[index + 1 :]))

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
                f"sequence_parallel: scaled_dot_product_attention inside an SP block needs 4-D "
                f"(batch, heads, seq, head_dim) tensors, got q {tuple(query.shape)}, k {tuple(key.shape)}"
            )
        if query.shape[2] != self.info.local_len:
            raise ValueError(
                f"sequence_parallel: an attention query has {query.shape[2]} tokens, but this rank's slice of "
                f"the token stream has {self.info.local_len}; joint attention over concatenated streams "
                "is not supported by SPPlan"
            )
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise ValueError(
                f"scaled_dot_product_attention: q has {query.shape[1]} heads and k {key.shape[1]}; "
                "pass enable_gqa=True for grouped-query attention"
            )
        kv_replicated = self.cross_depth > 0 or key.shape[2] != query.shape[2]
        out = ulysses_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            group=self.group,
            causal=is_causal,
            scale=scale,
            kv_replicated=kv_replicated,
            seq_len=self.info.seq_len,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
        )
        return out.transpose(1, 2)


class _UlyssesRouting(TorchFunctionMode):
    """Sends every ``F.scaled_dot_product_attention`` call to ``_SPRuntime.attention``."""

    def __init__(self, runtime: _SPRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def __torch_function__(
        self, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.runtime.attention(*args, **kwargs)
        return func(*args, **kwargs)


def _check_plan(plan: SPPlan) -> None:
    """Every field's type, so a bad plan fails here, naming the field, before any block runs."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if plan.blocks is not None and not isinstance(plan.blocks, str):
        raise TypeError(f"SPPlan.blocks must be a dotted module path or None, got {plan.blocks!r}")
    for name, spec in [("hidden", plan.hidden), *((f"split[{k!r}]", k) for k in _keys(plan.split))]:
        if not (is_int(spec) and spec >= 0) and not isinstance(spec, str):
            raise TypeError(f"SPPlan.{name}: block arguments are given by position (>= 0) or name, got {spec!r}")
    dims = [plan.hidden_dim, *plan.split.values()]
    if not all(is_int(d) for d in dims):
        raise TypeError(
            f"SPPlan: hidden_dim and split dims must be ints, got {plan.hidden_dim!r}, {dict(plan.split)!r}"
        )
    if plan.output is not None and not is_int(plan.output):
        raise TypeError(f"SPPlan.output must be an int or None, got {plan.output!r}")
    if not isinstance(plan.cross_attention, (tuple, list)) or not all(
        isinstance(f, str) and f for f in plan.cross_attention
    ):
        raise TypeError(
            f"SPPlan.cross_attention must be a tuple of non-empty name fragments, got {plan.cross_attention!r}"
        )


def _keys(split: Any) -> list[Any]:
    if not isinstance(split, Mapping):
        raise TypeError(f"SPPlan.split must be a mapping {{argument position or name: seq dim}}, got {split!r}")
    return list(split)


def _find_blocks(model: nn.Module, plan: SPPlan) -> tuple[str, nn.Module]:
    if plan.blocks is not None:
        try:
            blocks = model.get_submodule(plan.blocks)
        except AttributeError as exc:
            raise ValueError(
                f"SPPlan.blocks={plan.blocks!r}: no such submodule in {type(model).__name__}"
            ) from exc
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(
                f"SPPlan.blocks={plan.blocks!r} is a {type(blocks).__name__} of {len(list(blocks.children()))} "
                "children; expected a non-empty nn.ModuleList or nn.Sequential"
            )
        return plan.blocks, blocks
    candidates = [
        (sum(p.numel() for p in m.parameters()), len(m), name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"sequence_parallel: {type(model).__name__} has no nn.ModuleList of same-type blocks; "
            "pass SPPlan(blocks='dotted.path.to.blocks')"
        )
    _, _, name, blocks = max(candidates, key=lambda c: c[:2])
    return name, blocks


def _unwrap_checkpoint(block: nn.Module) -> nn.Module:
    while isinstance(getattr(block, "_checkpoint_wrapped_module", None), nn.Module):
        block = block._checkpoint_wrapped_module
    return block


def _is_cross(name: str, fragments: tuple[str, ...]) -> bool:
    return any(f.lower() in part.lower() for part in name.split(".") for f in fragments)


def _wrap_cross(module: nn.Module, runtime: _SPRuntime) -> None:
    original = module.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with runtime.cross_attention():
            return original(*args, **kwargs)

    module.forward = forward


def _wrap_block(block: nn.Module, first: bool, last: bool, runtime: _SPRuntime) -> list[str]:
    """Make ``block`` split/route/gather; return the names of its cross-attention submodules."""
    original = block.forward
    plan = runtime.plan
    hidden = _ArgSlot.resolve(original, plan.hidden)
    extra = [(_ArgSlot.resolve(original, spec), dim) for spec, dim in plan.split.items()]

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if first:
            args, kwargs = runtime.split_hidden(hidden, args, kwargs)
        elif runtime.info is None:
            raise RuntimeError("sequence_parallel: a block ran before the first block split the sequence")
        for slot, dim in extra:
            args, kwargs = runtime.split_extra(slot, dim, args, kwargs)
        with _UlyssesRouting(runtime):
            out = original(*args, **kwargs)
        return runtime.gather_output(out) if last else out

    forward.litegen_sp = True  # type: ignore[attr-defined]
    block.forward = forward
    cross = []
    for name, module in block.named_modules():
        if (
            name
            and _is_cross(name, plan.cross_attention)
            and not any(name.startswith(c + ".") for c in cross)
        ):
            _wrap_cross(module, runtime)
            cross.append(name)
    return cross


def sequence_parallel(
    model: nn.Module, group: dist.ProcessGroup | None, plan: SPPlan | None = None
) -> nn.Module:
    """Run ``model``'s block stack under Ulysses SP over ``group``, in place; returns ``model``.

    Every rank of ``group`` must call the model with the same full inputs; every rank gets the same
    full output. Parameter names and the model's code are unchanged. Apply before activation
    checkpointing, ``torch.compile`` and FSDP2 ``fully_shard``. See ``SPPlan`` for the defaults.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sequence_parallel: model must be an nn.Module, got {type(model).__name__}")
    plan = SPPlan() if plan is None else plan
    if not isinstance(plan, SPPlan):
        raise TypeError(f"sequence_parallel: plan must be an SPPlan, got {type(plan).__name__}")
    _check_plan(plan)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel needs an initialized torch.distributed process group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"sequence_parallel: group={group!r}; allowed: a ProcessGroup or None (the world)")
    name, blocks = _find_blocks(model, plan)
    # wrap the module that really runs: a checkpoint wrapper re-runs its inner module in backward
    blocks = [_unwrap_checkpoint(b) for b in blocks]
    if any(getattr(b.forward, "litegen_sp", False) for b in blocks):
        raise ValueError(f"sequence_parallel: {type(model).__name__}.{name} is already sequence-parallel")
    runtime = _SPRuntime(group, plan)
    cross: list[str] = []
    for index, block in enumerate(blocks):
        found = _wrap_block(block, index == 0, index == len(blocks) - 1, runtime)
        cross += [f"{name}.{index}.{c}" for c in found]
    if dist.get_rank(group) == 0:
        logger.info(
            "litegen_sp: %d blocks at %r run Ulysses SP over %d ranks; cross-attention modules: %s",
            len(blocks),
            name,
            dist.get_world_size(group),
            cross or "none (key length decides)",
        )
    return model
