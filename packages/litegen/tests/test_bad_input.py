"""Scenario 6, bad input (see ``tests/bad_input.py``): config dicts, YAML files and the facade's ``initialize()``
and world checks; every bad value is refused with a message that names its key or argument."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from bad_input import SETTINGS, Denoiser, check, floats, ints, junk, probe
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

# ------------------------------------------------------------------------------------------------ litegen config

BOOL = junk(bool)
PATH = st.one_of(junk(str, type(None)), st.text(max_size=5).map(lambda s: f"runs/{s}\x00x"))
# one bad value per key, the rest of the config left at its (valid) defaults
BAD_VALUES: dict[str, st.SearchStrategy] = {
    "zero_degree": st.one_of(ints(0), st.integers(min_value=4)),
    "group_zero": st.one_of(st.just(True), st.integers(), junk(bool, int)),  # needs zero_degree 3 (default 0)
    "sp_size": ints(1),
    "cpu_offload": st.one_of(st.just(True), BOOL),  # offload needs zero_degree 3
    "sp_ring": st.one_of(ints(1, optional=True), st.integers(2, 9)),  # the default sp_size 1 has no ring
    "precision": st.one_of(st.sampled_from(["float32", "FP32", "half", ""]), junk(str)),
    "grad_precision": st.one_of(st.sampled_from(["half", "bfloat", ""]), junk(str, type(None))),
    "allow_tf32": BOOL,
    "selective_ratio": floats(0.0, 1.0, lo_valid=True),
    "ac_offload": BOOL,
    "compile": BOOL,
    "global_batch_size": ints(1, optional=True),
    "num_workers": ints(0),
    "pin_memory": BOOL,
    "shuffle": BOOL,
    "drop_last": BOOL,
    "global_seed": ints(0, above=2**62),
    "lr": floats(0.0, optional=True),
    "weight_decay": floats(0.0, lo_valid=True, optional=True),
    "max_steps": ints(1, optional=True),
    "checkpoint_dir": st.one_of(PATH, st.just("")),
    "checkpoint_every": st.one_of(ints(0), st.integers(1)),
    "checkpoint_keep": ints(1),
    "checkpoint_async": BOOL,
    "auto_resume": st.one_of(st.just(True), BOOL),
    "resume_from": st.one_of(PATH, st.sampled_from(["last", "step_x", "-1", "runs/step_"])),
    "init_from": st.one_of(PATH, st.sampled_from(["w.pt", "w.bin", "w.safetensors.pkl"])),
    "collective_timeout": floats(0.0),
    "log_level": st.one_of(st.sampled_from(["info2", "TRACE", ""]), junk(str)),
    "encoder": junk(dict),
    "encoder.fsdp": BOOL,
    "encoder.group": BOOL,
    "ema": junk(dict),
    "ema.enable": BOOL,
    "ema.sharded": BOOL,
    "ema.decay": floats(0.0, 1.0, lo_valid=True),
    "ema.warmup": BOOL,
    "ema.warmup_gamma": floats(0.0),
    "ema.warmup_power": floats(0.0),
    "ema.update_after_step": ints(0),
    "vae": junk(dict),
    "vae.data_parallel": BOOL,
    "vae.slice_size": ints(1, optional=True),
    "vae.compile": BOOL,
    "vae.per_frame": BOOL,
}


def nest(key: str, value: Any) -> dict:
    section, _, name = key.partition(".")
    return {section: {name: value}} if name else {key: value}


def test_config_one_bad_key_is_named():
    from litegen import load_config

    outcomes: list[str] = []

    def one_bad_value(key: str) -> Callable[[], None]:
        @SETTINGS
        @given(BAD_VALUES[key])
        def one_bad(value):
            probe(outcomes, [key], lambda: load_config(nest(key, value)))

        return one_bad

    for key in BAD_VALUES:
        one_bad_value(key)()
    check(outcomes)


def test_config_unknown_keys_are_named_with_the_closest_valid_key():
    """Inside LiteGen's sections every unknown key is refused; at the top level a near-miss of a LiteGen key is,
    and a key too far from all of them for a typo is the trainer's (a whole training config loads)."""
    from litegen import LiteGenConfig, load_config
    from litegen.config import NEAR_MISS, split_config

    outcomes: list[str] = []
    names = [f.name for f in dataclasses.fields(LiteGenConfig)]

    @SETTINGS
    @given(st.sampled_from(sorted(BAD_VALUES)), st.integers(0, 10**6))
    def typo(key, seed):
        section, _, name = key.rpartition(".")
        target = name or key
        position = seed % len(target)
        wrong = target[:position] + "xq"[seed % 2] + target[position + 1 :]  # one letter replaced
        if wrong == target:
            return
        full = f"{section}.{wrong}" if section else wrong
        if section or difflib.get_close_matches(wrong, names, n=1, cutoff=NEAR_MISS):
            probe(outcomes, [f"unknown key '{full}'"], lambda: load_config(nest(full, 1)))
        elif full in split_config(nest(full, 1)).trainer_keys:  # e.g. 'lx' for 'lr'
            outcomes.append("valid")
        else:
            outcomes.append(f"{full!r} neither refused nor left to the trainer")

    typo()
    check(outcomes)


IDENTIFIER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # a key as messages print it unquoted


def key_names(data: Any, prefix: str = "") -> list[str]:
    """Every key of a nested dict as messages name it: dotted below the top level, quoted unless an identifier."""
    out = []
    for key, value in data.items() if isinstance(data, dict) else []:
        full = f"{prefix}{key}"
        out.append(full if IDENTIFIER.fullmatch(full) else repr(full))
        out += key_names(value, f"{full}.")
    return out


CONFIG_KEYS = st.one_of(
    st.sampled_from([k for k in BAD_VALUES if "." not in k]), st.text(max_size=6), st.integers()
)
CONFIG_VALUES = st.recursive(
    junk(),
    lambda inner: st.dictionaries(
        st.one_of(st.sampled_from(["fsdp", "decay", "slice_size", "enable"]), st.text(max_size=4)),
        inner,
        max_size=3,
    ),
    max_leaves=4,
)


def test_arbitrary_config_dicts_are_accepted_and_usable_or_refused_by_key():
    """Any dict: a config that starts a world of 1..6 ranks, or an error naming one of its keys."""
    from litegen import load_config
    from litegen.config import check_world

    outcomes: list[str] = []

    @settings(SETTINGS, max_examples=150)
    @given(st.dictionaries(CONFIG_KEYS, CONFIG_VALUES, max_size=5), st.integers(1, 6))
    def arbitrary(data, world):
        def start_up():
            config = load_config(data)
            check_world(config, world, world)  # what LiteGen() checks on every rank before the process group
            datetime.timedelta(seconds=config.collective_timeout)  # what the process group gets
            torch.Generator().manual_seed(config.global_seed + 1 + world)  # the per-dp-rank seed

        probe(outcomes, key_names(data) or ["config"], start_up, may_be_valid=True)

    arbitrary()
    check(outcomes)


def test_yaml_files_of_any_text_load_or_are_refused_naming_the_file_or_key():
    from litegen import load_config

    outcomes: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"

        @SETTINGS
        @given(
            st.one_of(
                st.text(max_size=40),
                st.sampled_from(
                    [
                        "a: [1",
                        "{",
                        "- 1\n- 2",
                        "lr: .nan",
                        "ema: 3",
                        "zero_degree: !!python/object:os.system x",
                    ]
                ),
            )
        )
        def any_text(text):
            path.write_text(text)
            try:
                keys = key_names(yaml.safe_load(text))
            except yaml.YAMLError:  # the file's name is all a message can give
                keys = []
            probe(outcomes, [repr(str(path)), *keys], lambda: load_config(path), may_be_valid=True)

        any_text()
    check(outcomes)


# ------------------------------------------------------------------------------------------------ litegen facade


def facade_properties() -> list[str]:
    """initialize() with junk objects; world-dependent config errors; on 2 ranks (run by the harness)."""
    from litegen import LiteGen
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield 1

    outcomes: list[str] = []
    objects = st.one_of(junk(list), st.sampled_from(["stream", "optimizer", "class", "module class"]))

    def materialize(kind: Any) -> Any:
        model = Denoiser()
        return (
            {
                "stream": Stream(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                "class": Denoiser,
                "module class": nn.Linear,
            }.get(kind, kind)
            if isinstance(kind, str)
            else kind
        )

    with LiteGen({"global_batch_size": 2}) as gen:  # junk is refused before initialize() changes anything

        @SETTINGS
        @given(st.lists(objects, min_size=1, max_size=3))
        def bad_objects(kinds):
            objs = [materialize(k) for k in kinds]
            optimizers = [i for i, k in enumerate(kinds) if k == "optimizer"]
            probe(
                outcomes,
                [*(f"argument {i}" for i in range(len(objs))), f"arguments {optimizers}"],
                lambda: gen.initialize(*objs),
                may_be_valid=True,
            )

        bad_objects()

    @SETTINGS
    @given(st.sampled_from(["sp_size", "global_batch_size", "group_zero"]), st.integers(3, 7))
    def world_checks(key, value):
        config = {"global_batch_size": 2, key: value, **({"zero_degree": 3} if key == "group_zero" else {})}
        if key == "global_batch_size":
            config[key] = value if value % 2 else value + 1  # odd: not a multiple of the dp size 2
        probe(outcomes, [key], lambda: LiteGen(config).close())

    world_checks()
    return outcomes


def test_facade_initialize_and_world_checks(dist_pool):
    for rank, outcomes in enumerate(dist_pool.run(facade_properties, world_size=2, timeout=180)):
        check(outcomes, count=rank == 0)
