"""Shard a model with torch.distributed: DDP, ZeroRedundancyOptimizer (ZeRO-1) and FSDP2 (ZeRO-2/3).

Every argument is checked on the local rank first, so bad input raises the same error on every rank
before the first collective; only then are meshes, process groups and wrappers built.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from types import MappingProxyType

import torch
import torch.distributed as dist
from torch import nn
from torch._guards import active_fake_mode
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

Blocks = Sequence[type[nn.Module] | nn.Module]
OptimizerFactory = Callable[[list[nn.Parameter]], Optimizer]
DtypeLike = torch.dtype | str | None

_DTYPES = MappingProxyType(
    {
        "fp32": torch.float32,
        "float32": torch.float32,
        torch.float32: torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        torch.bfloat16: torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        torch.float16: torch.float16,
    }
)
_DEGREES = MappingProxyType(
    {
        0: "DDP",
        1: "DDP + ZeroRedundancyOptimizer (ZeRO-1)",
        2: "FSDP2 without reshard after forward (ZeRO-2)",
        3: "FSDP2 full sharding (ZeRO-3)",
    }
)
_MESH_DIMS = ("replicate", "shard")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the members of every ``nn.ModuleList`` whose members share one type.

    Searched outermost first: the members of a matching list are not searched further.
    """
    _check_model(model)
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            kinds = {type(m) for m in child} if isinstance(child, nn.ModuleList) else set()
            if len(kinds) == 1 and not issubclass(next(iter(kinds)), _CONTAINERS):
                blocks.extend(m for m in child if all(m is not b for b in blocks))
            else:
                visit(child)

    visit(model)
    return blocks


def shard(
    model: nn.Module,
    optimizer: Optimizer | OptimizerFactory,
    *,
    degree: int,
    group_size: int | bool | None = None,
    mesh: DeviceMesh | None = None,
    param_dtype: DtypeLike = None,
    reduce_dtype: DtypeLike = None,
    offload: bool = False,
    blocks: Blocks | None = None,
) -> tuple[nn.Module, Optimizer]:
    """Shard ``model`` for ZeRO ``degree`` 0-3 and rebuild ``optimizer`` on the new parameters.

    degree 0: DDP; 1: DDP + ZeroRedundancyOptimizer; 2: FSDP2, parameters kept gathered from forward to
    backward; 3: FSDP2 full sharding, inside groups of ``group_size`` ranks (True: the node size) and
    replicated across them. FSDP2 shards each block (``blocks``: module types or instances; default
    ``find_blocks(model)``), then the root. ``optimizer`` is an optimizer built on the unsharded model
    (same class, param groups and hyper-parameters are kept; it must not hold state yet) or a factory
    ``params -> Optimizer``. ``param_dtype`` (degree 2/3) and ``reduce_dtype``: fp32 / bf16 / fp16.
    ``offload`` (degree 3) keeps sharded parameters, gradients and optimizer state on the CPU.
    All ranks must call it with the same arguments and identical initial weights.
    Returns the wrapped model (DDP for degree 0/1, the same module for 2/3) and the new optimizer.
    """
    _check_model(model)
    world = _world_size()
    raise_if(
        not isinstance(degree, int) or isinstance(degree, bool) or degree not in _DEGREES,
        ValueError,
        f"degree={degree!r}; allowed: 0 (DDP), 1 (ZeRO-1), 2 (ZeRO-2), 3 (ZeRO-3)",
    )
    raise_if(
        group_size not in (None, False) and degree != 3,
        ValueError,
        f"group_size={group_size!r} with degree={degree}; group_size needs degree=3",
    )
    group_size = _check_layout(group_size, mesh, world)
    param_dtype = _check_dtype("param_dtype", param_dtype)
    reduce_dtype = _check_dtype("reduce_dtype", reduce_dtype)
    raise_if(
        degree < 2 and param_dtype not in (None, torch.float32),
        ValueError,
        f"param_dtype={param_dtype} with degree={degree}; low-precision parameters need degree 2 or 3 "
        "(FSDP2 MixedPrecisionPolicy); with DDP run the forward under torch.autocast instead",
    )
    raise_if(
        not isinstance(offload, bool) or (offload and degree != 3),
        ValueError,
        f"offload={offload!r} with degree={degree}; allowed: False, or True with degree=3",
    )
    raise_if(
        not any(p.requires_grad for p in model.parameters()),
        ValueError,
        f"model {type(model).__name__} has no trainable parameter (requires_grad=True)",
    )
    groups = _groups_by_name(optimizer, model, degree)
    units = _resolve_blocks(model, blocks)

    if degree <= 1:
        model = _wrap_ddp(model, mesh, reduce_dtype)
        inner = getattr(model, "module", model)
    else:
        offload_policy = (
            CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
        )
        options = {
            "mesh": mesh if mesh is not None else _default_mesh(world, group_size),
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            "offload_policy": offload_policy,
        }
        for unit in reversed(units):  # reverse pre-order: nested units before the modules holding them
            fully_shard(unit, reshard_after_forward=degree == 3, **options)
        fully_shard(model, reshard_after_forward=None if degree == 3 else False, **options)
        inner = model
    optimizer = _rebuild_optimizer(optimizer, groups, dict(inner.named_parameters()), model, degree)
    if dist.get_rank() == 0:
        logger.info(
            "shard: degree %d = %s over %d ranks, %d block units + root, param_dtype=%s, "
            "reduce_dtype=%s, offload=%s",
            degree,
            _DEGREES[degree],
            world,
            len(units) if degree >= 2 else 0,
            param_dtype,
            reduce_dtype,
            offload,
        )
    return model, optimizer


def shard_frozen(
    model: nn.Module,
    *,
    group_size: int | bool | None = None,
    mesh: DeviceMesh | None = None,
    dtype: DtypeLike = None,
    blocks: Blocks | None = None,
) -> nn.Module:
    """Shard an untrainable model (e.g. a text encoder) with FSDP2: each rank keeps only its shard at rest.

    Parameters are frozen (requires_grad=False) and cast to ``dtype`` (fp32 / bf16 / fp16) if given;
    each block's parameters are gathered for its forward and freed right after. Sharded over all ranks, or
    inside groups of ``group_size`` ranks (True: the node size), or over ``mesh``. Returns ``model``.
    """
    _check_model(model)
    world = _world_size()
    group_size = _check_layout(group_size, mesh, world)
    dtype = _check_dtype("dtype", dtype)
    units = _resolve_blocks(model, blocks)

    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    mesh = mesh if mesh is not None else _default_mesh(world, group_size)
    for unit in [*reversed(units), model]:  # explicit for the root too: it frees its shards as well
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    return model


def _check_model(model: object) -> None:
    raise_if(
        not isinstance(model, nn.Module),
        TypeError,
        lambda: f"model={type(model).__name__}; allowed: a torch.nn.Module",
    )


def _world_size() -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "litegen_zero needs a process group: call torch.distributed.init_process_group() first "
            "(torchrun sets the environment; a single process can use world_size=1)"
        )
    return dist.get_world_size()


def _device_type() -> str:
    """ "cuda" when CUDA exists and the default backend is NCCL, else "cpu"."""
    return "cuda" if torch.cuda.is_available() and "nccl" in str(dist.get_backend()) else "cpu"


def _check_layout(group_size: int | bool | None, mesh: DeviceMesh | None, world: int) -> int | None:
    """The shard-group size asked for (True: LOCAL_WORLD_SIZE), checked to divide the world size, or the
    ``mesh`` to shard over (not both); returns the group size."""
    if group_size is True:
        group_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if group_size is not None and group_size is not False:
        if not isinstance(group_size, int) or group_size < 1 or world % group_size:
            divisors = [k for k in range(1, world + 1) if world % k == 0]
            raise ValueError(
                f"group_size={group_size!r} does not divide the world size {world}; allowed: {divisors}, "
                "True (the node size, LOCAL_WORLD_SIZE) or None"
            )
    if mesh is None:
        return group_size or None
    raise_if(
        not isinstance(mesh, DeviceMesh),
        TypeError,
        f"mesh={mesh!r}; allowed: None or a torch.distributed.device_mesh.DeviceMesh",
    )
    raise_if(
        group_size not in (None, False),
        ValueError,
        f"group_size={group_size} and mesh={mesh} both given; pass one of them",
    )
    if mesh.ndim != 1 and (mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != _MESH_DIMS):
        raise ValueError(
            f"mesh has shape {tuple(mesh.shape)} and dims {mesh.mesh_dim_names}; allowed: a 1-D mesh "
            f"(shard over it) or a 2-D mesh with dims {_MESH_DIMS} (shard within, replicate across)"
        )
    if mesh.get_coordinate() is None:
        raise ValueError(f"rank {dist.get_rank()} is not in mesh {mesh}; every calling rank must be in it")
    return None


def _check_dtype(name: str, value: DtypeLike) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, (str, torch.dtype)) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(
        f"{name}={value!r}; allowed: None, torch.float32 / bfloat16 / float16 or 'fp32' / 'bf16' / 'fp16'"
    )


def _resolve_blocks(model: nn.Module, blocks: Blocks | None) -> list[nn.Module]:
    """The shard units below the root, in pre-order: ``find_blocks(model)`` or the named types / modules."""
    if blocks is None:
        return find_blocks(model)
    items = list(blocks) if isinstance(blocks, (list, tuple, nn.ModuleList)) else [blocks]
    below_root = [m for m in model.modules() if m is not model]
    for item in items:
        is_type = isinstance(item, type) and issubclass(item, nn.Module)
        found = is_type and any(isinstance(m, item) for m in below_root)
        found = found or any(m is item for m in below_root)
        container = issubclass(item, _CONTAINERS) if is_type else isinstance(item, _CONTAINERS)
        if not found or container:  # the message only then: a block's repr is the whole block
            raise ValueError(
                f"blocks entry {item!r} is not in the model; allowed: nn.Module subclasses with instances "
                "inside the model, or submodules of it (not the root, not a ModuleList / ModuleDict)"
            )
    kinds = tuple(item for item in items if isinstance(item, type))
    return [m for m in below_root if isinstance(m, kinds) or any(m is item for item in items)]


def _groups_by_name(
    optimizer: Optimizer | OptimizerFactory, model: nn.Module, degree: int
) -> list[dict] | None:
    """The optimizer's param groups with the parameters' FQNs in ``model`` in place of parameters (None for a
    factory), checked to be rebuildable."""
    if not isinstance(optimizer, Optimizer):
        if callable(optimizer):
            return None
        raise TypeError(
            f"optimizer={optimizer!r}; allowed: a torch.optim.Optimizer or a factory params -> Optimizer"
        )
    if optimizer.state:
        raise ValueError(
            f"optimizer {type(optimizer).__name__} already holds state for {len(optimizer.state)} parameters; "
            "shard() rebuilds it empty: build it, or load its checkpoint, after shard()"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        foreign = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if foreign:
            raise ValueError(
                f"optimizer param group {index} holds {len(foreign)} parameter(s) not in the model "
                f"(shapes {foreign[:3]}); allowed: parameters of the model passed to shard()"
            )
        groups.append({**group, "params": [names[id(p)] for p in group["params"]]})
    _check_optimizer_class(type(optimizer), degree)
    return groups


def _rebuild_optimizer(
    optimizer: Optimizer | OptimizerFactory,
    groups: list[dict] | None,
    new_params: dict[str, nn.Parameter],
    model: nn.Module,
    degree: int,
) -> Optimizer:
    """Build the optimizer class on the new parameters with the same groups; ZeRO-1 partitions its state."""
    if groups is None:
        optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
        raise_if(
            not isinstance(optimizer, Optimizer),
            TypeError,
            f"the optimizer factory returned {type(optimizer).__name__}; allowed: a torch.optim.Optimizer",
        )
        _check_optimizer_class(type(optimizer), degree)
        if degree != 1:
            return optimizer
        groups = optimizer.param_groups
    else:
        groups = [{**g, "params": [new_params[name] for name in g["params"]]} for g in groups]
    cls = type(optimizer)
    signature = inspect.signature(cls).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if open_kwargs or k in signature}
    if degree != 1:
        return cls(groups, **defaults)
    group = getattr(model, "process_group", None)  # DDP's; None (the world) for a model traced unwrapped
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=group, **defaults)


def _check_optimizer_class(cls: type[Optimizer], degree: int) -> None:
    if degree >= 2 and issubclass(cls, torch.optim.Adafactor):
        raise ValueError(
            f"optimizer {cls.__name__} with degree={degree}: torch's Adafactor cannot step on FSDP2's sharded "
            "DTensor parameters (its factored statistics reduce over the sharded dim); allowed: degree 0 or 1"
        )


def _wrap_ddp(model: nn.Module, mesh: DeviceMesh | None, reduce_dtype: torch.dtype | None) -> nn.Module:
    """DDP over the default group or all ranks of ``mesh``; ``reduce_dtype`` bf16/fp16 compresses all-reduces.

    Under a ``FakeTensorMode`` (memory planning) the model is returned unwrapped: DDP's C++ reducer cannot take
    fake tensors, and with ``gradient_as_bucket_view`` its buckets are the gradients, so the memory is the same.
    """
    group = None if mesh is None else (mesh if mesh.ndim == 1 else mesh._flatten()).get_group()
    if active_fake_mode() is not None:
        return model
    device_ids = [torch.cuda.current_device()] if _device_type() == "cuda" else None
    if device_ids:
        model.to(device_ids[0])
    ddp = DistributedDataParallel(
        model, device_ids=device_ids, process_group=group, gradient_as_bucket_view=True
    )
    hooks = {
        torch.bfloat16: default_hooks.bf16_compress_hook,
        torch.float16: default_hooks.fp16_compress_hook,
    }
    if reduce_dtype in hooks:
        ddp.register_comm_hook(group, hooks[reduce_dtype])
    return ddp


def _default_mesh(world: int, group_size: int | None) -> DeviceMesh:
    """All ranks in 1-D, or ``(world / group_size, group_size)`` named ("replicate", "shard")."""
    if group_size is None:
        return init_device_mesh(_device_type(), (world,))
    return init_device_mesh(_device_type(), (world // group_size, group_size), mesh_dim_names=_MESH_DIMS)


def raise_if(bad: bool, error: type[Exception], message: str | Callable[[], str]) -> None:
    """``if bad: raise error(message)``: the package's argument checks (on every rank, before any collective).

    ``message`` may be a zero-argument callable, called only when ``bad``: per-call checks format nothing.
    """
    if bad:
        raise error(message if isinstance(message, str) else message())
