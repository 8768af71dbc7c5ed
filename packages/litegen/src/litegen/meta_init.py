"""Models built on the meta device: check what can fill them, then allocate and initialise only local shards.

``with torch.device("meta"): model = Model()`` builds no storage. ``initialize()`` checks it first
(``check_meta_model``, on every rank before any collective), shards it (FSDP2 works on meta
parameters), then ``materialize_meta`` allocates each rank's local shards with ``to_empty`` and fills
them from the modules' initialisers; ``init_from`` weights are loaded after that, by the facade.

"The modules' initialisers": every module that holds parameters of its own and defines
``reset_parameters()`` (torch's Linear, Conv*, LayerNorm, GroupNorm, Embedding, ...; diffusers or user
modules that define it), run in ``model.modules()`` order under one seed, on full-size CPU tensors
of that module's own parameters; each rank copies its slice. The result is deterministic, the same on
every rank and for every ZeRO degree, and NOT equal to a CPU-built model, whose constructor may run
custom init (e.g. zeroed output layers): only ``init_from`` makes the two equal.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

logger = logging.getLogger("litegen")

_SHOWN = 5  # names listed in an error


def check_meta_model(model: nn.Module, *, from_file: bool) -> bool:
    """Whether ``model`` has meta tensors; raises ValueError naming those nothing would fill.

    Without ``init_from`` (``from_file=False``) every meta parameter needs a module initialiser and
    no buffer may be on meta; with it, only non-persistent meta buffers (never saved) are refused.
    """
    covered = {id(p) for m in model.modules() if _has_initialiser(m) for p in m.parameters(recurse=False)}
    params = [(n, p) for n, p in model.named_parameters() if p.is_meta]
    buffers = [
        (f"{prefix}{'.' if prefix else ''}{name}", name in m._non_persistent_buffers_set)
        for prefix, m in model.named_modules()
        for name, b in m._buffers.items()
        if b is not None and b.is_meta
    ]
    if not params and not buffers:
        return False
    unfilled = [] if from_file else [n for n, p in params if id(p) not in covered]
    unloaded = [] if from_file else [n for n, non_persistent in buffers if not non_persistent]
    lost = [n for n, non_persistent in buffers if non_persistent]
    names = unfilled + unloaded + lost
    if names:
        why = []
        if unfilled or unloaded:
            why.append(
                "parameters of modules without reset_parameters() and buffers on meta must come from "
                "init_from (a .safetensors file, a *.safetensors.index.json or a diffusers / transformers "
                "model folder)"
            )
        if lost:
            why.append(
                f"non-persistent buffers ({lost[:_SHOWN]}) are never saved, so no file can fill them: build "
                "buffers on a real device (parameters only on meta, like accelerate.init_empty_weights()) "
                "or load them into the model before initialize()"
            )
        raise ValueError(
            f"initialize: {len(names)} meta-device tensor(s) have nothing to fill them: {names[:_SHOWN]}"
            f"{' ...' if len(names) > _SHOWN else ''}; " + "; ".join(why)
        )
    return True


def materialize_meta(model: nn.Module, device: torch.device, *, seed: int, reset: bool) -> None:
    """Allocate the meta tensors of ``model`` (local shards only) on ``device``; ``reset``: fill those parameters.

    Real tensors keep their values. Each module initialiser sees full-size CPU tensors of its own parameters
    (one module at a time, under ``seed``; the global RNG is restored after) and each rank keeps its slice.
    """
    was_meta = {id(p) for p in model.parameters() if p.is_meta}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(
        True
    )  # the same Parameter objects: optimizers hold them
    try:
        model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if not reset:
        return
    count = 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            if not _has_initialiser(module) or not any(id(p) in was_meta for p in own.values()):
                continue
            full = {name: torch.empty(p.shape, dtype=p.dtype) for name, p in own.items()}
            try:
                for name, tensor in full.items():
                    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
                module.reset_parameters()
            finally:
                module._parameters.update(own)
            for name, param in own.items():
                if id(param) in was_meta:
                    _copy_owned(full[name], param)
            count += 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("meta model: %d modules initialised by their reset_parameters() (seed %d)", count, seed)


def _has_initialiser(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None))


def _copy_owned(full: torch.Tensor, target: torch.Tensor) -> None:
    """Copy the part of ``full`` (the whole tensor, on CPU) that ``target`` holds on this rank."""
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        target.to_local().copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))])
    else:
        target.copy_(full)
