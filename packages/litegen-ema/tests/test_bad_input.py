"""Scenario 6, bad input (see ``tests/bad_input.py``): ``ShardedEMA``'s constructor and methods; every bad
argument is refused naming the argument."""

from __future__ import annotations

import math

import torch
from bad_input import NOT_A_MODULE, SETTINGS, SHAPES, Denoiser, check, junk, probe
from hypothesis import given
from hypothesis import strategies as st
from torch import nn


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
        probe(outcomes, [name], lambda: ShardedEMA(kwargs.pop("model"), **kwargs))

    build_one_bad()
    model = Denoiser()
    ema = ShardedEMA(model, 0.9)
    names = list(ema.state_dict())

    @SETTINGS
    @given(st.sampled_from(["update", "decay_at", "swapped", "load_state_dict"]), st.data())
    def use_one_bad(method, data):
        if method in ("update", "decay_at"):
            step = data.draw(junk(int))
            probe(outcomes, ["step"], lambda: getattr(ema, method)(step))
        elif method == "swapped":
            other = data.draw(st.one_of(NOT_A_MODULE, st.just(Denoiser())))
            probe(outcomes, ["model"], lambda: ema.swapped(other).__enter__())
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
