"""Weights in and out as safetensors: consolidated export with clean names, sharded slice-wise import."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .checkpointer import verify_checkpoint
from .offline import _read, _save, checkpoint_directory, entry_names
from .storage import agree, naming_a_full_disk, on_rank_0, raise_if, read_metadata

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
    raise_if(
        not isinstance(path, (str, os.PathLike)),
        TypeError,
        f"path={path!r}; expected a str or os.PathLike to the .safetensors file to write",
    )
    raise_if(
        not isinstance(name, str),
        TypeError,
        f"name={name!r}; expected the str keyword the entry was saved under, e.g. 'model'",
    )
    raise_if(
        Path(path).is_dir(),
        ValueError,
        f"path={str(path)!r} is a directory; expected the path of the .safetensors file to write",
    )
    checkpoint = None
    if isinstance(source, nn.Module):
        tensors = get_model_state_dict(
            source, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    elif callable(getattr(source, "full_state_dict", None)):
        tensors = source.full_state_dict()
    elif isinstance(source, (str, os.PathLike)):  # every rank verifies it, rank 0 reads it
        directory = checkpoint_directory(source, "source")
        verify_checkpoint(directory)
        metadata = read_metadata(directory)
        checkpoint = (directory, metadata, entry_names(metadata, name, directory))
    else:
        raise TypeError(
            f"source={type(source).__name__}: expected an nn.Module, an object with full_state_dict(), "
            "or a checkpoint directory path"
        )

    def write() -> None:
        """Rank 0: read the checkpoint (if that is the source) and write the file."""
        exported = tensors if checkpoint is None else _read(*checkpoint)
        with naming_a_full_disk(Path(path)):
            _save(exported, Path(path))
        logger.info(f"exported {len(exported)} tensors to {path}")

    on_rank_0(write)  # the other ranks learn how it went, not by a timeout


_FOLDER_FILES = tuple(
    f"{stem}.safetensors{index}"
    for stem in ("diffusion_pytorch_model", "model")
    for index in ("", ".index.json")
)
_ALLOWED = (
    "a .safetensors file, a sharded *.safetensors.index.json, or a diffusers / transformers model folder "
    "holding diffusion_pytorch_model.safetensors[.index.json] or model.safetensors[.index.json]"
)


def load_safetensors(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load pretrained weights into a plain or sharded model (parameters and buffers).

    ``path``: one ``.safetensors`` file, a sharded ``*.safetensors.index.json`` (its ``weight_map`` names
    the file holding each tensor), or a diffusers / transformers model folder (the file or index beside
    ``config.json``). Each rank reads only the slices its DTensor shards own, from whichever file holds
    them; plain tensors are read whole. Names are the model's clean FQNs; when the stored names all carry
    the model's ``base_model_prefix`` + "." (transformers) and the model's lack it, or the reverse, the
    prefix is stripped / added, only if that makes every name match.
    ``strict``: the stored names must equal the model's; otherwise only common names load.
    """
    raise_if(
        not isinstance(model, nn.Module), TypeError, f"model={type(model).__name__}; expected an nn.Module"
    )
    raise_if(
        not isinstance(path, (str, os.PathLike)),
        TypeError,
        f"path={path!r}; expected a str or os.PathLike: {_ALLOWED}",
    )
    raise_if(not isinstance(strict, bool), TypeError, f"strict={strict!r}; expected True or False")
    path = Path(path)
    state = get_model_state_dict(model)
    prefix = getattr(getattr(model, "module", model), "base_model_prefix", "")
    names, problem = [], None
    try:  # each rank reads its own slices: a file one node lacks fails every rank, with that node's message
        names = _load_into(
            state, _weight_files(path), prefix if isinstance(prefix, str) else "", strict, path
        )
    except SafetensorError as error:  # not a safetensors file (a pickle, say), or a truncated one
        what = "names a file that is" if path.is_dir() or path.name.endswith(".index.json") else "is"
        problem = ValueError(
            f"path={str(path)!r} {what} not a valid safetensors file ({error}); weights are read only from "
            "safetensors files, never unpickled"
        )
    except (OSError, ValueError) as error:
        problem = error
    agree(problem)
    set_model_state_dict(model, {key: state[key] for key in names}, options=StateDictOptions(strict=strict))


def _weight_files(path: Path) -> dict[str, Path]:
    """``{stored tensor name: the .safetensors file holding it}`` for a file, an index or a model folder."""
    if path.is_dir():
        found = [path / name for name in _FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"path={str(path)!r} is a folder without {' / '.join(_FOLDER_FILES)}; allowed: {_ALLOWED} "
                "(for a diffusers pipeline folder, pass its model's subfolder, e.g. transformer/ or unet/)"
            )
        path = found[0]
    if path.name.endswith(".safetensors.index.json") and path.is_file():
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            files = {name: path.parent / file for name, file in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f'path={str(path)!r} is not a safetensors index (JSON with a "weight_map" of tensor name -> '
                f"shard file): {error!r}"
            ) from error
        absent = sorted({str(file) for file in files.values() if not file.is_file()})
        raise_if(
            bool(absent),
            FileNotFoundError,
            f"path={str(path)!r} names shard files that do not exist: {absent[:5]}",
        )
        return files
    if (
        path.is_file()
    ):  # read as safetensors whatever its name: anything else fails the parser, never unpickled
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict.fromkeys(f.keys(), path)
    raise FileNotFoundError(f"path={str(path)!r} does not exist or is not {_ALLOWED}")


def _stored_names(names: list[str], stored: set[str], prefix: str) -> dict[str, str]:
    """``{model name: stored name}``: as is, or with ``prefix`` + "." added / stripped if every name then matches."""
    dotted = prefix + "."
    renames = [{name: name for name in names}]
    if prefix:
        renames.append({name: dotted + name for name in names})
        if all(name.startswith(dotted) for name in names):
            renames.append({name: name[len(dotted) :] for name in names})
    return next((rename for rename in renames if set(rename.values()) == stored), renames[0])


def _load_into(
    state: dict[str, torch.Tensor], files: dict[str, Path], prefix: str, strict: bool, path: Path
) -> list[str]:
    """Check names and shapes against the files, then copy each tensor's owned part into ``state``; the names loaded."""
    rename = _stored_names(list(state), set(files), prefix)
    missing = sorted(key for key in state if rename[key] not in files)
    unexpected = sorted(set(files) - set(rename.values()))
    raise_if(
        strict and (missing or unexpected),
        ValueError,
        f"{path} does not match the model (strict=True): missing keys {missing}, "
        f"unexpected keys {unexpected}",
    )
    by_file: dict[Path, list[str]] = {}
    for key in state:
        if rename[key] in files:
            by_file.setdefault(files[rename[key]], []).append(key)
    for file, keys in by_file.items():  # every name and shape first: a mismatch changes no weight
        with safe_open(str(file), framework="pt", device="cpu") as f:
            held = set(f.keys())
            for key in keys:
                raise_if(
                    rename[key] not in held,
                    ValueError,
                    f"{path}: its index puts {rename[key]} in {file}, which does not hold it",
                )
                shape = tuple(f.get_slice(rename[key]).get_shape())
                if shape != tuple(state[key].shape):
                    raise ValueError(
                        f"{key}: {file} holds shape {shape}, the model has shape {tuple(state[key].shape)}"
                    )
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in keys:
                    _read_owned(f, rename[key], state[key])
    return [key for keys in by_file.values() for key in keys]


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
