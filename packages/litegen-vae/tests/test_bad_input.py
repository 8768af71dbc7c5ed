"""Scenario 6, bad input (see ``tests/bad_input.py``): the ``sliced``, ``data_parallel`` and ``compiled``
wrappers at world 2; every bad argument is refused naming the argument, every valid ``x`` gives ``fn(x)``."""

from __future__ import annotations

import torch
from bad_input import SETTINGS, SHAPES, check, junk, probe
from hypothesis import given
from hypothesis import strategies as st


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
            probe(outcomes, [name], lambda: sliced(fn, **kwargs))
        if name in ("fn", "group", "dim"):
            kwargs = {"group": None, "dim": 0, **({name: value} if name != "fn" else {})}
            probe(outcomes, [name], lambda: data_parallel(fn, **kwargs))
        if name in ("fn", "compile"):
            kwargs = value if name == "compile" else {}
            probe(outcomes, [*kwargs] or ["fn"], lambda: compiled(fn, **kwargs))

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

            probe(outcomes, ["x", "dim"], call, may_be_valid=isinstance(x, torch.Tensor))

    call_with_any_x()
    return outcomes


def test_litegen_vae(dist_pool):
    for rank, outcomes in enumerate(dist_pool.run(vae_properties, world_size=2, timeout=180)):
        check(outcomes, count=rank == 0)
