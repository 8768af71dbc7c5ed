"""Scenario 6, bad input (see ``tests/bad_input.py``): split/gather, Ulysses and local attention, and
``sequence_parallel`` plans at world 2; every bad input is refused naming the argument, every valid one gives
the single-process result (the split/gather round trip, attention over the gathered sequence)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bad_input import SETTINGS, SHAPES, check, junk, probe
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

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
            ["x", "dim", "group"],
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
            [name],
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
            ["q", "k", "v", "seq_len", *([bad] if bad != "ok" else [])],
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

        probe(outcomes, ["q", "k", "v"], attend, may_be_valid=True)

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

        is_field = name not in ("plan", "model", "group", "blocks")
        field_names = [f"SPPlan.{name}", f"SPPlan({name}="]  # the two forms the messages use
        probe(outcomes, field_names if is_field else [name], run, may_be_valid=is_field)

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
