"""Sliced, data-parallel and compiled encoders for frozen VAEs.

Each wrapper takes ``fn(x, *args, **kwargs)`` whose ``x`` is a tensor with its batch on ``dim`` (dim 0
for images ``(b, c, h, w)``, dim 2 for the frames of a video ``(b, c, t, h, w)``) and whose output is a
tensor or a pytree of tensors, and returns a function with the same call whose output equals
``fn(x, ...)``; every output tensor is concatenated on ``dim``. Output containers: tuples, lists,
dicts, namedtuples, registered pytree classes (diffusers' ``ModelOutput``), dataclasses and plain
objects through their attributes (diffusers' ``DiagonalGaussianDistribution``); non-tensor values in
them (None, bool, int, float, str, dtype, device) must not depend on the batch. The wrappers compose
in any order; compile innermost, ``data_parallel(sliced(compiled(fn), n))``, so that the slicing loop
and the collectives stay eager (``compiled`` compiles whatever it is given).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

Encode = Callable[..., Any]
_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def sliced(fn: Encode, slice_size: int, dim: int = 0) -> Encode:
    """Call ``fn`` on micro-batches of at most ``slice_size`` items along ``dim`` and concatenate.

    Bounds the peak activation memory to that of ``slice_size`` items. ``x``: ``(..., batch, ...)``
    with the batch on ``dim``; extra arguments go unchanged to every call. Gradients flow.
    """
    _check_callable(fn, "sliced")
    _check_int(slice_size, "sliced", "slice_size", minimum=1)
    _check_int(dim, "sliced", "dim")

    @functools.wraps(fn, updated=())
    def sliced_fn(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch_dim = _batch_dim(x, dim, "sliced")
        if x.size(batch_dim) <= slice_size:
            return fn(x, *args, **kwargs)
        outputs = [fn(part, *args, **kwargs) for part in x.split(slice_size, batch_dim)]
        return _concatenate(outputs, dim, "sliced", tuple(x.shape))

    return sliced_fn


def data_parallel(fn: Encode, group: dist.ProcessGroup | None = None, dim: int = 0) -> Encode:
    """Split the batch on ``dim`` over the ranks of ``group``; each encodes its part, then all gather.

    Every rank passes the same full ``x`` and gets the full output, equal to ``fn(x)``. Splits may be
    uneven (like ``tensor_split``); a rank whose part is empty encodes one item to learn the output's
    layout and discards it. ``group=None``: the default world, or a plain call when torch.distributed
    is not initialized. The gathered outputs carry no gradients: a frozen VAE's encode needs none
    (call it under ``torch.no_grad()``).
    """
    _check_callable(fn, "data_parallel")
    _check_group(group)
    _check_int(dim, "data_parallel", "dim")

    @functools.wraps(fn, updated=())
    def data_parallel_fn(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch_dim = _batch_dim(x, dim, "data_parallel")
        if group is None and not (dist.is_available() and dist.is_initialized()):
            return fn(x, *args, **kwargs)
        pg = dist.group.WORLD if group is None else group
        world, rank, total = dist.get_world_size(pg), dist.get_rank(pg), x.size(batch_dim)
        if world == 1 or total == 0:
            return fn(x, *args, **kwargs)
        counts = [total // world + (r < total % world) for r in range(world)]
        mine = counts[rank]
        part = x.narrow(batch_dim, sum(counts[:rank]), mine) if mine else x.narrow(batch_dim, 0, 1)
        leaves, rebuild = _flatten(fn(part, *args, **kwargs))
        tensors = {
            i: _output_dim(leaf, dim, i, "data_parallel")
            for i, leaf in enumerate(leaves)
            if isinstance(leaf, torch.Tensor)
        }
        constants = [leaf for i, leaf in enumerate(leaves) if i not in tensors]
        lengths = [leaves[i].size(d) if mine else 0 for i, d in tensors.items()]
        device = leaves[next(iter(tensors))].device if tensors else x.device
        # One small collective checks the batch sizes and constants and exchanges the part lengths.
        meta = torch.tensor([total, zlib.crc32(repr(constants).encode()), *lengths], device=device)
        rows = _all_gather_rows(meta, pg).tolist()
        if any(row[0] != total for row in rows):
            raise ValueError(
                f"data_parallel: the ranks of the group passed batches of {[row[0] for row in rows]} "
                f"items on dim {dim}; every rank must pass the same full batch"
            )
        raise_if(
            any(row[1] != rows[0][1] for row in rows),
            ValueError,
            lambda: (
                f"data_parallel: fn's non-tensor outputs {constants!r} differ between ranks; "
                "non-tensor outputs must not depend on the batch"
            ),
        )
        for column, (i, d) in enumerate(tensors.items()):
            local = leaves[i].detach() if mine else leaves[i].detach().narrow(d, 0, 0)
            leaves[i] = _all_gather_cat(local, [row[2 + column] for row in rows], d, pg)
        return rebuild(leaves)

    return data_parallel_fn


def compiled(fn: Encode, **compile_kwargs: Any) -> Encode:
    """``torch.compile(fn, dynamic=True, fullgraph=False, **compile_kwargs)``, eager when unavailable.

    Apply it innermost (``sliced(compiled(fn), n)``): wrapped around ``sliced`` or ``data_parallel`` it
    would compile their loop and collectives too. When torch.compile is unsupported, or compiling fails (no C++ compiler, no Triton, a failing backend),
    ``fn`` runs eagerly from then on after one logged warning. Keep random
    sampling out of ``fn`` (return the distribution's parameters, sample afterwards).
    """
    _check_callable(fn, "compiled")
    _check_compile_options(compile_kwargs)
    import torch._dynamo  # noqa: F401 - torch.compile imports it anyway; here for is_dynamo_supported
    from torch._dynamo.exc import TorchDynamoException

    if not torch._dynamo.is_dynamo_supported():
        _log_fallback(fn, "torch.compile does not support this platform or Python version")
        return fn
    # Defaults for encoders: one graph for every batch size (the last uneven slice or rank part does not
    # recompile), graph breaks allowed.
    options = {"dynamic": True, "fullgraph": False, **compile_kwargs}
    try:
        compiled_fn = torch.compile(fn, **options)
    except RuntimeError as error:  # e.g. an unknown mode
        raise ValueError(f"compiled: torch.compile refused the options {options}: {error}") from error
    eager = False

    @functools.wraps(fn, updated=())
    def compiled_or_eager(*args: Any, **kwargs: Any) -> Any:
        nonlocal eager
        if not eager:
            try:
                return compiled_fn(*args, **kwargs)
            except TorchDynamoException as error:
                eager = True
                _log_fallback(fn, " ".join(str(error).strip().split("\n\n")[0].split()))
        return fn(*args, **kwargs)

    return compiled_or_eager


def _log_fallback(fn: Encode, reason: str) -> None:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    logger.log(
        logging.WARNING if rank == 0 else logging.DEBUG,
        "compiled: %s; running %s eagerly",
        reason,
        getattr(fn, "__qualname__", type(fn).__name__),
    )


def _all_gather_rows(row: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``row``: (k,) on every rank -> (world, k)."""
    rows = row.new_empty(dist.get_world_size(group) * row.numel())
    dist.all_gather_into_tensor(rows, row, group=group)
    return rows.view(-1, row.numel())


def _all_gather_cat(
    local: torch.Tensor, lengths: list[int], dim: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """Concatenate every rank's ``local`` on ``dim``; rank r's has ``lengths[r]`` items there."""
    longest = max(lengths)
    if longest == 0:
        return local
    front = local.movedim(dim, 0)
    if front.size(0) < longest:  # all_gather_into_tensor needs equal sizes: pad, gather, trim
        front = torch.cat([front, front.new_zeros((longest - front.size(0), *front.shape[1:]))])
    gathered = front.new_empty((len(lengths) * longest, *front.shape[1:]))
    dist.all_gather_into_tensor(gathered, front.contiguous(), group=group)
    if min(lengths) < longest:
        gathered = torch.cat(
            [part[:length] for part, length in zip(gathered.split(longest), lengths, strict=True)]
        )
    return gathered.movedim(0, dim).contiguous()


def _flatten(output: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The leaves (tensors and constants) of ``output``, and a function rebuilding it from new leaves."""
    nodes, spec = tree_flatten(output)
    leaves: list[Any] = []
    rebuilders: list[tuple[int, Callable[[list[Any]], Any] | None]] = []
    for node in nodes:
        if isinstance(node, (torch.Tensor, *_CONSTANT_TYPES)):
            leaves.append(node)
            rebuilders.append((1, None))
            continue
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.init}
        elif hasattr(node, "__dict__"):
            fields = dict(vars(node))
        else:
            raise TypeError(
                f"fn returned a {type(node).__name__}, which is neither a tensor, a container of "
                f"tensors, an object with tensor attributes nor one of {[t.__name__ for t in _CONSTANT_TYPES]}"
            )
        children, rebuild_fields = _flatten(fields)
        leaves += children
        rebuilders.append((len(children), functools.partial(_rebuild_object, node, rebuild_fields)))

    def rebuild_output(new_leaves: list[Any]) -> Any:
        new_nodes, start = [], 0
        for count, rebuild in rebuilders:
            chunk = new_leaves[start : start + count]
            new_nodes.append(chunk[0] if rebuild is None else rebuild(chunk))
            start += count
        return tree_unflatten(new_nodes, spec)

    return leaves, rebuild_output


def _rebuild_object(obj: Any, rebuild_fields: Callable[[list[Any]], dict], new_leaves: list[Any]) -> Any:
    """``obj`` with its dataclass fields, or else its attributes, rebuilt from ``new_leaves``."""
    fields = rebuild_fields(new_leaves)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **fields)
    new = copy.copy(obj)
    vars(new).update(fields)
    return new


def _concatenate(outputs: list[Any], dim: int, wrapper: str, shape: tuple[int, ...]) -> Any:
    """One output from the outputs of consecutive slices of a batch ``x`` of ``shape``: tensors concatenated on
    ``dim``, constants checked equal."""
    parts = [_flatten(output) for output in outputs]
    columns = list(zip(*(leaves for leaves, _ in parts), strict=False))
    raise_if(
        any(len(leaves) != len(columns) for leaves, _ in parts),
        ValueError,
        lambda: (
            f"{wrapper}: fn returned outputs of different structures for the slices of x of shape {shape}; it "
            "must return the same structure for every batch"
        ),
    )
    combined = []
    for index, column in enumerate(columns):
        if isinstance(column[0], torch.Tensor):
            combined.append(torch.cat(column, _output_dim(column[0], dim, index, wrapper)))
        elif any(value != column[0] for value in column):
            raise ValueError(
                f"{wrapper}: fn's non-tensor output {index} differs between slices "
                f"({list(column)}); non-tensor outputs must not depend on the batch"
            )
        else:
            combined.append(column[0])
    return parts[0][1](combined)


def _check_compile_options(options: dict[str, Any]) -> None:
    """torch.compile's keywords, checked here: torch asserts on some values and accepts others silently."""
    allowed = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    for name, value in options.items():
        raise_if(
            name not in allowed,
            TypeError,
            f"compiled: {name}={value!r} is not a torch.compile option; allowed: {allowed}",
        )
    for name, kinds in (("fullgraph", (bool,)), ("dynamic", (bool, type(None))), ("mode", (str, type(None)))):
        if name in options and not isinstance(options[name], kinds):
            raise TypeError(
                f"compiled: {name}={options[name]!r}; allowed: {' or '.join(k.__name__ for k in kinds)}"
            )


def _check_callable(fn: Any, wrapper: str) -> None:
    raise_if(
        not callable(fn),
        TypeError,
        f"{wrapper}: fn must be callable (e.g. lambda x: vae.encode(x).latent_dist.mode()), "
        f"got {type(fn).__name__}",
    )


def _check_int(value: Any, wrapper: str, name: str, minimum: int | None = None) -> None:
    raise_if(
        isinstance(value, bool) or not isinstance(value, int),
        TypeError,
        f"{wrapper}: {name}={value!r} ({type(value).__name__}); allowed: an int",
    )
    raise_if(
        minimum is not None and value < minimum,
        ValueError,
        f"{wrapper}: {name}={value}; allowed: an int >= {minimum}",
    )


def _check_group(group: Any, wrapper: str = "data_parallel") -> None:
    if group is None:
        return
    raise_if(
        dist.is_available() and group is dist.GroupMember.NON_GROUP_MEMBER,
        ValueError,
        f"{wrapper}: group={group!r} is what new_group returns to ranks outside the "
        "new group: this process is not in it; pass a group that holds this rank, or None",
    )
    raise_if(
        not dist.is_available() or not isinstance(group, dist.ProcessGroup),
        TypeError,
        f"{wrapper}: group={group!r} ({type(group).__name__}); allowed: a "
        "torch.distributed.ProcessGroup or None (the default world)",
    )
    raise_if(
        not dist.is_initialized(),
        ValueError,
        f"{wrapper}: a group was given but torch.distributed is not initialized",
    )


def _batch_dim(x: Any, dim: int, wrapper: str) -> int:
    raise_if(
        not isinstance(x, torch.Tensor),
        TypeError,
        lambda: f"{wrapper}: x must be a torch.Tensor, got {type(x).__name__}",
    )
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{wrapper}: dim={dim} is out of range for x of shape {tuple(x.shape)}; "
            f"allowed: {-x.dim()}..{x.dim() - 1}"
        )
    return dim % x.dim()


def _output_dim(leaf: torch.Tensor, dim: int, index: int, wrapper: str) -> int:
    if not -leaf.dim() <= dim < leaf.dim():
        raise ValueError(
            f"{wrapper}: fn's output tensor {index} has shape {tuple(leaf.shape)}: it cannot be "
            f"concatenated on dim={dim}; every output tensor must hold the batch on dim {dim}"
        )
    return dim % leaf.dim()


def raise_if(bad: bool, error: type[Exception], message: str | Callable[[], str]) -> None:
    """``if bad: raise error(message)``: the package's argument checks (on every rank, before any collective).

    ``message`` may be a zero-argument callable, called only when ``bad``: per-call checks format nothing.
    """
    if bad:
        raise error(message if isinstance(message, str) else message())
