"""Weights in and out as safetensors: consolidated export with clean names, sharded slice-wise import."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .checkpointer import INFO_FILE, latest_directory, verify_checkpoint
from .storage import agree, disk_full, read_checkpoint, read_metadata

logger = logging.getLogger(__name__)


def export_safetensors(source: Any, path: str | os.PathLike, *, name: str = "model") -> None:
    """Write consolidated weights with clean names (no DDP / FSDP / checkpoint-wrapper prefixes) to ``path``.

    ``source`` is one of:
      - a live model of any degree: gathered to rank 0's CPU, which writes (call on every rank);
      - an EMA-like object with ``full_state_dict()`` (call on every rank; rank 0 writes);
      - a checkpoint directory (a ``Checkpointer`` root, meaning its latest, or a ``step_<N>`` directory):
        the tensors saved under the keyword ``name`` (``"model"``, ``"ema"``, ...) are read by rank 0; an
        EMA keyed by the model's names gets the model's buffers and frozen parameters added.
    The file loads with ``safetensors.torch.load_file`` and into a diffusers / transformers model of the
    same architecture.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}; expected a str or os.PathLike to the .safetensors file to write")
    if not isinstance(name, str):
        raise TypeError(f"name={name!r}; expected the str keyword the entry was saved under, e.g. 'model'")
    if Path(path).is_dir():
        raise ValueError(
            f"path={str(path)!r} is a directory; expected the path of the .safetensors file to write"
        )
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if isinstance(source, nn.Module):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        tensors = get_model_state_dict(source, options=options)
    elif callable(getattr(source, "full_state_dict", None)):
        tensors = source.full_state_dict()
    elif isinstance(source, (str, os.PathLike)):
        directory, names = _checkpoint_entry(Path(source), name)
        tensors = {}
    else:
        raise TypeError(
            f"source={type(source).__name__}: expected an nn.Module, an object with full_state_dict(), "
            "or a checkpoint directory path"
        )
    problem = None
    if rank == 0:  # rank 0 reads (a checkpoint) and writes; the others learn how it went, not by a timeout
        try:
            if isinstance(source, (str, os.PathLike)):
                tensors = _read_checkpoint(directory, names)
            _write(tensors, Path(path))
            logger.info(f"exported {len(tensors)} tensors to {path}")
        except (OSError, ValueError) as error:
            problem = (disk_full(error, Path(path)) if isinstance(error, OSError) else None) or error
    agree(problem)


def load_safetensors(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load weights from a safetensors file into a plain or sharded model (parameters and buffers).

    Each rank reads only the slices of the file its DTensor shards own; plain tensors are read whole.
    ``strict``: the file's names must equal the model's (clean FQNs); otherwise only common names load.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__}; expected an nn.Module")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}; expected a str or os.PathLike to a .safetensors file")
    if not isinstance(strict, bool):
        raise TypeError(f"strict={strict!r}; expected True or False")
    path = Path(path)
    state = get_model_state_dict(model)
    names, problem = [], None
    try:  # each rank reads its own slices: a file one node lacks fails every rank, with that node's message
        if not path.is_file():
            raise FileNotFoundError(f"path={str(path)!r} is not a safetensors file")
        names = _load_into(state, path, strict)
    except SafetensorError as error:  # not a safetensors file (a pickle, say), or a truncated one
        problem = ValueError(
            f"path={str(path)!r} is not a valid safetensors file ({error}); weights are read only from "
            "safetensors files, never unpickled"
        )
    except (OSError, ValueError) as error:
        problem = error
    agree(problem)
    set_model_state_dict(model, {key: state[key] for key in names}, options=StateDictOptions(strict=strict))


def _load_into(state: dict[str, torch.Tensor], path: Path, strict: bool) -> list[str]:
    """Check names and shapes against the file, copy each tensor's owned part into ``state``; the names loaded."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        stored = set(f.keys())
        missing, unexpected = sorted(set(state) - stored), sorted(stored - set(state))
        if strict and (missing or unexpected):
            raise ValueError(
                f"{path} does not match the model (strict=True): missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        names = [key for key in state if key in stored]
        for key in names:
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(state[key].shape):
                raise ValueError(
                    f"{key}: {path} holds shape {shape}, the model has shape {tuple(state[key].shape)}"
                )
        with torch.no_grad():
            for key in names:
                _read_owned(f, key, state[key])
    return names


def _read_owned(f: Any, key: str, target: torch.Tensor) -> None:
    """Copy the part of tensor ``key`` that ``target`` holds on this rank (its shard, or all of it)."""
    if isinstance(target, DTensor) and target.dim() > 0:
        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        target.to_local().copy_(
            f.get_slice(key)[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
        )
    elif isinstance(target, DTensor):
        target.to_local().copy_(f.get_tensor(key))
    else:
        target.copy_(f.get_tensor(key))


def _checkpoint_entry(source: Path, name: str) -> tuple[Path, dict[str, str]]:
    """The checkpoint directory ``source`` means and ``{stored key: exported name}`` (checked on every rank).

    An entry other than the model (an EMA) that is keyed by the model's names is completed with the
    model's other tensors (buffers, frozen parameters), so the file holds a whole model.
    """
    if (source / INFO_FILE).is_file():
        directory = source
    else:
        directory = latest_directory(source) if source.is_dir() else None
        if directory is None:
            raise FileNotFoundError(
                f"source={str(source)!r} is neither a checkpoint directory nor a root with a latest"
            )
    verify_checkpoint(directory)
    saved = read_metadata(directory)

    def tensors_under(entry: str) -> dict[str, str]:
        return {
            key: key[len(entry) + 1 :]
            for key, meta in saved.state_dict_metadata.items()
            if key.startswith(f"{entry}.") and isinstance(meta, TensorStorageMetadata)
        }

    names = tensors_under(name)
    if not names:
        held = sorted({key.split(".")[0] for key in saved.state_dict_metadata})
        raise ValueError(f"name={name!r}: checkpoint {directory} has no tensors under it; it holds {held}")
    model = tensors_under("model")
    if set(names.values()) <= set(model.values()):
        names |= {key: fqn for key, fqn in model.items() if fqn not in set(names.values())}
    return directory, names


def _read_checkpoint(directory: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read whole tensors from a DCP checkpoint in this process: ``{exported name: tensor}``."""
    saved = read_metadata(directory)
    state = {}
    for key in names:
        meta = saved.state_dict_metadata[key]
        state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    read_checkpoint(state, directory, metadata=saved, no_dist=True)
    return {names[key]: tensor for key, tensor in state.items()}


def _write(tensors: dict[str, Any], path: Path) -> None:
    """Save the tensors (on CPU, contiguous, no shared storage) to ``path`` atomically."""
    out, seen = {}, set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # tied weights share storage, which safetensors refuses: write a copy
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
