"""LiteGen's configuration: one dataclass tree, built from a YAML path, a dict or a dataclass, fully validated.

Every key is checked before anything else happens: a wrong type or range names the key, the value and
what is allowed. A whole training config loads: LiteGen's keys are read from its ``litegen:`` section
when it has one (strictly: an unknown key there names the closest valid one), else from the top level,
where a near-miss of a LiteGen key (``zero_degre``) is an error and every other key is left to the
trainer (``split_config`` returns them). The original LiteGen's keys keep their meaning
(``zero_degree``, ``group_zero``, ``sp_size``, ``precision``, ``grad_precision``, ``selective_ratio``,
``ac_offload``, ``encoder.fsdp``, ``encoder.group``, ``ema.enable``, ``ema.sharded``, ...); its
``results_dir`` and ``tf32`` are read as ``checkpoint_dir`` and ``fp32``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> dtype
PRECISIONS = tuple(DTYPES)
NEAR_MISS = 0.85  # difflib ratio from which an unknown top-level key is taken for a typo of a LiteGen key
# Common trainers' keys within NEAR_MISS of a LiteGen key (global_batch_size, sp_size) that are not its typos.
TRAINER_LOOKALIKES = frozenset({"local_batch_size", "dp_size", "pp_size", "ep_size", "cp_size"})


@dataclass
class EncoderConfig:
    """Frozen modules (text encoders) passed to ``initialize``."""

    fsdp: bool = False  # shard each frozen module's parameters (ZeRO-3 style, gathered per block)
    group: bool = False  # shard within a node (LOCAL_WORLD_SIZE ranks) instead of the whole world
    tp: bool = True  # with tp_size > 1: split each frozen module's attention / MLP over the TP group too


@dataclass
class EMAConfig:
    enable: bool = False
    sharded: bool = True  # each rank keeps 1/N of the EMA
    decay: float = 0.9999
    warmup: bool = False  # decay = min(decay, 1 - (1 + step / warmup_gamma) ** -warmup_power)
    warmup_gamma: float = 1.0
    warmup_power: float = 0.75
    update_after_step: int = 0


@dataclass
class VAEConfig:
    """The callable (e.g. ``vae.encode``) passed to ``initialize``."""

    data_parallel: bool = True  # split each batch over the sequence-parallel group's ranks
    slice_size: int | None = None  # encode in micro-batches of this many items
    compile: bool = False
    per_frame: bool = False  # the callable encodes each frame on its own: a 5-D clip may be split on frames


@dataclass
class LiteGenConfig:
    """All of LiteGen's settings. Defaults give plain DDP in fp32 with nothing else switched on."""

    # parallelism
    zero_degree: int = 0  # 0 DDP, 1 ZeRO-1, 2 ZeRO-2, 3 ZeRO-3
    group_zero: bool | int = False  # ZeRO-3 sharded within groups (True: a node) and replicated across
    sp_size: int = 1  # sequence-parallel degree (contiguous ranks): Ulysses x Ring
    sp_ring: int | None = (
        None  # the ring part of sp_size; null: per attention call, the most Ulysses the heads allow
    )
    tp_size: int = 1  # tensor-parallel degree (contiguous, innermost ranks); needs zero_degree 2 or 3
    cpu_offload: bool = False  # ZeRO-3 parameters and optimizer state on CPU
    # precision
    precision: str = "fp32"  # compute: autocast (degrees 0/1) or FSDP2 parameters (2/3); fp16 scales the loss
    grad_precision: str | None = None  # gradient reduction; default: same as precision
    allow_tf32: bool = False
    # activations
    selective_ratio: float = 1.0  # fraction of blocks NOT checkpointed (1.0: none, 0.0: all)
    ac_offload: bool = False  # saved activations to CPU memory (CUDA)
    compile: bool = False  # torch.compile each block
    # data
    global_batch_size: int | None = None  # needed when a Dataset is initialized
    num_workers: int = 0
    pin_memory: bool = True  # only takes effect on CUDA
    shuffle: bool = True
    drop_last: bool = True
    global_seed: int = 0
    # optimization (None: keep the optimizer's own values)
    lr: float | None = None
    weight_decay: float | None = None
    max_steps: int | None = None  # gen.batches() stops after this many steps
    # checkpoints
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # a hint for trainers; 0: never
    checkpoint_keep: int = 3
    checkpoint_async: bool = False
    auto_resume: bool = False
    resume_from: str | None = None  # a step number, "latest", or a step directory
    init_from: str | None = None  # pretrained weights: .safetensors, its index.json, or a model folder
    # runtime
    collective_timeout: float = 600.0  # seconds before a collective that does not complete fails
    log_level: str = "INFO"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    def __post_init__(self) -> None:
        _validate(self)

    def group_size(self, node_size: int) -> int | None:
        """The grouped-ZeRO-3 group size, or None; ``group_zero: true`` is the node size (``LOCAL_WORLD_SIZE``)."""
        if self.group_zero is False:
            return None
        return node_size if self.group_zero is True else int(self.group_zero)


class SplitConfig(NamedTuple):
    """A whole training config split into LiteGen's validated part and the keys LiteGen does not read."""

    config: LiteGenConfig
    trainer_keys: list[str]  # left to the trainer, in the config's order (``ema.resume_from``: dotted)
    renamed: list[str]  # one line per key of the original LiteGen read under LiteGen's name or value

    def log(self, logger: logging.Logger) -> None:
        """Say at INFO what LiteGen leaves to the trainer and what it renamed (call it once, on one rank)."""
        if self.trainer_keys:
            logger.info(
                "config: left to the trainer (LiteGen does not read them): %s", ", ".join(self.trainer_keys)
            )
        for line in self.renamed:
            logger.info("config: %s", line)


def split_config(source: str | os.PathLike | dict | LiteGenConfig | None) -> SplitConfig:
    """LiteGen's validated config and the keys it leaves to the trainer, from a whole training config.

    ``source``: a YAML path, a (nested) dict, a dataclass or None (defaults). With a ``litegen:`` mapping,
    LiteGen reads only it, strictly, and every other top-level key is the trainer's; a LiteGen key at the
    top level as well is an error (one place per key). Without one, LiteGen reads its keys at the top level
    (and the original LiteGen's ``results_dir`` and ``ema.resume_from``); a key within
    ``NEAR_MISS`` of a LiteGen key is an error naming both, any other key is the trainer's. Unknown keys in
    LiteGen's sections (``ema``, ``encoder``, ``vae``) are errors in both forms. Nothing is logged here.
    """
    if source is None:
        return SplitConfig(LiteGenConfig(), [], [])
    if isinstance(source, LiteGenConfig):
        return SplitConfig(dataclasses.replace(source), [], [])  # re-validates
    data = _as_dict(source)
    if "litegen" in data:
        section = {} if data["litegen"] is None else data["litegen"]
        if not isinstance(section, dict):
            raise TypeError(
                f"config: 'litegen' must be a mapping of LiteGen's keys, got {reprlib.repr(section)}"
            )
        both = [f"{key!r} = {reprlib.repr(data[key])}" for key in data if key in _field_names(LiteGenConfig)]
        if both:
            raise ValueError(
                f"config: LiteGen's key {', '.join(both)} at the top level and a 'litegen:' section: with "
                "the section, LiteGen reads only it; move the key under 'litegen:' (or rename it, if it is "
                "the trainer's)"
            )
        trainer_keys = [str(key) for key in data if key != "litegen"]
        return SplitConfig(_build(LiteGenConfig, section, prefix="litegen."), trainer_keys, [])
    ours, trainer_keys, renamed = _top_level(data)
    return SplitConfig(_build(LiteGenConfig, ours, prefix=""), trainer_keys, renamed)


def load_config(source: str | os.PathLike | dict | LiteGenConfig | None) -> LiteGenConfig:
    """A validated ``LiteGenConfig`` from a YAML path, a (nested) dict, a dataclass or None (defaults);
    ``split_config`` without the keys left to the trainer."""
    return split_config(source).config


def _as_dict(source: str | os.PathLike | dict | Any) -> dict:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        raise_if(
            not path.is_file(),
            ValueError,
            f"config: {str(path)!r} is not a file; pass a YAML path, a dict or a LiteGenConfig",
        )
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(f"config: {str(path)!r} is not valid YAML: {error}") from error
        if data is None:
            data = {}
        raise_if(
            not isinstance(data, dict),
            ValueError,
            f"config: {str(path)!r} holds a {type(data).__name__}; a mapping of keys is required",
        )
        return data
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return dataclasses.asdict(source)
    raise_if(
        not isinstance(source, dict),
        TypeError,
        f"config: got {type(source).__name__}; pass a YAML path, a dict, a LiteGenConfig or None",
    )
    return source


def _top_level(data: dict) -> tuple[dict, list[str], list[str]]:
    """LiteGen's keys of a whole config read at the top level, the original LiteGen's spellings translated;
    the trainer's keys; the renaming lines. A near-miss of a LiteGen key is an error."""
    names = _field_names(LiteGenConfig)
    ours: dict = {}
    trainer_keys: list[str] = []
    renamed: list[str] = []
    for key, value in data.items():
        if key in names:
            ours[key] = value
        elif key == "results_dir" and "checkpoint_dir" not in data:  # the original's fallback
            ours["checkpoint_dir"] = value
            renamed.append(f"results_dir={value!r} read as checkpoint_dir (the original LiteGen's fallback)")
        elif not isinstance(key, str) or key in TRAINER_LOOKALIKES:
            trainer_keys.append(str(key))
        else:
            close = difflib.get_close_matches(key.lower(), names, n=1, cutoff=NEAR_MISS)
            if close:
                raise ValueError(
                    f"config: unknown key {key!r} = {reprlib.repr(value)}; did you mean {close[0]!r}? "
                    f"(a top-level key this close to one of LiteGen's is taken for its typo; "
                    f"other keys are left to the trainer)"
                )
            trainer_keys.append(key)
    for key in ("precision", "grad_precision"):
        if ours.get(key) == "tf32":  # the original's tf32: fp32 parameters; TF32 matmuls are allow_tf32's
            ours[key] = "fp32"
            renamed.append(f"{key}='tf32' read as 'fp32' (TF32 matmuls: allow_tf32)")
    ema = ours.get("ema")
    if isinstance(ema, dict) and "resume_from" in ema:  # the original's separate EMA checkpoint file
        _check(
            ema["resume_from"] is None,
            "ema.resume_from",
            ema["resume_from"],
            "null (the EMA is saved in LiteGen's checkpoints and resumed with the model: "
            "resume_from, auto_resume)",
        )
        ours["ema"] = {k: v for k, v in ema.items() if k != "resume_from"}
        trainer_keys.append("ema.resume_from")
    return ours, trainer_keys, renamed


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def config_as_dict(config: LiteGenConfig) -> dict[str, Any]:
    """The resolved config as a nested dict (for logging and checkpoint metadata)."""
    return dataclasses.asdict(config)


def _build(cls: type, data: dict, prefix: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ";"
            raise ValueError(
                f"config: unknown key {where!r} = {reprlib.repr(value)}{hint} "
                f"Valid keys here: {sorted(names)}"
            )
        nested = _nested_type(cls, key)
        if nested is not None:
            if isinstance(value, nested):
                value = dataclasses.asdict(value)
            if not isinstance(value, dict):
                raise TypeError(
                    f"config: {where!r} must be a mapping of {sorted(f.name for f in fields(nested))}, "
                    f"got {value!r}"
                )
            value = _build(nested, value, prefix=f"{where}.")
        else:
            value = _coerce(where, value, typing.get_type_hints(cls)[key])
        kwargs[key] = value
    return cls(**kwargs)


def _nested_type(cls: type, key: str) -> type | None:
    hint = typing.get_type_hints(cls)[key]
    return hint if dataclasses.is_dataclass(hint) else None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted where floats are expected."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return None
        if kind in (bool, str) and isinstance(value, kind):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise_if(
                not math.isfinite(value),
                ValueError,
                f"config: {key}={value!r} is not allowed; a finite number",
            )
            return float(value)
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise TypeError(f"config: {key!r} must be {names}, got {value!r} ({type(value).__name__})")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    raise_if(not ok, ValueError, f"config: {key}={value!r} is not allowed; {allowed}")


def raise_if(bad: bool, error: type[Exception], message: str | Callable[[], str]) -> None:
    """``if bad: raise error(message)``: the package's argument checks (on every rank, before any collective).

    ``message`` may be a zero-argument callable, called only when ``bad``: per-call checks format nothing.
    """
    if bad:
        raise error(message if isinstance(message, str) else message())


def _coerce_fields(obj: Any, prefix: str = "") -> None:
    """Type-check (``_coerce``) every field of a config dataclass in place, the nested sections too."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise TypeError(
                    f"config: {prefix + f.name!r} must be a {hint.__name__} or a mapping, got {value!r}"
                )
            _coerce_fields(value, f"{prefix}{f.name}.")
        else:
            setattr(obj, f.name, _coerce(prefix + f.name, value, hint))


def _validate(c: LiteGenConfig) -> None:
    """Range and consistency checks that do not need the world size (see ``check_world``)."""
    _coerce_fields(c)  # direct construction, e.g. LiteGenConfig(zero_degree="3"), is type-checked too
    _check(
        c.zero_degree in (0, 1, 2, 3),
        "zero_degree",
        c.zero_degree,
        "0 (DDP), 1 (ZeRO-1), 2 (ZeRO-2) or 3 (ZeRO-3)",
    )
    if c.group_zero is not False:
        _check(c.zero_degree == 3, "group_zero", c.group_zero, "grouped sharding needs zero_degree: 3")
        _check(
            c.group_zero is True or c.group_zero >= 1,
            "group_zero",
            c.group_zero,
            "true (a node) or a group size >= 1",
        )
    _check(c.sp_size >= 1, "sp_size", c.sp_size, "an integer >= 1")
    _check(
        c.sp_ring is None or (c.sp_ring >= 1 and c.sp_size % c.sp_ring == 0),
        "sp_ring",
        c.sp_ring,
        f"null (chosen per attention call from its heads) or a divisor of sp_size={c.sp_size}",
    )
    _check(c.tp_size >= 1, "tp_size", c.tp_size, "an integer >= 1")
    if c.tp_size > 1:
        _check(
            c.sp_size == 1,
            "tp_size",
            c.tp_size,
            f"1 with sp_size={c.sp_size}: tensor and sequence parallelism do not compose; set tp_size or sp_size to 1",
        )
        _check(
            c.zero_degree >= 2,
            "tp_size",
            c.tp_size,
            f"1 with zero_degree={c.zero_degree}; tensor parallelism needs zero_degree 2 or 3 (FSDP2 on the dp dim)",
        )
        _check(
            c.group_zero is False,
            "tp_size",
            c.tp_size,
            f"1 with group_zero={c.group_zero!r}; grouped ZeRO-3 with tensor parallelism is not supported",
        )
    _check(
        not c.cpu_offload or c.zero_degree == 3, "cpu_offload", c.cpu_offload, "offload needs zero_degree: 3"
    )
    _check(c.precision in PRECISIONS, "precision", c.precision, f"one of {list(PRECISIONS)}")
    _check(
        c.grad_precision is None or c.grad_precision in PRECISIONS,
        "grad_precision",
        c.grad_precision,
        f"one of {list(PRECISIONS)} or null (same as precision)",
    )
    _check(
        0.0 <= c.selective_ratio <= 1.0,
        "selective_ratio",
        c.selective_ratio,
        "a fraction in [0, 1] of blocks NOT checkpointed (1.0: no checkpointing, 0.0: every block)",
    )
    _check(
        c.global_batch_size is None or c.global_batch_size >= 1,
        "global_batch_size",
        c.global_batch_size,
        "an integer >= 1 (or null when no Dataset goes through initialize)",
    )
    _check(c.num_workers >= 0, "num_workers", c.num_workers, "an integer >= 0")
    _check(0 <= c.global_seed < 2**62, "global_seed", c.global_seed, "an integer in [0, 2**62)")
    _check(c.lr is None or c.lr > 0, "lr", c.lr, "a number > 0 or null (keep the optimizer's)")
    _check(
        c.weight_decay is None or c.weight_decay >= 0,
        "weight_decay",
        c.weight_decay,
        "a number >= 0 or null (keep the optimizer's)",
    )
    _check(c.max_steps is None or c.max_steps >= 1, "max_steps", c.max_steps, "an integer >= 1 or null")
    _check(c.checkpoint_every >= 0, "checkpoint_every", c.checkpoint_every, "an integer >= 0 (0: never)")
    _check(c.checkpoint_keep >= 1, "checkpoint_keep", c.checkpoint_keep, "an integer >= 1")
    for key in ("checkpoint_dir", "resume_from", "init_from"):
        _check("\x00" not in (getattr(c, key) or ""), key, getattr(c, key), "a path without NUL characters")
    needs_dir = {
        "auto_resume": c.auto_resume,
        "resume_from": c.resume_from,
        "checkpoint_every": c.checkpoint_every,
    }
    for key, value in needs_dir.items():
        _check(not value or c.checkpoint_dir is not None, key, value, "it needs checkpoint_dir to be set")
    if c.checkpoint_dir is not None:
        _check(
            c.checkpoint_dir != "" and not Path(c.checkpoint_dir).is_file(),
            "checkpoint_dir",
            c.checkpoint_dir,
            "a directory path (it is created when missing), not a file",
        )
    if c.resume_from is not None:
        _check(
            re.fullmatch(r"[0-9]+", c.resume_from) is not None  # ASCII: str.isdigit() accepts "²"
            or c.resume_from == "latest"
            or re.fullmatch(r"step_[0-9]+", Path(c.resume_from).name) is not None,
            "resume_from",
            c.resume_from,
            'a step number, "latest", or a step directory (checkpoint_dir/step_<N>)',
        )
    if c.init_from is not None:
        _check(
            c.init_from.endswith((".safetensors", ".safetensors.index.json")) or Path(c.init_from).is_dir(),
            "init_from",
            c.init_from,
            "a .safetensors file, a sharded *.safetensors.index.json, or a diffusers / transformers model "
            "folder (diffusion_pytorch_model.safetensors[.index.json] or model.safetensors[.index.json] beside "
            "config.json); weights are never unpickled",
        )
    _check(c.collective_timeout > 0, "collective_timeout", c.collective_timeout, "a number of seconds > 0")
    _check(
        c.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log_level",
        c.log_level,
        "DEBUG, INFO, WARNING or ERROR",
    )
    _check(
        c.tp_size == 1 or not (c.encoder.tp and c.encoder.fsdp and c.encoder.group),
        "encoder.group",
        c.encoder.group,
        f"false with tp_size={c.tp_size} and encoder.tp: true (a split encoder shards over the dp ranks of the "
        "TP mesh), or encoder.tp: false",
    )
    e = c.ema
    _check(0.0 <= e.decay <= 1.0, "ema.decay", e.decay, "a number in [0, 1]")
    _check(e.warmup_gamma > 0, "ema.warmup_gamma", e.warmup_gamma, "a number > 0")
    _check(e.warmup_power > 0, "ema.warmup_power", e.warmup_power, "a number > 0")
    _check(e.update_after_step >= 0, "ema.update_after_step", e.update_after_step, "an integer >= 0")
    _check(
        c.vae.slice_size is None or c.vae.slice_size >= 1,
        "vae.slice_size",
        c.vae.slice_size,
        "an integer >= 1 or null (no slicing)",
    )


def check_world(c: LiteGenConfig, world_size: int, node_size: int) -> None:
    """Checks that need the world and node sizes; every rank runs them before any collective."""
    _check(world_size % c.sp_size == 0, "sp_size", c.sp_size, f"a divisor of the world size {world_size}")
    _check(
        world_size % (c.sp_size * c.tp_size) == 0,
        "tp_size",
        c.tp_size,
        f"a divisor of the world size {world_size} / sp_size {c.sp_size}",
    )
    _check(
        node_size % c.tp_size == 0,
        "tp_size",
        c.tp_size,
        f"a divisor of the node size LOCAL_WORLD_SIZE={node_size} (a TP group stays on one node)",
    )
    _check(
        not (c.encoder.fsdp and c.encoder.group) or world_size % node_size == 0,
        "encoder.group",
        c.encoder.group,
        f"true only when the node size LOCAL_WORLD_SIZE={node_size} divides the world size {world_size}",
    )
    dp_size = world_size // (c.sp_size * c.tp_size)
    group = c.group_size(node_size)
    if group is not None:
        _check(
            world_size % group == 0,
            "group_zero",
            c.group_zero,
            f"a group size that divides the world size {world_size}",
        )
        _check(
            group % c.sp_size == 0,
            "group_zero",
            c.group_zero,
            f"a group size that is a multiple of sp_size={c.sp_size} (SP groups live inside a shard group)",
        )
    _check(
        c.global_batch_size is None or c.global_batch_size % dp_size == 0,
        "global_batch_size",
        c.global_batch_size,
        f"a multiple of the data-parallel size {dp_size} "
        f"(world {world_size} / sp_size {c.sp_size} / tp_size {c.tp_size})",
    )
