"""The ``litegen`` command: what users do around a run, in one process, without a GPU or the model's code.

    litegen inspect CKPT_DIR_OR_ROOT [--json]
    litegen verify CKPT_DIR_OR_ROOT
    litegen export CKPT_DIR_OR_ROOT OUT [--ema] [--dtype bf16] [--max-shard-size 5GB] [--config FILE] [--quiet]
    litegen plan --config C.yaml --model tools/dit.py:DiT --inputs JSON --world-size 8 [--fit 80GiB] [--json]

Exit codes: 0 done (``verify``: intact; ``plan``: fits or no memory given), 1 ``verify`` found problems or nothing
planned fits, 2 bad arguments or not a readable checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import litegen_ckpt
import torch
from litegen_ckpt.offline import checkpoint_directory

from .config import DTYPES, raise_if

OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": functools.partial(torch.optim.SGD, lr=1e-3),
}
_INPUTS_HELP = (
    'JSON: this rank\'s forward arguments by name, a shape (float32) or {"shape": [...], "dtype": "int64"}, e.g. '
    '{"x": [4, 4, 32, 32], "t": [4], "text": [4, 120, 384]}'
)
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

    plan = commands.add_parser(
        "plan", help="every rank's peak memory, before launch", description=_plan.__doc__
    )
    plan.add_argument(
        "--config", help="a LiteGen config (YAML; a whole training config or a litegen: section)"
    )
    plan.add_argument("--model", required=True, help="FILE.py:Class, package.module:Class or diffusers:Class")
    plan.add_argument(
        "--model-kwargs", type=json.loads, default={}, help="JSON keyword arguments of the class"
    )
    plan.add_argument("--model-config", help="a diffusers / transformers config.json (Class.from_config)")
    plan.add_argument("--inputs", type=json.loads, required=True, help=_INPUTS_HELP)
    plan.add_argument(
        "--encoder", action="append", default=[], help="a frozen encoder, as --model (repeatable)"
    )
    plan.add_argument("--encoder-kwargs", action="append", type=json.loads, default=[], help="per --encoder")
    plan.add_argument("--encoder-inputs", action="append", type=json.loads, default=[], help="per --encoder")
    plan.add_argument(
        "--vae", help="a frozen VAE whose encode is traced, as --model (e.g. diffusers:AutoencoderKL)"
    )
    plan.add_argument(
        "--vae-kwargs", type=json.loads, default={}, help="JSON keyword arguments of the VAE class"
    )
    plan.add_argument("--vae-inputs", type=json.loads, help="the encode's inputs, as --inputs")
    plan.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw", help="default adamw")
    plan.add_argument("--world-size", "--gpus", type=int, required=True, help="ranks (GPUs) in the job")
    plan.add_argument("--gpus-per-node", type=int, help="ranks per node (default: the world)")
    plan.add_argument("--rank", type=int, default=0, help="the rank to plan (default 0)")
    plan.add_argument(
        "--device-memory", type=_size, help="memory per device, e.g. 80GiB: says whether it fits"
    )
    plan.add_argument(
        "--fit", type=_size, metavar="SIZE", help="list the configurations that fit SIZE per device"
    )
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(run=_plan)
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


def _plan(args: argparse.Namespace) -> int:
    """Predict one rank's peak memory for the config, measured on fake tensors over a fake world of --world-size
    ranks (no GPU, no peers): parameters, gathered parameters, gradients, optimizer state, EMA, frozen encoders,
    saved activations, temporaries (incl. SP's all-to-all buffers), communication buffers. With --fit, try the
    configurations (ZeRO degree, grouping, sp_size, checkpointing, offload) and list those that fit, cheapest
    first by the stated proxy (host transfers, then recomputation, then bytes communicated)."""
    from . import plan as planner
    from .config import config_as_dict, split_config

    base = config_as_dict(split_config(_without_checkpoints(args.config)).config) if args.config else {}
    raise_if(
        len(args.encoder_kwargs) not in (0, len(args.encoder))
        or len(args.encoder_inputs) != len(args.encoder),
        ValueError,
        "give one --encoder-inputs (and optionally one --encoder-kwargs) per --encoder",
    )
    kwargs = args.encoder_kwargs or [{}] * len(args.encoder)
    workload = planner.Workload(
        model=_factory(args.model, args.model_kwargs, args.model_config),
        inputs=_inputs(args.inputs, "--inputs"),
        encoders=[
            (_factory(spec, kw, None), _inputs(spec_inputs, "--encoder-inputs"))
            for spec, kw, spec_inputs in zip(args.encoder, kwargs, args.encoder_inputs, strict=True)
        ],
        vae=(_factory(args.vae, args.vae_kwargs, None), _inputs(args.vae_inputs, "--vae-inputs"))
        if args.vae
        else None,
        optimizer=OPTIMIZERS[args.optimizer],
    )
    world = dict(world_size=args.world_size, rank=args.rank, gpus_per_node=args.gpus_per_node)
    if args.fit is None:
        result = planner.plan(base, workload, device_memory=args.device_memory, **world)
        print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
        return 1 if result.fits is False else 0
    configs = planner.candidates(base, args.world_size, args.gpus_per_node or args.world_size)
    results = [
        r
        for r in planner.plans(configs, workload, device_memory=args.fit, **world)
        if not isinstance(r, Exception)
    ]
    raise_if(not results, ValueError, "no configuration could be planned for this world size and model")
    params = max(r.parts.get("parameters", 0) * r.world_size for r in results)  # the whole model's bytes
    fit = sorted(
        (r for r in results if r.fits), key=lambda r: planner.step_cost(r.config, params, r.world_size)
    )
    if args.json:
        print(
            json.dumps({"fit": [r.to_json() for r in fit], "tried": [r.to_json() for r in results]}, indent=2)
        )
    else:
        print(_fit_table(fit, results, args.fit))
    return 0 if fit else 1


def _without_checkpoints(path: str) -> dict[str, Any]:
    """The config file's mapping without the keys a plan has no use for (checkpoints, resume, init weights)."""
    import yaml

    raise_if(not os.path.isfile(path), ValueError, f"--config {path!r} is not a file")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    raise_if(
        not isinstance(data, dict),
        ValueError,
        f"--config {path!r} holds a {type(data).__name__}; a mapping of keys is required",
    )
    unused = {"checkpoint_dir", "checkpoint_every", "auto_resume", "resume_from", "init_from", "results_dir"}
    if isinstance(data.get("litegen"), dict):
        return {**data, "litegen": {k: v for k, v in data["litegen"].items() if k not in unused}}
    return {k: v for k, v in data.items() if k not in unused}


def _fit_table(fit: list, results: list, memory: int) -> str:
    head = f"{len(fit)} of {len(results)} configurations fit {_human(memory)} per device (cheapest first):"
    lines = [head, f"  {'zero':>4} {'grp':>3} {'sp':>3} {'ratio':>5} {'acoff':>5} {'cpuoff':>6} {'peak':>12}"]
    for i, r in enumerate(fit[:20]):
        c = r.config
        lines.append(
            f"  {c['zero_degree']:>4} {str(c['group_zero'])[0]:>3} {c['sp_size']:>3} {c['selective_ratio']:>5} "
            f"{str(c['ac_offload'])[0]:>5} {str(c['cpu_offload'])[0]:>6} {_human(r.peak):>12}"
            + ("   <- recommended" if i == 0 else "")
        )
    if not fit:
        best = min(results, key=lambda r: r.peak)
        part, size = max(best.parts.items(), key=lambda kv: kv[1])
        lines.append(
            f"nothing fits: the smallest peak is {_human(best.peak)} (zero_degree {best.config['zero_degree']}, "
            f"sp_size {best.config['sp_size']}, selective_ratio {best.config['selective_ratio']}), dominated by "
            f"{part} ({_human(size)}): " + _advice(part)
        )
    return "\n".join(lines)


def _advice(part: str) -> str:
    return {
        "activations": "a smaller per-rank batch or resolution, more sequence parallelism, or more GPUs",
        "temporaries": "a smaller per-rank batch or resolution, or more sequence parallelism",
        "optimizer state": "more GPUs (ZeRO shards it), or an optimizer with less state",
        "parameters": "more GPUs to shard over",
        "gathered parameters": "smaller blocks (FSDP gathers one block at a time)",
    }.get(part, "more GPUs or a smaller model")


def _factory(spec: str, kwargs: dict, config_json: str | None) -> Any:
    """A zero-argument builder of the class ``spec`` names: ``FILE.py:Class``, ``module:Class``, ``diffusers:Class``."""
    import importlib
    import importlib.util

    where, _, name = spec.rpartition(":")
    raise_if(
        not where or not name,
        ValueError,
        f"model spec {spec!r}; allowed: FILE.py:Class, package.module:Class or diffusers:Class",
    )
    if where.endswith(".py"):
        path = os.path.abspath(where)
        raise_if(not os.path.isfile(path), ValueError, f"model spec {spec!r}: {where} is not a file")
        sys.path.insert(0, os.path.dirname(path))  # the file's own imports of its neighbours
        module_spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(path))[0], path
        )
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    cls = getattr(module, name, None)
    raise_if(cls is None, ValueError, f"model spec {spec!r}: {where} has no {name!r}")
    if config_json is not None:
        with open(config_json) as f:
            loaded = json.load(f)
        return lambda: cls.from_config({**loaded, **kwargs})
    return lambda: cls(**kwargs)


def _inputs(spec: Any, flag: str) -> Any:
    """A builder of the forward's keyword tensors from ``{"name": shape or {"shape", "dtype"}}``."""
    raise_if(
        not isinstance(spec, dict) or not spec,
        ValueError,
        f"{flag}={spec!r}; allowed: a JSON object of argument name -> shape",
    )
    shapes = {}
    for name, value in spec.items():
        shape, dtype = (
            (value.get("shape"), value.get("dtype", "float32"))
            if isinstance(value, dict)
            else (value, "float32")
        )
        raise_if(
            not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape),
            ValueError,
            f"{flag}: {name}={value!r}; allowed: a list of sizes or {{'shape': [...], 'dtype': ...}}",
        )
        raise_if(
            not isinstance(getattr(torch, str(dtype), None), torch.dtype),
            ValueError,
            f"{flag}: {name} dtype {dtype!r}; allowed: a torch dtype name such as float32 or int64",
        )
        shapes[name] = (shape, getattr(torch, dtype))
    return lambda: {
        name: torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        for name, (shape, dtype) in shapes.items()
    }


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
