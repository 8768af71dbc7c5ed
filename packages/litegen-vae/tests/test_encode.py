"""sliced, data_parallel and compiled: equal to the plain function, in one process and on real gloo
groups of 2, 3 and 4 ranks; bad input is refused.

Distributed cases: each world size runs all its cases in one harness call (re-forming a world costs a
second); every rank compares its result with the plain function computed locally and returns the
names of the cases that differ.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from litegen_vae import compiled, data_parallel, sliced
from torch import nn

Pair = collections.namedtuple("Pair", ["first", "second"])


@dataclass(frozen=True)
class Latents:
    mean: torch.Tensor
    extras: dict
    name: str = "latents"


class Gaussian:
    """Like diffusers' DiagonalGaussianDistribution: tensor attributes derived in __init__."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, self.logvar = parameters.chunk(2, dim=1)
        self.deterministic = False


def tree_fn(x: torch.Tensor) -> dict:
    """Batch-invariant (exact under any split) and returns every kind of container."""
    return {
        "double": x * 2,
        "pair": Pair(x.sin(), [x.amax(dim=-1)]),
        "latents": Latents(x.cos(), {"neg": -x, "none": None}),
        "gaussian": Gaussian(torch.cat([x, x.exp()], dim=1)),
        "scale": 0.5,
    }


def assert_trees_equal(out, ref) -> None:
    assert out["scale"] == ref["scale"] and out["latents"].name == ref["latents"].name
    pairs = [
        (out["double"], ref["double"]),
        (out["pair"].first, ref["pair"].first),
        (out["pair"].second[0], ref["pair"].second[0]),
        (out["latents"].mean, ref["latents"].mean),
        (out["latents"].extras["neg"], ref["latents"].extras["neg"]),
        (out["gaussian"].parameters, ref["gaussian"].parameters),
        (out["gaussian"].logvar, ref["gaussian"].logvar),
    ]
    assert isinstance(out["pair"], Pair) and out["latents"].extras["none"] is None
    for got, want in pairs:
        assert torch.equal(got, want)


def small_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
    )


@pytest.mark.parametrize("batch", [1, 4, 7])
@pytest.mark.parametrize("slice_size", [1, 3, 7, 10])
def test_sliced_equals_the_plain_function_for_pytrees(batch, slice_size):
    x = torch.randn(batch, 2, 3, 5)
    assert_trees_equal(sliced(tree_fn, slice_size)(x), tree_fn(x))


def test_sliced_conv_encoder_images_and_video_frames():
    net = small_encoder()
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sliced(net, 3)(x), net(x), rtol=1e-5, atol=1e-6)
    frames = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))  # per frame: exact to split on frames
    video = torch.randn(2, 3, 5, 6, 6)
    with torch.no_grad():
        for dim in (2, -3):
            torch.testing.assert_close(sliced(frames, 2, dim=dim)(video), frames(video), rtol=1e-5, atol=1e-6)


def test_sliced_passes_extra_arguments_and_gradients_flow():
    net = small_encoder()
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    scaled = sliced(lambda x, scale, shift=0.0: net(x) * scale + shift, 2)
    loss = scaled(x, 3.0, shift=1.0).square().sum()
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss = (net(x) * 3.0 + 1.0).square().sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_data_parallel_without_a_process_group_is_the_plain_function():
    assert not dist.is_initialized()
    x = torch.randn(5, 2, 3)
    assert_trees_equal(data_parallel(tree_fn)(x), tree_fn(x))
    frames = sliced(data_parallel(lambda x: (x * 2, {"sin": x.sin()}), dim=1), 1, dim=1)(x)
    assert torch.equal(frames[0], x * 2) and torch.equal(frames[1]["sin"], x.sin())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: sliced(tree_fn, 0), ValueError, r"slice_size=0; allowed: an int >= 1"),
        (lambda: sliced(tree_fn, -2), ValueError, r"slice_size=-2"),
        (lambda: sliced(tree_fn, 2.5), TypeError, r"slice_size=2.5 \(float\); allowed: an int"),
        (lambda: sliced(tree_fn, True), TypeError, r"slice_size=True"),
        (lambda: sliced(tree_fn, 2, dim="0"), TypeError, r"dim='0'"),
        (lambda: sliced("encode", 2), TypeError, r"fn must be callable"),
        (
            lambda: data_parallel(tree_fn, group="sp"),
            TypeError,
            r"group='sp' \(str\); allowed: a torch.distributed.ProcessGroup",
        ),
        (lambda: data_parallel(tree_fn, group=dist.GroupMember.NON_GROUP_MEMBER), ValueError, r"not in it"),
        (lambda: compiled(3), TypeError, r"compiled: fn must be callable"),
    ],
)
def test_bad_arguments_are_refused_when_wrapping(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("wrap", [lambda f: sliced(f, 2, dim=4), lambda f: data_parallel(f, dim=-5)])
def test_a_dim_out_of_range_is_refused_at_the_call(wrap):
    with pytest.raises(
        ValueError, match=r"dim=-?\d is out of range for x of shape \(3, 2, 4, 4\); allowed: -4..3"
    ):
        wrap(tree_fn)(torch.randn(3, 2, 4, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        wrap(tree_fn)([1, 2, 3])


def test_bad_outputs_are_explained():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"non-tensor output 0 differs between slices \(\[2, 2, 1\]\)"):
        sliced(lambda x: (x.size(0), x), 2)(x)
    with pytest.raises(
        ValueError, match=r"output tensor 1 has shape \(\): it cannot be concatenated on dim=0"
    ):
        sliced(lambda x: (x, x.sum()), 2)(x)
    with pytest.raises(TypeError, match="fn returned a set"):
        sliced(lambda x: {1, 2}, 2)(x)
    with pytest.raises(ValueError, match="different structures"):
        sliced(lambda x: [x] * x.size(0), 2)(x)


def raising_backend(gm, example_inputs):
    raising_backend.calls += 1
    raise RuntimeError("no compiler here")


def test_compiled_falls_back_to_eager_with_one_warning(caplog):
    raising_backend.calls = 0
    encode = sliced(compiled(tree_fn, backend=raising_backend), 2)
    x = torch.randn(5, 3)
    with caplog.at_level(logging.WARNING, logger="litegen_vae"):
        for _ in range(3):
            assert_trees_equal(encode(x), tree_fn(x))
    warnings = [r for r in caplog.records if r.name.startswith("litegen_vae")]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage(), warnings
    assert raising_backend.calls == 1


def test_compiled_is_eager_where_torch_compile_is_unsupported(monkeypatch, caplog):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    x = torch.randn(3, 2)
    with caplog.at_level(logging.WARNING, logger="litegen_vae"):
        encode = compiled(tree_fn)
        assert_trees_equal(encode(x), tree_fn(x))
    assert [r.getMessage() for r in caplog.records] == [
        "compiled: torch.compile does not support this platform or Python version; running tree_fn eagerly"
    ]


def test_compiled_compiles_the_innermost_function_and_keeps_wrappers_eager():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([node.target for node in gm.graph.nodes if node.op == "call_function"])
        return gm.forward

    encode = sliced(data_parallel(compiled(lambda x: x.sin() * 2, backend=recording_backend)), 2)
    assert encode.__wrapped__.__wrapped__.__wrapped__.__name__ == "<lambda>"  # compiled innermost
    x = torch.randn(5, 3)
    torch.testing.assert_close(encode(x), x.sin() * 2, rtol=0, atol=0)
    assert graphs and all(torch.cat not in graph for graph in graphs), graphs  # the slices' concat is eager


def test_compiled_really_compiles_with_the_default_backend():
    x = torch.randn(4, 3, 5)  # slices of 2: one graph
    encode = sliced(compiled(lambda x: nn.functional.silu(x) * 2), 2)
    torch.testing.assert_close(encode(x), nn.functional.silu(x) * 2)


# ---- data_parallel on real process groups --------------------------------------------------------
def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Convolutions may round differently for another batch size; the gather itself is exact."""
    return out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def trees_equal(out, ref) -> bool:
    try:
        assert_trees_equal(out, ref)
    except AssertionError:
        return False
    return True


def image_and_video_cases(world: int) -> list[str]:
    """Image batches (b, c, h, w) on dim 0 and videos (b, c, t, h, w) on frames; returns failing cases."""
    failures = []
    net, frames = small_encoder(), nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
    torch.manual_seed(1)  # every rank draws the same batches
    with torch.no_grad():
        for batch in sorted({1, world - 1, world + 1, 2 * world + 1}):
            x = torch.randn(batch, 3, 8, 8)
            if not close(data_parallel(net)(x), net(x)):
                failures.append(f"conv batch={batch}")
            if not trees_equal(data_parallel(tree_fn)(x), tree_fn(x)):
                failures.append(f"pytree batch={batch}")
            if not trees_equal(data_parallel(tree_fn, dist.group.WORLD)(x), tree_fn(x)):
                failures.append(f"explicit world group batch={batch}")
            if not trees_equal(sliced(data_parallel(tree_fn), 2)(x), tree_fn(x)):
                failures.append(f"sliced(data_parallel) batch={batch}")
            if not trees_equal(data_parallel(sliced(tree_fn, 2))(x), tree_fn(x)):
                failures.append(f"data_parallel(sliced) batch={batch}")
        for length in sorted({2, world + 1}):
            video = torch.randn(2, 3, length, 6, 6)
            for dim in (2, -3):
                if not close(data_parallel(frames, dim=dim)(video), frames(video)):
                    failures.append(f"video frames={length} dim={dim}")
                if not close(data_parallel(sliced(frames, 1, dim=dim), dim=dim)(video), frames(video)):
                    failures.append(f"video data_parallel(sliced) frames={length} dim={dim}")
        empty = torch.randn(0, 3, 8, 8)
        if not close(data_parallel(net)(empty), net(empty)):
            failures.append("empty batch")
    return failures


def errors_on_every_rank(world: int) -> dict[str, str]:
    """Bad input raises ValueError on every rank: a dim out of range before any collective, and
    batches of different sizes on different ranks at the first (small) collective."""
    messages = {}
    try:
        data_parallel(tree_fn, dim=4)(torch.randn(3, 2, 4, 4))
    except ValueError as error:
        messages["dim"] = str(error)
    try:
        data_parallel(tree_fn)(torch.randn(3 + (dist.get_rank() == 0), 2))
    except ValueError as error:
        messages["batch"] = str(error)
    try:
        data_parallel(lambda x: (x, x.size(0)))(
            torch.randn(world + 1, 2)
        )  # a constant that depends on the batch
    except ValueError as error:
        messages["constant"] = str(error)
    dist.barrier()
    return messages


def compiled_composition(world: int) -> bool:
    encode = sliced(data_parallel(compiled(tree_fn, backend="eager")), 2)
    x = torch.randn(2 * world + 1, 3)
    return trees_equal(encode(x), tree_fn(x))


def subgroups() -> dict:
    """Two pairs (like SP groups of 2) encode two different batches; the other pair's group is refused."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    torch.manual_seed(rank // 2)
    x = torch.randn(3, 4, 5)
    result = {"pair": trees_equal(data_parallel(tree_fn, pairs[rank // 2])(x), tree_fn(x))}
    try:
        data_parallel(tree_fn, pairs[1 - rank // 2])
    except ValueError as error:
        result["other pair"] = str(error)
    return result


@pytest.mark.parametrize("world", [2, 3, 4])
def test_data_parallel_equals_the_plain_function(dist_pool, world):
    per_rank = dist_pool.run(image_and_video_cases, world, world_size=world, timeout=120)
    assert per_rank == [[]] * world, per_rank
    messages = dist_pool.run(errors_on_every_rank, world, world_size=world)
    for rank_messages in messages:
        assert "dim=4 is out of range for x of shape (3, 2, 4, 4)" in rank_messages["dim"]
        assert f"batches of {[4] + [3] * (world - 1)} items on dim 0" in rank_messages["batch"]
        assert "non-tensor outputs" in rank_messages["constant"]
    if world == 2:
        assert dist_pool.run(compiled_composition, world, world_size=world, timeout=120) == [True] * world
    if world == 4:
        out = dist_pool.run(subgroups, world_size=4)
        assert [o["pair"] for o in out] == [True] * 4
        assert all("this process is not in it" in o["other pair"] for o in out), out
