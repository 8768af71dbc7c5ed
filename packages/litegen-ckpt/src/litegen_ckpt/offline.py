"""A checkpoint on disk, in one process, without the model: what it holds, whether it is intact, its weights out.

``describe`` reads ``litegen.json`` and DCP's index; ``verify`` checks every file's size and CRC-32 and every
saved item's checksum, one item in memory at a time; ``export`` writes the consolidated weights (model or EMA)
as one ``.safetensors`` file or as a folder that diffusers' / transformers' ``from_pretrained`` reads. None of
them needs torch.distributed, a GPU or the model's class, and nothing read runs code.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .checkpointer import INFO_FILE, LATEST_FILE, _complete_dirs, _read_info, file_problems, latest_directory
from .statefuls import _empty_like_saved
from .storage import CheckpointError, VerifyingReader, raise_if, read_checkpoint, read_metadata

CONFIG_FILE = "config.json"  # the model's config, attached by the trainer (``Checkpointer(files=...)``)
READ_BYTES = 1 << 30  # tensors read per call while exporting: the progress reports this often


def checkpoint_directory(path: str | os.PathLike, argument: str = "path") -> Path:
    """The checkpoint ``path`` means: a ``step_<N>`` directory itself, or the one a root's ``latest`` names.
    ``argument``: the caller's name for it, in the errors."""
    raise_if(
        not isinstance(path, (str, os.PathLike)),
        TypeError,
        f"{argument}={path!r}; expected a str or os.PathLike to a checkpoint or a checkpoint root",
    )
    path = Path(path)
    if (path / INFO_FILE).is_file():
        return path
    directory = latest_directory(path) if path.is_dir() else None
    if directory is None:
        raise FileNotFoundError(
            f"{argument}={str(path)!r} is not a LiteGen checkpoint: neither a checkpoint directory (with {INFO_FILE}) nor a "
            f"checkpoint root (with a {LATEST_FILE} file)"
        )
    return directory


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, as JSON-able data: step, time, world size and layout, versions, entries (per
    entry: tensors, elements, bytes, dtypes), the model's parameter count and bytes, and the root's checkpoints
    with the one ``latest`` names. Reads ``litegen.json``, DCP's index and the small layout values only."""
    directory = checkpoint_directory(path)
    info = _read_info(directory)
    metadata = read_metadata(directory)
    entries: dict[str, dict[str, Any]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        entry = entries.setdefault(key.split(".")[0], {"tensors": 0, "elements": 0, "bytes": 0, "dtypes": []})
        if isinstance(meta, TensorStorageMetadata):
            entry["tensors"] += 1
            entry["elements"] += meta.size.numel()
            entry["bytes"] += _bytes(meta, None)
            entry["dtypes"] = sorted({*entry["dtypes"], str(meta.properties.dtype).removeprefix("torch.")})
    # the layout LiteGen's facade saves (dp_size, sp_size, world_size), read as data
    layout = {
        key: key.removeprefix("layout.") for key in metadata.state_dict_metadata if key.startswith("layout.")
    }
    pointer = directory.parent / LATEST_FILE
    model = entries.get("model", {})
    return {
        "path": str(directory),
        "step": info["step"],
        "time": datetime.datetime.fromtimestamp(info.get("time", 0), datetime.timezone.utc).isoformat(),
        "world_size": info["world_size"],
        "layout": _read(directory, metadata, layout) if layout else None,
        "format": info.get("format", 1),
        "litegen_version": info.get("litegen_version"),
        "torch_version": info.get("torch_version"),
        "run": info.get("run"),
        "entries": {name: entries.get(name, {}) for name in info.get("entries", sorted(entries))},
        "parameters": model.get("elements", 0),
        "parameter_bytes": model.get("bytes", 0),
        "files": len(info["files"]),
        "bytes_on_disk": sum(info["files"].values()),
        "config": (directory / CONFIG_FILE).is_file(),
        "latest": pointer.read_text(errors="replace").strip() if pointer.is_file() else None,
        "checkpoints": [d.name for d in _complete_dirs(directory.parent)],
    }


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem of a checkpoint, one message each naming the file (and the tensor): a missing or resized
    file, a small file whose CRC-32 differs, a saved item whose checksum differs. Empty when it is intact."""
    directory = checkpoint_directory(path)
    try:
        info = _read_info(directory)
    except (CheckpointError, FileNotFoundError) as error:
        return [str(error)]
    problems = [str(problem) for problem in file_problems(directory, info)]
    try:
        problems += VerifyingReader(directory).problems()
    except (CheckpointError, FileNotFoundError) as error:  # an unreadable index: no item can be checked
        problems.append(str(error))
    return problems


def export(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    config: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write a checkpoint's consolidated weights with clean names; returns the files written.

    ``out`` ending in ``.safetensors``: one file (``safetensors.torch.load_file`` reads it). Otherwise a folder
    in the Hugging Face layout: ``<weights>.safetensors``, or shards ``<weights>-00001-of-0000N.safetensors`` of at
    most ``max_shard_bytes`` each (default 5 GB) with ``<weights>.safetensors.index.json``; plus ``config.json``
    from ``config`` or the checkpoint's attached one. ``<weights>`` is ``diffusion_pytorch_model`` (diffusers),
    or ``model`` for a transformers config. ``name``: the entry to export (``"model"``, ``"ema"``: an EMA gets the
    model's buffers and frozen parameters added). ``dtype``: floating tensors cast to it. ``progress`` is called
    with the bytes read so far and the total. Shard by shard: at most one shard is in memory.
    """
    raise_if(
        not isinstance(out, (str, os.PathLike)),
        TypeError,
        f"out={out!r}; expected a str or os.PathLike: a .safetensors file or a folder",
    )
    raise_if(
        dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point),
        TypeError,
        f"dtype={dtype!r}; expected None or a floating torch.dtype, e.g. torch.bfloat16",
    )
    raise_if(
        max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes < 1),
        ValueError,
        f"max_shard_bytes={max_shard_bytes!r}; expected None or a positive int",
    )
    out = Path(out)
    single = out.suffix == ".safetensors"
    raise_if(
        single and (max_shard_bytes is not None or config is not None),
        ValueError,
        f"out={str(out)!r} is one .safetensors file: max_shard_bytes and config apply to a folder output",
    )
    if out.is_dir() if single else out.is_file():
        raise ValueError(
            f"out={str(out)!r} exists as a {'folder' if single else 'file'}; choose another path"
        )
    directory = checkpoint_directory(path)
    problems = verify(directory)
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not verify: " + "; ".join(problems[:5]))
    metadata = read_metadata(directory)
    names = entry_names(metadata, name, directory)
    config_text = None if single else _config_text(directory, config)
    size = {key: _bytes(metadata.state_dict_metadata[key], dtype) for key in names}
    shards = list(_shards(list(names), size, math.inf if single else (max_shard_bytes or 5 * 10**9)))
    parsed = json.loads(config_text) if config_text else {}  # a transformers config: no diffusers _class_name
    transformers = "_class_name" not in parsed and ("model_type" in parsed or "architectures" in parsed)
    stem = "model" if transformers else "diffusion_pytorch_model"
    files = [out / f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        files = [out if single else out / f"{stem}.safetensors"]
    done, total = 0, sum(size.values())
    for keys, file in zip(shards, files, strict=True):
        tensors = {}
        for part in _shards(keys, size, READ_BYTES):
            tensors |= _read(directory, metadata, {key: names[key] for key in part}, dtype)
            done += sum(size[key] for key in part)
            if progress is not None:
                progress(done, total)
        _save(tensors, file)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {
                names[key]: file.name for keys, file in zip(shards, files, strict=True) for key in keys
            },
        }
        files.append(_write_text(out / f"{stem}.safetensors.index.json", json.dumps(index, indent=2)))
    if config_text is not None:
        files.append(_write_text(out / CONFIG_FILE, config_text))
    return files


def entry_names(metadata: Metadata, name: str, directory: Path) -> dict[str, str]:
    """``{stored key: exported name}`` of the tensors saved under ``name``; an entry keyed by the model's names
    (an EMA) is completed with the model's other tensors (buffers, frozen parameters): a whole model."""
    raise_if(
        not isinstance(name, str),
        TypeError,
        f"name={name!r}; expected the str keyword the entry was saved under, e.g. 'model'",
    )

    def tensors_under(entry: str) -> dict[str, str]:
        return {
            key: key[len(entry) + 1 :]
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(f"{entry}.") and isinstance(meta, TensorStorageMetadata)
        }

    names = tensors_under(name)
    if not names:
        raise ValueError(
            f"name={name!r}: checkpoint {directory} has no tensors under it; it holds "
            f"{sorted({key.split('.')[0] for key in metadata.state_dict_metadata})}"
        )
    model = tensors_under("model")
    if set(names.values()) <= set(model.values()):
        names |= {key: fqn for key, fqn in model.items() if fqn not in set(names.values())}
    return names


def _bytes(meta: Any, dtype: torch.dtype | None) -> int:
    saved = meta.properties.dtype
    return meta.size.numel() * (dtype if dtype is not None and saved.is_floating_point else saved).itemsize


def _shards(keys: list[str], size: dict[str, int], limit: int) -> Iterator[list[str]]:
    """Consecutive groups of keys of at most ``limit`` bytes each (a tensor larger than that alone)."""
    shard: list[str] = []
    for key in keys:
        if shard and sum(size[k] for k in shard) + size[key] > limit:
            yield shard
            shard = []
        shard.append(key)
    if shard:
        yield shard


def _read(
    directory: Path, metadata: Metadata, names: dict[str, str], dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Read saved values whole (checksums checked) in this process: ``{names[stored key]: value}``, floating
    tensors cast to ``dtype`` if given."""
    state = {key: _empty_like_saved(metadata.state_dict_metadata[key]) for key in names}
    read_checkpoint(state, directory, metadata=metadata, no_dist=True)
    return {
        names[key]: value.to(dtype) if dtype is not None and value.is_floating_point() else value
        for key, value in state.items()
    }


def _save(tensors: dict[str, Any], path: Path) -> None:
    """Save the tensors (on CPU, contiguous, no shared storage) to ``path`` atomically."""
    out, seen = {}, set()
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):  # python values have no place in safetensors
            tensor = value.detach().to("cpu").contiguous()
            storage = tensor.untyped_storage().data_ptr()
            # tied weights share storage, which safetensors refuses: write a copy
            out[key] = tensor.clone() if storage in seen else tensor
            seen.add(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _config_text(directory: Path, config: str | os.PathLike | None) -> str | None:
    """The model's ``config.json`` text: the given file, else the checkpoint's attached one, else None."""
    if config is None:
        attached = directory / CONFIG_FILE
        return attached.read_text() if attached.is_file() else None
    raise_if(
        not isinstance(config, (str, os.PathLike)) or not Path(config).is_file(),
        ValueError,
        f"config={config!r}; expected the path of a model's config.json",
    )
    text = Path(config).read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config={str(config)!r} is not valid JSON ({error})") from error
    raise_if(
        not isinstance(parsed, dict),
        ValueError,
        f"config={str(config)!r} holds a {type(parsed).__name__}; expected a JSON object",
    )
    return text
