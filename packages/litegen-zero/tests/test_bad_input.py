"""Scenario 6, bad input (see ``tests/bad_input.py``): ``shard``, ``shard_frozen`` and the helpers of
``litegen_zero`` at world 2; every bad argument is refused, before any collective, naming the argument."""

from __future__ import annotations

import math

import torch
from bad_input import NOT_A_MODULE, SETTINGS, Denoiser, check, junk, probe
from hypothesis import given
from hypothesis import strategies as st
from torch import nn


def model_and_optimizer() -> tuple[Denoiser, torch.optim.Optimizer]:
    model = Denoiser()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


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
        empty_blocks = name == "blocks" and value == []  # valid: the root is the only unit
        probe(outcomes, [name], lambda: shard(model_arg, optimizer_arg, **kwargs), may_be_valid=empty_blocks)

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
        probe(outcomes, [name], lambda: shard_frozen(model_arg, **kwargs))

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
                    ["model"],
                    lambda helper=helper: (
                        helper(value) if helper is not clip_grad_norm_ else helper(value, 1.0)
                    ),
                )
            probe(outcomes, ["model"], lambda: no_sync(value).__enter__())
            return
        kwargs = {"max_norm": 1.0, "norm_type": 2.0, name: value}
        probe(outcomes, [name], lambda: clip_grad_norm_(model, **kwargs))

    helpers_one_bad()
    return outcomes


def test_litegen_zero(dist_pool):
    for rank, outcomes in enumerate(dist_pool.run(zero_properties, world_size=2, timeout=180)):
        check(outcomes, count=rank == 0)
