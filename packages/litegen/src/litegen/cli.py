"""The ``litegen`` command: what users do around a run, in one process, without a GPU or the model's code.

    litegen inspect CKPT_DIR_OR_ROOT [--json]
    litegen verify CKPT_DIR_OR_ROOT
    litegen export CKPT_DIR_OR_ROOT OUT [--ema] [--dtype bf16] [--max-shard-size 5GB] [--config FILE] [--quiet]

Exit codes: 0 done (``verify``: intact), 1 ``verify`` found problems, 2 bad arguments or not a readable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import litegen_ckpt
import torch
from litegen_ckpt.offline import checkpoint_directory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
UNITS |= {"GIB": 2**30, "TIB": 2**40}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``litegen`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, litegen_ckpt.CheckpointError, ValueError, TypeError) as error:
        print(f"litegen {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litegen", description="LiteGen checkpoints on the command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    where = "a checkpoint directory (step_<N>) or a checkpoint root (its latest)"

    inspect = commands.add_parser("inspect", help="what a checkpoint holds", description=_inspect.__doc__)
    inspect.add_argument("checkpoint", help=where)
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(run=_inspect)

    verify = commands.add_parser(
        "verify", help="check every file and every saved item", description=_verify.__doc__
    )
    verify.add_argument("checkpoint", help=where)
    verify.set_defaults(run=_verify)

    export = commands.add_parser(
        "export", help="consolidated weights with clean names", description=_export.__doc__
    )
    export.add_argument("checkpoint", help=where)
    export.add_argument("out", help="OUT.safetensors (one file) or a folder (the from_pretrained layout)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights instead of the model's")
    export.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: as saved)")
    export.add_argument(
        "--max-shard-size",
        type=_size,
        metavar="SIZE",
        help="folder output: bytes per file, e.g. 5GB (default)",
    )
    export.add_argument(
        "--config", metavar="FILE", help="the model's config.json (default: the checkpoint's)"
    )
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=_export)
    return parser


def _inspect(args: argparse.Namespace) -> int:
    """Print a checkpoint's step, time, world size and layout, versions, entries (model, optimizer, EMA, data
    position, RNG), parameter count and bytes, and the checkpoint the root's ``latest`` names."""
    described = litegen_ckpt.describe(args.checkpoint)
    print(json.dumps(described, indent=2) if args.json else _table(described))
    return 0


def _table(d: dict[str, Any]) -> str:
    layout = d["layout"]
    shape = f" (dp {layout['dp_size']} x sp {layout['sp_size']})" if layout else ""
    others = ", ".join(d["checkpoints"])
    lines = [
        f"checkpoint  {d['path']}",
        f"step        {d['step']}",
        f"saved       {d['time']} by litegen {d['litegen_version']} (torch {d['torch_version']}), format {d['format']}",
        f"world       {d['world_size']} processes{shape}",
        f"parameters  {d['parameters']:,} ({_human(d['parameter_bytes'])})",
        "entries",
    ]
    for name, entry in d["entries"].items():
        if entry.get("tensors"):
            dtypes = "/".join(entry["dtypes"])
            lines.append(
                f"  {name:<12}{entry['tensors']:>6} tensors {entry['elements']:>14,} elements "
                f"{_human(entry['bytes']):>10}  {dtypes}"
            )
        else:
            lines.append(f"  {name:<12}python values")
    lines += [
        f"on disk     {d['files']} files, {_human(d['bytes_on_disk'])}; model config.json "
        + ("attached" if d["config"] else "not attached"),
        f"root        latest -> {d['latest']}; complete checkpoints: {others}",
    ]
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    """Check every file's size and CRC-32 and every saved item's checksum, without loading the model: one line per
    problem naming the file (and the tensor); exit code 0 when intact, 1 otherwise."""
    directory = checkpoint_directory(args.checkpoint)
    problems = litegen_ckpt.verify(directory)
    for problem in problems:
        print(problem)
    print(f"{directory}: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


def _export(args: argparse.Namespace) -> int:
    """Write the consolidated weights (model, or EMA with ``--ema``) with clean names, in one process: to
    ``OUT.safetensors``, one file ``safetensors.torch.load_file`` reads, or to a folder ``from_pretrained`` reads
    (``*.safetensors`` shards, their ``.index.json`` and the model's ``config.json`` when the checkpoint holds it or
    ``--config`` gives it)."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", file=sys.stderr)
        bar.update(done - bar.n)

    try:
        files = litegen_ckpt.export(
            args.checkpoint,
            args.out,
            name="ema" if args.ema else "model",
            dtype=DTYPES[args.dtype] if args.dtype else None,
            max_shard_bytes=args.max_shard_size,
            config=args.config,
            progress=None if args.quiet else progress,
        )
    finally:
        if bar is not None:
            bar.close()
    for file in files:
        print(file)
    return 0


def _size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"`` -> bytes (argparse type)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}; allowed: a positive size such as 5GB, 500MB, 2GiB or 1000"
        )
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def _human(count: int) -> str:
    """Bytes for people: ``5242880`` -> ``"5.2 MB"``."""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
