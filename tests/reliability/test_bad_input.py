"""Scenario 6: bad input everywhere. Property-based tests (hypothesis) over config dicts, YAML files, arguments
and tensor shapes for the public APIs of the six packages: every bad input raises a ValueError or TypeError
whose message names the offending key or argument; never an AssertionError, KeyError, IndexError, a hang or a
silent wrong result. Distributed APIs run their whole property loop inside one harness call at world 2 (same
derandomized examples on both ranks, errors raised before any collective, or the call would hang).

Each probe records one outcome: "named" (rejected, message names the argument), "valid" (a generated input
that turned out to be valid, where a strategy can make those), or a failure description. The tests assert
there are no failures; ``test_report_the_count`` prints how many bad inputs were tried.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from small_trainer import Denoiser
from torch import nn

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
OUTCOMES: Counter = Counter()  # this pytest process's tally: {"named": n, "valid": n}


def probe(
    outcomes: list[str],
    names: Sequence[str],
    call: Callable[[], Any],
    *,
    may_be_valid: bool = False,
    errors: tuple[type[Exception], ...] = (ValueError, TypeError),
) -> None:
    """Run ``call`` on one generated input and record what happened (see the module docstring)."""
    try:
        call()
    except errors as error:
        message = str(error)
        if any(name in message or repr(name)[1:-1] in message for name in names):
            outcomes.append("named")
        else:
            outcomes.append(f"names none of {list(names)}: {type(error).__name__}: {message}")
    except Exception as error:  # noqa: BLE001 - the point: anything else is a finding
        outcomes.append(f"{type(error).__name__} (not ValueError/TypeError) for {list(names)}: {error}")
    else:
        outcomes.append("valid" if may_be_valid else f"accepted a bad {list(names)}")


def check(outcomes: list[str], count: bool = True) -> None:
    """No failures; ``count``: add the outcomes to the tally (once per example: rank 0's only)."""
    failures = sorted({o for o in outcomes if o not in ("named", "valid")})
    if count:
        OUTCOMES.update(o for o in outcomes if o in ("named", "valid"))
    assert not failures, "\n".join(failures[:20])


def junk(*exclude: type) -> st.SearchStrategy:
    """Values of many types (minus ``exclude``) for arguments that expect something else."""
    options = {
        type(None): st.none(),
        bool: st.booleans(),
        int: st.integers(-(10**20), 10**20),
        float: st.floats(allow_nan=True, allow_infinity=True),
        str: st.text(max_size=8),
        list: st.lists(st.integers(), max_size=3),
        dict: st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    }
    return st.one_of(*(s for t, s in options.items() if t not in exclude))


# ------------------------------------------------------------------------------------------------ litegen config


def ints(bad_below: int, optional: bool = False, above: int | None = None) -> st.SearchStrategy:
    out = [st.integers(max_value=bad_below - 1), junk(int, *([type(None)] if optional else []))]
    if above is not None:
        out.append(st.integers(min_value=above + 1))
    return st.one_of(*out)


def floats(
    lo: float, hi: float | None = None, lo_valid: bool = False, optional: bool = False
) -> st.SearchStrategy:
    out = [
        st.floats(max_value=lo, exclude_max=lo_valid),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        junk(int, float, *([type(None)] if optional else [])),
    ]
    if hi is not None:
        out.append(st.floats(min_value=hi, exclude_min=True))
    return st.one_of(*out)


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
            probe(outcomes, [f"{key}=", f"'{key}'"], lambda: load_config(nest(key, value)))

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


def flat_keys(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, dict):
            out += flat_keys(value, f"{prefix}{key}.")
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
        names = flat_keys(data)

        def start_up():
            config = load_config(data)
            check_world(config, world)  # what LiteGen() checks on every rank before the process group
            datetime.timedelta(seconds=config.collective_timeout)  # what the process group gets
            torch.Generator().manual_seed(config.global_seed + 1 + world)  # the per-dp-rank seed

        probe(outcomes, names or ["config"], start_up, may_be_valid=True)

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
            probe(outcomes, [str(path), "config:"], lambda: load_config(path), may_be_valid=True)

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
            probe(
                outcomes,
                ["initialize: argument", "initialize: the optimizer", "initialize: at most one"],
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
        probe(outcomes, [f"{key}="], lambda: LiteGen(config).close())

    world_checks()
    return outcomes


def test_facade_initialize_and_world_checks(dist_pool):
    for rank, outcomes in enumerate(dist_pool.run(facade_properties, world_size=2, timeout=180)):
        check(outcomes, count=rank == 0)


# ------------------------------------------------------------------------------------------------ litegen_zero


def model_and_optimizer() -> tuple[Denoiser, torch.optim.Optimizer]:
    model = Denoiser()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


NOT_A_MODULE = st.one_of(junk(), st.just(torch.ones(2)))
BAD_DTYPE = st.one_of(
    junk(type(None)), st.sampled_from([torch.int32, torch.float64, torch.uint8, "fp8", "half"])
)


def zero_properties() -> list[str]:
    from litegen_zero import clip_grad_norm_, find_blocks, full_state_dict, no_sync, shard, shard_frozen

    outcomes: list[str] = []
    bad_shard_args = st.one_of(
        st.tuples(st.just("degree"), st.one_of(st.integers().filter(lambda d: d not in range(4)), junk(int))),
        st.tuples(
            st.just("group_size"),
            st.one_of(st.integers().filter(lambda g: g not in (1, 2)), junk(int, bool, type(None))),
        ),
        st.tuples(st.just("mesh"), junk(type(None))),
        st.tuples(st.just("param_dtype"), BAD_DTYPE),
        st.tuples(st.just("reduce_dtype"), BAD_DTYPE),
        st.tuples(st.just("offload"), junk(bool)),
        st.tuples(
            st.just("blocks"), st.one_of(junk(type(None)), st.just([nn.Linear(2, 2)]), st.just(nn.ModuleList))
        ),
        st.tuples(st.just("optimizer"), junk()),
        st.tuples(st.just("model"), NOT_A_MODULE),
    )

    @SETTINGS
    @given(bad_shard_args, st.sampled_from([0, 2, 3]))
    def shard_one_bad(arg, degree):
        name, value = arg
        model, optimizer = model_and_optimizer()
        kwargs = {"degree": 3 if name in ("group_size", "offload") else degree, name: value}
        if name == "param_dtype" and degree == 0:
            kwargs[name] = torch.bfloat16  # low-precision parameters need FSDP2
        model_arg, optimizer_arg = kwargs.pop("model", model), kwargs.pop("optimizer", optimizer)
        probe(outcomes, [f"{name}=", name], lambda: shard(model_arg, optimizer_arg, **kwargs))

    shard_one_bad()

    @SETTINGS
    @given(st.sampled_from(["group_size", "mesh", "dtype", "blocks", "model"]), st.data())
    def shard_frozen_one_bad(name, data):
        value = data.draw(
            {
                "group_size": st.integers().filter(lambda g: g not in (1, 2)),
                "mesh": junk(type(None)),
                "dtype": BAD_DTYPE,
                "blocks": st.just([nn.Linear(2, 2)]),
                "model": NOT_A_MODULE,
            }[name]
        )
        model = Denoiser().requires_grad_(False)
        kwargs = {name: value}
        model_arg = kwargs.pop("model", model)
        probe(outcomes, [f"{name}=", name], lambda: shard_frozen(model_arg, **kwargs))

    shard_frozen_one_bad()

    @SETTINGS
    @given(
        st.sampled_from(["max_norm", "norm_type", "model"]),
        st.one_of(st.floats(max_value=0.0), st.just(math.nan), junk(int, float)),
    )
    def helpers_one_bad(name, value):
        model = Denoiser()
        model(torch.ones(2, 8)).sum().backward()
        if name == "model":
            for helper in (clip_grad_norm_, full_state_dict, find_blocks):
                probe(
                    outcomes,
                    ["model="],
                    lambda helper=helper: (
                        helper(value) if helper is not clip_grad_norm_ else helper(value, 1.0)
                    ),
                )
            probe(outcomes, ["model="], lambda: no_sync(value).__enter__())
            return
        kwargs = {"max_norm": 1.0, "norm_type": 2.0, name: value}
        probe(outcomes, [f"{name}="], lambda: clip_grad_norm_(model, **kwargs))

    helpers_one_bad()
    return outcomes


def test_litegen_zero(dist_pool):
    for rank, outcomes in enumerate(dist_pool.run(zero_properties, world_size=2, timeout=180)):
        check(outcomes, count=rank == 0)


# ------------------------------------------------------------------------------------------------ litegen_sp

SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)
QKV = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
# q, k, v shapes that usually fit together: (b, s, h, d), (b, s, h_kv, d), (b, s, h_kv, d_v)
CONSISTENT_QKV = st.tuples(
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([2, 4]),
    st.integers(1, 4),
    st.sampled_from([2, 4]),
    st.integers(1, 3),
).map(lambda t: ((t[0], t[1], t[2], t[3]), (t[0], t[1], t[4], t[3]), (t[0], t[1], t[4], t[5])))


def sp_properties() -> list[str]:
    import torch.distributed as dist
    from litegen_sp import (
        SPPlan,
        attention,
        gather_sequence,
        sequence_parallel,
        split_sequence,
        ulysses_attention,
    )

    outcomes: list[str] = []
    rank = dist.get_rank()

    @SETTINGS
    @given(
        st.one_of(SHAPES, junk()),
        st.one_of(st.integers(-6, 6), junk(int)),
        st.one_of(st.none(), junk(type(None))),
    )
    def split_and_gather(shape, dim, group):
        x = torch.randn(shape) if isinstance(shape, tuple) else shape

        def round_trip():
            x_local, info = split_sequence(x, group, dim)
            full = gather_sequence(x_local, group, info)
            if not torch.equal(full, x):  # every rank passed the same x (the same seed)
                raise AssertionError(f"split/gather changed x of shape {tuple(x.shape)}")

        torch.manual_seed(0)
        probe(
            outcomes,
            ["x ", "x must", "dim=", "group=", "tokens along dim"],
            round_trip,
            may_be_valid=isinstance(shape, tuple) and group is None,
        )

    split_and_gather()

    @SETTINGS
    @given(st.sampled_from(["info", "x_local", "dim"]), st.data())
    def gather_one_bad(name, data):
        x_local, info = split_sequence(torch.randn(2, 6, 3), None, 1)
        args = {"x_local": x_local, "info": info, "dim": None}
        args[name] = data.draw(
            {
                "info": junk(),
                "x_local": st.one_of(SHAPES.map(torch.randn), junk()),
                "dim": st.one_of(st.integers(4, 9), junk(int, type(None))),
            }[name]
        )
        probe(
            outcomes,
            [name, "x_local"],
            lambda: gather_sequence(args["x_local"], None, args["info"], args["dim"]),
            may_be_valid=name == "x_local",
        )

    gather_one_bad()

    @SETTINGS
    @given(
        st.one_of(CONSISTENT_QKV, st.tuples(QKV, QKV, QKV)),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 8)),
        st.sampled_from(["ok", "ok", "causal", "scale", "dropout_p", "attn_fn"]),
        st.data(),
    )
    def ulysses(shapes, kv_replicated, seq_len, bad, data):
        q_shape, k_shape, v_shape = shapes
        torch.manual_seed(rank)  # each rank its own slice of the sequence
        q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
        if kv_replicated:
            torch.manual_seed(100)  # replicated k/v: the same on every rank
            k, v = torch.randn(k_shape), torch.randn(v_shape)
        options = {"causal": False, "scale": None, "dropout_p": 0.0, "attn_fn": None}
        if bad != "ok":
            options[bad] = data.draw(
                {
                    "causal": junk(bool),
                    "scale": junk(type(None), int, float),
                    "attn_fn": junk(type(None)),
                    "dropout_p": st.one_of(
                        st.floats(min_value=1.0), st.floats(max_value=-1e-9), junk(int, float)
                    ),
                }[bad]
            )

        def attend():
            out = ulysses_attention(
                q, k, v, group=None, kv_replicated=kv_replicated, seq_len=seq_len, **options
            )
            expected = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
            if tuple(out.shape) != expected:
                raise AssertionError(f"output shape {tuple(out.shape)} for q {q_shape}, v {v_shape}")
            if not kv_replicated and seq_len is None:  # the reference: attention over the gathered sequence
                full = [torch.cat(gather_all(t), dim=1) for t in (q, k, v)]
                reference = attention(*full).narrow(1, rank * q.shape[1], q.shape[1])
                torch.testing.assert_close(out, reference)

        probe(
            outcomes,
            ["q ", "q,", "k ", "k and v", "heads", "seq_len", "head_dim", bad],
            attend,
            may_be_valid=bad == "ok",
        )

    ulysses()

    @SETTINGS
    @given(st.one_of(QKV, SHAPES), st.one_of(QKV, SHAPES), st.one_of(QKV, SHAPES))
    def local_attention(q_shape, k_shape, v_shape):
        q, k, v = (torch.randn(s) for s in (q_shape, k_shape, v_shape))

        def attend():
            out = attention(q, k, v)
            if tuple(out.shape) != (q.shape[0], q.shape[1], q.shape[2], v.shape[3]):
                raise AssertionError(f"attention returned {tuple(out.shape)} for q {q_shape}, v {v_shape}")

        probe(
            outcomes, ["q ", "q,", "k ", "k and v", "heads", "head_dim", "4 dims"], attend, may_be_valid=True
        )

    local_attention()

    plan_fields = st.sampled_from(["streams", "split", "replicate"])

    @SETTINGS
    @given(
        st.one_of(
            st.tuples(plan_fields, junk()),
            st.tuples(st.sampled_from(["plan", "model", "group", "blocks"]), junk(type(None))),
        )
    )
    def plan_one_bad(arg):
        name, value = arg
        model, plan, group = Attender(), SPPlan(), None
        blocks = model.blocks
        if name == "plan":
            plan = value
        elif name == "model":
            model = value
        elif name == "group":
            group = value
        elif name == "blocks":
            blocks = value
        else:
            plan = SPPlan(**{name: value})

        def run():
            sp_model = sequence_parallel(model, group, plan, blocks=blocks)
            sp_model(torch.ones(2, 6, 8))  # (batch, tokens, features); the plan's fields are used on a call

        probe(outcomes, [name], run, may_be_valid=name not in ("plan", "model", "group", "blocks"))

    plan_one_bad()
    return outcomes


class AttentionBlock(nn.Module):
    """(batch, tokens, 8) -> same: two-head self-attention with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Attender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(AttentionBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def gather_all(t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def test_litegen_sp(dist_pool):
    for rank, outcomes in enumerate(dist_pool.run(sp_properties, world_size=2, timeout=180)):
        check(outcomes, count=rank == 0)


# ------------------------------------------------------------------------------------------------ litegen_ema


def test_litegen_ema():
    from litegen_ema import ShardedEMA

    outcomes: list[str] = []
    bad_args = st.one_of(
        st.tuples(
            st.just("decay"),
            st.one_of(
                st.floats(1.0, exclude_min=True),
                st.floats(max_value=-1e-9),
                st.just(math.nan),
                junk(int, float),
            ),
        ),
        st.tuples(
            st.just("warmup"),
            st.one_of(
                junk(type(None)),
                st.tuples(st.floats(max_value=0.0), st.floats()),
                st.tuples(st.floats(0.1, 2.0), st.floats(max_value=0.0)),
            ),
        ),
        st.tuples(st.just("update_after_step"), st.one_of(st.integers(max_value=-1), junk(int))),
        st.tuples(st.just("dtype"), st.one_of(junk(), st.sampled_from([torch.int64, torch.bool]))),
        st.tuples(st.just("sharded"), junk(bool)),
        st.tuples(st.just("model"), st.one_of(NOT_A_MODULE, st.just(nn.Linear(2, 2).requires_grad_(False)))),
    )

    @SETTINGS
    @given(bad_args)
    def build_one_bad(arg):
        name, value = arg
        kwargs = {"model": Denoiser(), name: value}
        probe(outcomes, [f"{name}=", f"{name}:"], lambda: ShardedEMA(kwargs.pop("model"), **kwargs))

    build_one_bad()
    model = Denoiser()
    ema = ShardedEMA(model, 0.9)
    names = list(ema.state_dict())

    @SETTINGS
    @given(st.sampled_from(["update", "decay_at", "swapped", "load_state_dict"]), st.data())
    def use_one_bad(method, data):
        if method in ("update", "decay_at"):
            step = data.draw(junk(int))
            probe(outcomes, ["step="], lambda: getattr(ema, method)(step))
        elif method == "swapped":
            other = data.draw(st.one_of(NOT_A_MODULE, st.just(Denoiser())))
            probe(outcomes, ["model="], lambda: ema.swapped(other).__enter__())
        else:
            state = data.draw(
                st.one_of(
                    junk(dict),
                    st.dictionaries(
                        st.one_of(st.sampled_from(names), st.text(max_size=4), st.integers()),
                        st.one_of(SHAPES.map(torch.randn), junk()),
                        max_size=len(names) + 1,
                    ),
                )
            )
            probe(outcomes, ["state_dict"], lambda: ema.load_state_dict(state))

    use_one_bad()
    check(outcomes)


# ------------------------------------------------------------------------------------------------ litegen_ckpt


def test_litegen_ckpt():
    from litegen_ckpt import Checkpointer, export_safetensors, load_safetensors

    outcomes: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        a_file = root / "a_file"
        a_file.write_text("x")
        model = Denoiser()
        checkpointer = Checkpointer(root / "ckpt")
        checkpointer.save(0, model=model)

        @SETTINGS
        @given(st.sampled_from(["root", "keep", "async_save", "process_group", "timeout"]), st.data())
        def build_one_bad(name, data):
            value = data.draw(
                {
                    "root": st.one_of(junk(str), st.just(a_file)),
                    "keep": st.one_of(st.integers(max_value=0), junk(int, type(None))),
                    "async_save": junk(bool),
                    "process_group": junk(type(None)),
                    "timeout": st.one_of(junk(type(None)), st.just(datetime.timedelta(seconds=-1))),
                }[name]
            )
            kwargs = {"root": root / "other", name: value}
            probe(outcomes, [f"{name}="], lambda: Checkpointer(kwargs.pop("root"), **kwargs))

        build_one_bad()

        @SETTINGS
        @given(
            st.sampled_from(["save step", "save stateful", "load step", "fall_back", "load stateful"]),
            st.data(),
        )
        def use_one_bad(what, data):
            if what == "save step":
                step = data.draw(st.one_of(st.integers(max_value=-1), junk(int)))
                probe(outcomes, ["step="], lambda: checkpointer.save(step, model=model))
            elif what == "load step":
                step = data.draw(st.one_of(st.integers(max_value=-1), junk(int, str), st.text(max_size=5)))
                probe(outcomes, ["step="], lambda: checkpointer.load(step, model=model))
            elif what == "fall_back":
                flag = data.draw(junk(bool))
                probe(outcomes, ["fall_back="], lambda: checkpointer.load(fall_back=flag, model=model))
            else:
                value = data.draw(st.one_of(junk(bool), st.just(torch.optim.SGD(model.parameters(), lr=0.1))))
                method = checkpointer.save if what == "save stateful" else checkpointer.load
                args = (1,) if what == "save stateful" else ()
                probe(outcomes, ["thing=", "thing is", "optimizer"], lambda: method(*args, thing=value))

        use_one_bad()

        @SETTINGS
        @given(st.sampled_from(["source", "path", "name", "model", "file", "strict"]), st.data())
        def safetensors_one_bad(name, data):
            if name in ("source", "path", "name"):
                args = {"source": model, "path": root / "out.safetensors", "name": "model"}
                args[name] = data.draw(
                    {
                        "source": st.one_of(junk(str), st.just(str(root / "missing"))),
                        "path": st.one_of(junk(str), st.just(root)),
                        "name": st.one_of(junk(str), st.text(max_size=4).map(lambda s: s + "_")),
                    }[name]
                )
                if name == "name":
                    args["source"] = root / "ckpt"
                probe(
                    outcomes,
                    [f"{name}=", "source="],
                    lambda: export_safetensors(**args),
                    errors=(ValueError, TypeError, FileNotFoundError),
                )  # a missing file: named, as Python does
            else:
                args = {"model": Denoiser(), "path": root / "out.safetensors", "strict": True}
                export_safetensors(args["model"], args["path"])
                value = data.draw(
                    {
                        "model": NOT_A_MODULE,
                        "strict": junk(bool),
                        "file": st.one_of(junk(str), st.binary(max_size=64)),
                    }[name]
                )
                if name == "file":
                    args["path"] = value
                    if isinstance(value, bytes):
                        args["path"] = root / "junk.safetensors"
                        args["path"].write_bytes(value)
                else:
                    args[name] = value
                probe(
                    outcomes,
                    [f"{name}=", "path="],
                    lambda: load_safetensors(**args),
                    errors=(ValueError, TypeError, FileNotFoundError),
                )

        safetensors_one_bad()
    check(outcomes)


# ------------------------------------------------------------------------------------------------ litegen_vae


def vae_properties() -> list[str]:
    from litegen_vae import compiled, data_parallel, sliced

    outcomes: list[str] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @SETTINGS
    @given(st.sampled_from(["fn", "slice_size", "dim", "group", "compile"]), st.data())
    def wrap_one_bad(name, data):
        value = data.draw(
            {
                "fn": junk(),
                "slice_size": st.one_of(st.integers(max_value=0), junk(int)),
                "dim": junk(int),
                "group": junk(type(None)),
                "compile": st.sampled_from(
                    [{"mode": "fastest"}, {"dynamic": "yes"}, {"fullgraph": 1}, {"backend_name": "inductor"}]
                ),
            }[name]
        )
        fn = value if name == "fn" else encode
        if name in ("fn", "slice_size", "dim"):
            kwargs = {"slice_size": 2, "dim": 0, **({name: value} if name != "fn" else {})}
            probe(outcomes, [name, "fn must"], lambda: sliced(fn, **kwargs))
        if name in ("fn", "group", "dim"):
            kwargs = {"group": None, "dim": 0, **({name: value} if name != "fn" else {})}
            probe(outcomes, [name, "fn must"], lambda: data_parallel(fn, **kwargs))
        if name in ("fn", "compile"):
            kwargs = value if name == "compile" else {}
            probe(outcomes, [*kwargs, "fn must"], lambda: compiled(fn, **kwargs))

    wrap_one_bad()

    @SETTINGS
    @given(st.one_of(SHAPES.map(torch.randn), junk()), st.integers(-6, 6))
    def call_with_any_x(x, dim):
        for wrapper in (sliced(encode, 2, dim=dim), data_parallel(encode, None, dim=dim)):

            def call(wrapper=wrapper):
                out = wrapper(x)
                if not torch.equal(out, x * 2):  # every rank passed the same x
                    raise AssertionError(
                        f"{wrapper.__name__} changed the result for x of shape {tuple(x.shape)}"
                    )

            probe(outcomes, ["x must", "dim="], call, may_be_valid=isinstance(x, torch.Tensor))

    call_with_any_x()
    return outcomes


def test_litegen_vae(dist_pool):
    for rank, outcomes in enumerate(dist_pool.run(vae_properties, world_size=2, timeout=180)):
        check(outcomes, count=rank == 0)


def test_report_the_count():
    """Run last: how many bad inputs the property tests above refused with a named error (this process)."""
    print(
        f"\nproperty tests: {OUTCOMES['named']} bad inputs refused with a named ValueError/TypeError, "
        f"{OUTCOMES['valid']} generated inputs were valid and gave correct results"
    )
