"""The distributed test harness: results, failures, hangs, world sizes, sub-groups and meshes."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from dist_harness import RankError


def rank_and_sum(offset: int) -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_come_back_from_every_rank(dist_pool, world_size):
    results = dist_pool.run(rank_and_sum, 10, world_size=world_size)
    expected = sum(r + 10 for r in range(world_size))
    assert results == [(r, world_size, expected) for r in range(world_size)]


def raise_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    return dist.get_rank()


def test_a_raising_rank_fails_with_its_traceback(dist_pool):
    with pytest.raises(RankError) as info:
        dist_pool.run(raise_on_rank_one, world_size=3)
    text = str(info.value)
    assert "rank 1 raised ValueError: boom from rank one" in text
    assert "----- rank 1 traceback -----" in text and "raise_on_rank_one" in text
    # the pool survives the failure
    assert dist_pool.run(rank_and_sum, 0, world_size=3) == [(r, 3, 3.0) for r in range(3)]


def hang_on_rank_zero() -> None:
    if dist.get_rank() == 0:
        time.sleep(600)
    dist.barrier()


def test_a_hung_collective_fails_quickly_and_the_pool_recovers(dist_pool):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        dist_pool.run(hang_on_rank_zero, world_size=2, timeout=10)
    elapsed = time.monotonic() - start
    assert elapsed <= 60, elapsed
    assert "did not finish" in str(info.value) and "[0" in str(info.value)
    assert dist_pool.run(rank_and_sum, 1, world_size=2) == [(0, 2, 3.0), (1, 2, 3.0)]


def subgroups_and_mesh() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = pairs[rank // 2]
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mine)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    s = torch.tensor([float(rank)])
    dist.all_reduce(s, group=mesh.get_group("shard"))
    r = torch.tensor([float(rank)])
    dist.all_reduce(r, group=mesh.get_group("replicate"))
    return {"pair_sum": t.item(), "shard_sum": s.item(), "replicate_sum": r.item()}


def test_subgroups_and_a_named_2d_mesh(dist_pool):
    out = dist_pool.run(subgroups_and_mesh, world_size=4)
    assert [o["pair_sum"] for o in out] == [1.0, 1.0, 5.0, 5.0]
    assert [o["shard_sum"] for o in out] == [1.0, 1.0, 5.0, 5.0]  # mesh rows: [0, 1], [2, 3]
    assert [o["replicate_sum"] for o in out] == [2.0, 4.0, 2.0, 4.0]  # columns: [0, 2], [1, 3]


class Payload:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def echo_payload(p: Payload) -> Payload:
    return Payload(p.value * (dist.get_rank() + 1))


def test_objects_of_test_module_classes_and_tensors_round_trip(dist_pool):
    out = dist_pool.run(echo_payload, Payload(torch.arange(3.0)), world_size=2)
    assert torch.equal(out[1].value, torch.tensor([0.0, 2.0, 4.0]))


def test_bad_calls_are_refused(dist_pool):
    with pytest.raises(ValueError, match="world_size=5"):
        dist_pool.run(rank_and_sum, 0, world_size=5)
    with pytest.raises(ValueError, match="module-level"):
        dist_pool.run(lambda: 0, world_size=1)


def dtensor_norm_after_extra_groups(extra: int) -> float:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    for _ in range(extra):  # shift the process-group names of this world
        dist.new_group([0, 1])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    x = distribute_tensor(torch.ones(4, 2), mesh["shard"], [Shard(0)])
    return float((x * 2).norm().full_tensor())


def test_dtensor_caches_do_not_outlive_a_world(dist_pool):
    """DTensor caches sharding decisions by mesh layout, not by group: a re-formed world must not see them."""
    dist_pool.run(dtensor_norm_after_extra_groups, 10, world_size=4)
    dist_pool.run(rank_and_sum, 0, world_size=2)  # re-forms the world
    assert dist_pool.run(dtensor_norm_after_extra_groups, 0, world_size=4) == [pytest.approx(32**0.5)] * 4
