"""Training helpers valid for every degree: gradient clipping, gradient accumulation, consolidated weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from litegen_zero._shard import _check_model


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients of ``model`` in place to a global norm of ``max_norm``; return that norm, shape ().

    Plain gradients (DDP, ZeRO-1, replicated layers under TP) are already complete on every rank; DTensor
    gradients (FSDP2, TP) get their norm reduced over their mesh, one group per layout. Every rank gets
    the same norm.
    ``max_norm``: > 0 (``inf``: measure only); ``norm_type``: > 0 or ``inf``.
    """
    _check_model(model)
    for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}={value!r}; allowed: a number > 0 (or inf)")
        if not value > 0:
            raise ValueError(f"{name}={value!r}; allowed: a number > 0 (or inf)")
    groups: dict[object, list[nn.Parameter]] = {}  # one group per DTensor layout (TP x FSDP mixes meshes)
    for p in model.parameters():
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in params], norm_type) for params in groups.values()]
    norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
    if not norms:
        return torch.tensor(0.0)
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), norm_type)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without communication, for the backward passes run inside.

    The first backward after the context synchronizes the accumulated gradients.
    """
    _check_model(model)
    module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the whole model's weights on CPU on rank 0 (clean names, as in the unwrapped model); {} elsewhere.

    A collective for sharded models: call it on every rank.
    """
    _check_model(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # torch hands out a CPU model's own tensors (and whole local shards): copy those, so the result is a snapshot
    local = [t.to_local() if isinstance(t, DTensor) else t for t in [*model.parameters(), *model.buffers()]]
    live = {t.untyped_storage().data_ptr() for t in local if t.device.type == "cpu"}
    return {k: v.clone() if v.untyped_storage().data_ptr() in live else v for k, v in state.items()}
