"""Sharded EMA: each rank keeps, and updates without communication, the EMA of only its own slice.

Built after the model is sharded, from its live parameters:

- FSDP2 / HSDP (ZeRO-2, ZeRO-3, grouped ZeRO-3): parameters are DTensors; the EMA of a parameter is
  a DTensor with the same mesh and placements whose local data is an fp32 copy of ``to_local()``.
- DDP / ZeRO-1 (plain, replicated parameters): every parameter's EMA is sharded along dim 0 over the
  world like FSDP2 does (``Shard(0)``, uneven chunks as ``torch.chunk`` makes them); each rank
  averages its rows of the full parameter. 0-d parameters are replicated.

``state_dict()`` holds these DTensors under the model's clean names, so ``torch.distributed.checkpoint``
saves them and loads them into a world of another size, or another sharding strategy.
Only trainable parameters are averaged; buffers and frozen parameters follow the model.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._prims_common import make_contiguous_strides_for
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

logger = logging.getLogger(__name__)

# Attribute names under which torch wrappers hold the wrapped module; they never appear in clean names.
_WRAPPER_ATTRIBUTES = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


@dataclass
class _Slot:
    """One averaged parameter: its EMA data on this rank and the tensor ``state_dict()`` exposes."""

    name: str
    param: nn.Parameter
    ema: torch.Tensor  # this rank's EMA data, updated in place
    shadow: torch.Tensor  # a DTensor whose local tensor is ``ema``, or ``ema`` itself
    rows: tuple[int, int] | None  # plain sharded parameter: (start, length) of this rank's rows

    def local_param(self) -> torch.Tensor:
        """This rank's piece of the parameter (its shard, its rows, or all of it); a view."""
        if isinstance(self.param, DTensor):
            return self.param.to_local()
        if self.rows is not None:
            return self.param.narrow(0, *self.rows)
        return self.param

    def source(self) -> torch.Tensor:
        """The parameter data the EMA averages, matching ``ema``'s shape."""
        if isinstance(self.param, DTensor) and not isinstance(self.shadow, DTensor):
            return self.param.full_tensor()  # unsharded EMA of a sharded parameter
        return self.local_param()

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from this rank's piece ``local`` laid out like ``shadow`` (collective)."""
        if not isinstance(self.shadow, DTensor):
            return local
        spec = self.shadow
        return DTensor.from_local(
            local, spec.device_mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride()
        ).full_tensor()


class ShardedEMA:
    """Exponential moving average of a (possibly sharded) model's trainable parameters.

    ``update(step)`` does ``ema <- decay·ema + (1 − decay)·param`` on local data with fused foreach
    ops and no collective. Before ``update_after_step`` the EMA copies the weights instead (so the
    averaging starts from the weights of that step). ``warmup=(gamma, power)`` makes the decay
    ``1 − (1 + t/gamma)^(−power)`` clamped to ``[0, decay]``, with ``t = step − update_after_step``.

    Buffers (e.g. BatchNorm running stats) and frozen parameters are not averaged: they follow the
    model, in ``swapped()`` and in ``full_state_dict()``.

    Args:
        model: the model, already sharded (DDP, ZeRO-1, FSDP2 or HSDP) or not sharded at all.
        decay: EMA decay in [0, 1] (the value reached after warm-up).
        warmup: ``(gamma, power)`` of the warm-up schedule, e.g. ``(1.0, 2/3)``; None: constant decay.
        update_after_step: first step that averages; before it the EMA copies the weights.
        dtype: floating dtype of the EMA (float32).
        sharded: False keeps a full replica on every rank (under FSDP2, ``update`` then all-gathers).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        *,
        warmup: tuple[float, float] | None = None,
        update_after_step: int = 0,
        dtype: torch.dtype = torch.float32,
        sharded: bool = True,
    ) -> None:
        raise_if(
            not isinstance(model, nn.Module),
            TypeError,
            f"model: expected an nn.Module, got {type(model).__name__}",
        )
        raise_if(
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0,
            ValueError,
            f"decay={decay!r}; allowed: a number in [0, 1], e.g. 0.9999",
        )
        raise_if(
            warmup is not None
            and not (
                isinstance(warmup, (tuple, list))
                and len(warmup) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in warmup)
            ),
            ValueError,
            f"warmup={warmup!r}; allowed: None or (gamma, power) with both > 0, e.g. (1.0, 2/3)",
        )
        raise_if(
            isinstance(update_after_step, bool)
            or not isinstance(update_after_step, int)
            or update_after_step < 0,
            ValueError,
            f"update_after_step={update_after_step!r}; allowed: an int >= 0",
        )
        raise_if(
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point,
            TypeError,
            f"dtype={dtype!r}; allowed: a floating torch.dtype, e.g. torch.float32",
        )
        raise_if(not isinstance(sharded, bool), TypeError, f"sharded={sharded!r}; allowed: True or False")
        self.decay = float(decay)
        self.warmup = None if warmup is None else (float(warmup[0]), float(warmup[1]))
        self.update_after_step = update_after_step
        self.dtype = dtype
        self.sharded = sharded
        self._model = model
        self._swapped = False
        _reshard_fsdp(model)  # FSDP2 may hold unsharded parameters after a forward without backward
        self._params = tuple(model.parameters())
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        raise_if(
            not trainable, ValueError, f"model: {type(model).__name__} has no trainable parameter to average"
        )
        mesh = None
        plain = [p for _, p in trainable if not isinstance(p, DTensor)]  # sharded here over the world's ranks
        if sharded and dist.is_initialized() and plain:
            # a mesh is bookkeeping: real even under a FakeTensorMode (planning)
            with unset_fake_temporarily():
                mesh = DeviceMesh.from_group(dist.group.WORLD, plain[0].device.type)
        with torch.no_grad():
            self._slots = [self._make_slot(_clean_name(model, name), p, mesh) for name, p in trainable]
        names = [slot.name for slot in self._slots]
        raise_if(
            len(set(names)) != len(names),
            ValueError,
            f"model: parameter names collide once wrapper prefixes are removed: {names}",
        )
        if _rank() == 0:
            local = sum(slot.ema.nbytes for slot in self._slots)
            full = sum(slot.param.numel() for slot in self._slots) * torch.finfo(dtype).bits // 8
            logger.info(
                "ShardedEMA: %d parameters, %.1f MiB of %.1f MiB on rank 0 (%s)",
                len(self._slots),
                local / 2**20,
                full / 2**20,
                "sharded" if sharded else "full replica",
            )

    def _make_slot(self, name: str, param: nn.Parameter, mesh: DeviceMesh | None) -> _Slot:
        rows = None
        if isinstance(param, DTensor):
            local = param.to_local() if self.sharded else param.full_tensor()
        elif mesh is not None and param.dim() > 0:
            size = param.shape[0]
            chunk = math.ceil(size / mesh.size())  # torch.chunk's (and DTensor Shard(0)'s) split
            start = min(mesh.get_local_rank() * chunk, size)
            rows = (start, min(chunk, size - start))
            local = param.narrow(0, *rows)
        else:
            local = param
        ema = torch.empty(local.shape, dtype=self.dtype, device=local.device).copy_(local)
        if isinstance(param, DTensor) and self.sharded:
            mesh, placements, stride = param.device_mesh, param.placements, param.stride()
        elif mesh is not None:
            placements = [Shard(0) if rows is not None else Replicate()]
            stride = make_contiguous_strides_for(param.shape)
        else:
            return _Slot(name, param, ema, ema, rows)
        shadow = DTensor.from_local(ema, mesh, placements, run_check=False, shape=param.shape, stride=stride)
        ema = shadow.to_local()  # the very tensor the DTensor wraps (no grad mode here)
        return _Slot(name, param, ema, shadow, rows)

    def decay_at(self, step: int) -> float:
        """The decay ``update(step)`` uses: 0 (copy) before ``update_after_step``, then constant or warm-up."""
        raise_if(
            isinstance(step, bool) or not isinstance(step, int),
            TypeError,
            lambda: f"step={step!r}; allowed: an int (the optimizer step count)",
        )
        if step < self.update_after_step:
            return 0.0
        if self.warmup is None:
            return self.decay
        gamma, power = self.warmup
        value = 1.0 - (1.0 + (step - self.update_after_step) / gamma) ** -power
        return min(max(value, 0.0), self.decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average the current weights into the EMA (call after ``optimizer.step()``); no collective."""
        decay = self.decay_at(step)  # checks step
        if self._swapped:
            raise RuntimeError("ShardedEMA.update() called inside ema.swapped(): the model holds EMA weights")
        self._check_parameters(self._model, "update()")
        emas = [slot.ema for slot in self._slots]
        sources = [slot.source() for slot in self._slots]
        if decay == 0.0:
            torch._foreach_copy_(emas, sources)
            return
        sources = [s if s.dtype == e.dtype else s.to(e.dtype) for s, e in zip(sources, emas, strict=True)]
        torch._foreach_lerp_(emas, sources, 1.0 - decay)

    @contextlib.contextmanager
    @torch.no_grad()  # around the swaps only: the block inside runs in the caller's grad mode
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run ``model`` with the EMA weights inside the block; its own weights come back bit-exactly.

        Collective (all ranks enter and leave together): plain sharded parameters are all-gathered.
        """
        if self._swapped:
            raise RuntimeError("ema.swapped() is already active; it does not nest")
        raise_if(
            not isinstance(model, nn.Module),
            TypeError,
            f"model={type(model).__name__}; allowed: the nn.Module this EMA was built from",
        )
        _reshard_fsdp(model)
        raise_if(
            not self._same_parameters(model),
            ValueError,
            f"model={type(model).__name__}: its parameters are not the ones this EMA was built from; pass "
            "the model the EMA was built from, after sharding (fully_shard replaces parameters)",
        )
        backups = [slot.local_param().clone() for slot in self._slots]
        self._swapped = True
        try:
            for slot in self._slots:
                if isinstance(slot.param, DTensor):
                    sharded = isinstance(slot.shadow, DTensor)
                    slot.local_param().copy_(slot.ema if sharded else _local_piece(slot.ema, slot.param))
                else:
                    slot.param.copy_(slot.full(slot.ema))
            yield model
        finally:
            self._swapped = False
            _reshard_fsdp(model)  # drop unsharded copies of the EMA weights (FSDP2 without reshard)
            for slot, backup in zip(self._slots, backups, strict=True):
                if isinstance(slot.param, DTensor):
                    slot.local_param().copy_(backup)
                else:
                    slot.param.copy_(slot.full(backup))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{clean name: EMA}``: DTensors when sharded, for ``torch.distributed.checkpoint``; no copies."""
        return {slot.name: slot.shadow for slot in self._slots}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load EMA values: DTensors (any layout), or full tensors such as ``full_state_dict()``'s."""
        raise_if(
            not isinstance(state_dict, Mapping),
            TypeError,
            f"state_dict={type(state_dict).__name__}; allowed: a mapping of name -> tensor",
        )
        raise_if(not isinstance(strict, bool), TypeError, f"strict={strict!r}; allowed: True or False")
        expected = {slot.name for slot in self._slots}
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected, key=str)
        if missing or (strict and unexpected):
            raise ValueError(
                f"state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                f"allowed: exactly the EMA's names, e.g. {sorted(expected)[:3]}"
            )
        for slot in self._slots:
            value = state_dict[slot.name]
            if not isinstance(value, torch.Tensor) or value.shape != slot.param.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict[{slot.name!r}]: shape {shape}; allowed: {tuple(slot.param.shape)}"
                )
            if value is slot.shadow:
                continue  # torch.distributed.checkpoint loaded in place
            if isinstance(value, DTensor):
                if (
                    isinstance(slot.shadow, DTensor)
                    and value.placements == slot.shadow.placements
                    and (value.device_mesh == slot.shadow.device_mesh)
                ):
                    slot.ema.copy_(value.to_local())
                    continue
                value = value.full_tensor()
            slot.ema.copy_(_local_piece(value, slot.shadow) if isinstance(slot.shadow, DTensor) else value)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated ``{clean name: tensor}`` on CPU on rank 0 (``{}`` elsewhere); collective.

        EMA parameters in the EMA dtype, plus the model's buffers and frozen parameters as they are
        now (floating ones in the EMA dtype), so the result loads into the unsharded model.
        """
        _reshard_fsdp(self._model)
        self._check_parameters(self._model, "full_state_dict()")
        keep = _rank() == 0
        out: dict[str, torch.Tensor] = {}
        for slot in self._slots:
            full = slot.full(slot.ema)
            if keep:
                out[slot.name] = full.to("cpu", copy=True)
        averaged = {id(slot.param): slot.name for slot in self._slots}
        for name, tensor in _followed_tensors(self._model):
            if id(tensor) in averaged:  # an averaged parameter, or a tied alias of one
                if keep:
                    out[_clean_name(self._model, name)] = out[averaged[id(tensor)]]
                continue
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
            if keep:
                dtype = self.dtype if full.is_floating_point() else full.dtype
                out[_clean_name(self._model, name)] = full.to("cpu", dtype=dtype, copy=True)
        return out

    def _same_parameters(self, model: nn.Module) -> bool:
        return all(a is b for a, b in itertools.zip_longest(model.parameters(), self._params))

    def _check_parameters(self, model: nn.Module, where: str) -> None:
        if self._same_parameters(model):
            return
        current = tuple(model.parameters())
        raise RuntimeError(
            f"ShardedEMA.{where}: the model's parameters are not the ones this EMA was built from "
            f"({len(current)} now, {len(self._params)} then). Build the EMA after sharding the model "
            "(fully_shard replaces parameters), pass the same model, and call update() after "
            "optimizer.step(), when FSDP2 holds its sharded parameters."
        )


def _followed_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters and persistent buffers, by raw name (what ``state_dict()`` would hold)."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            yield prefix + name, param
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield prefix + name, buffer


def _clean_name(model: nn.Module, name: str) -> str:
    """``name`` without DDP's ``module.``, torch.compile's ``_orig_mod.`` and checkpoint-wrapper parts."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    parts = name.split(".")
    kept = []
    module = model
    for part in parts[:-1]:
        if part not in _WRAPPER_ATTRIBUTES and not (part == "module" and isinstance(module, wrappers)):
            kept.append(part)
        module = module.get_submodule(part)
    return ".".join([*kept, parts[-1]])


def _local_piece(full: torch.Tensor, layout: DTensor) -> torch.Tensor:
    """This rank's piece of ``full`` laid out like ``layout``; no communication."""
    return distribute_tensor(full, layout.device_mesh, layout.placements, src_data_rank=None).to_local()


def _reshard_fsdp(model: nn.Module) -> None:
    """Make every FSDP2 module hold its sharded parameters (frees unsharded ones; local, no collective)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def raise_if(bad: bool, error: type[Exception], message: str | Callable[[], str]) -> None:
    """``if bad: raise error(message)``: the package's argument checks (on every rank, before any collective).

    ``message`` may be a zero-argument callable, called only when ``bad``: per-call checks format nothing.
    """
    if bad:
        raise error(message if isinstance(message, str) else message())
