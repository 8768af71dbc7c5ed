"""The resumable sampler and loader: partitioning, determinism, exact mid-epoch resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from litegen.data import ResumableLoader, ResumableSampler
from torch.utils.data import Dataset


class Numbers(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def make(n=23, dp_rank=0, dp_size=1, batch=2, seed=5, shuffle=True):
    sampler = ResumableSampler(n, dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=shuffle)
    return ResumableLoader(Numbers(n), sampler, batch_size=batch, drop_last=True)


def take(loader, count):
    return [b.tolist() for b in itertools.islice(iter_forever(loader), count)]


def iter_forever(loader):
    while True:
        yield from loader


def test_dp_ranks_partition_each_epoch_and_epochs_differ():
    per_rank = [list(ResumableSampler(23, dp_rank=r, dp_size=3, seed=1)) for r in range(3)]
    flat = sorted(i for part in per_rank for i in part)
    assert len(flat) == 21 and len(set(flat)) == 21  # drop_last: 23 -> 21, no repeats
    s = ResumableSampler(23, dp_rank=0, dp_size=3, seed=1)
    first = list(s)
    s.epoch = 1
    assert list(s) != first


def test_same_dp_rank_same_samples():
    """Ranks of one sequence-parallel group share a dp rank, hence the same batches."""
    assert take(make(dp_rank=1, dp_size=2), 7) == take(make(dp_rank=1, dp_size=2), 7)


def test_resume_mid_epoch_gives_exactly_the_rest():
    straight = take(make(), 20)  # 11 samples/epoch, batch 2 -> 5 steps per epoch: crosses 3 epochs
    for stop in (1, 3, 5, 7, 13):
        first = make()
        head = take(first, stop)
        state = first.state_dict()
        second = make()
        second.load_state_dict(state)
        assert head + take(second, 20 - stop) == straight, stop


def test_len_and_epoch_rollover():
    loader = make(n=10, batch=3)
    assert len(loader) == 3
    assert len(list(loader)) == 3 and loader.state_dict() == {"epoch": 1, "position": 0, "size": 10}


def steps_in_global_order(loaders, steps):
    """``steps`` batches from each simulated dp rank, merged back into the order the epoch hands them out."""
    batches = [take(loader, steps) for loader in loaders]
    return [
        sample
        for step in zip(*batches, strict=True)
        for column in zip(*step, strict=True)  # sample j of every rank, rank order
        for sample in column
    ]


@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_under_another_dp_size_continues_the_epoch_exactly(new_dp):
    """Consume 2 steps at dp 2 (global batch 8 of 40), resume at ``new_dp``: the rest of the epoch, in order."""
    epoch = list(ResumableSampler(40, dp_rank=0, dp_size=1, seed=5))
    before = [make(n=40, dp_rank=r, dp_size=2, batch=4) for r in range(2)]
    assert steps_in_global_order(before, 2) == epoch[:16]
    (state,) = {tuple(loader.state_dict().items()) for loader in before}  # the same on every rank
    after = [make(n=40, dp_rank=r, dp_size=new_dp, batch=8 // new_dp) for r in range(new_dp)]
    for loader in after:
        loader.load_state_dict(dict(state))
    assert {len(loader) for loader in after} == {3}
    assert steps_in_global_order(after, 3) == epoch[16:]
    next_epoch = ResumableSampler(40, dp_rank=0, dp_size=1, seed=5)
    next_epoch.epoch = 1
    assert steps_in_global_order(after, 1) == list(next_epoch)[:8]


def test_a_position_from_another_dataset_size_is_refused():
    state = make(n=40).state_dict()
    with pytest.raises(ValueError, match="dataset of size 40, the current dataset has size 41"):
        make(n=41).load_state_dict(state)


def test_iterating_never_draws_from_the_global_rng():
    """A DataLoader iterator takes a number from the global RNG; resuming mid-epoch would shift the noise."""
    loader = make()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(loader, 15)  # crosses epochs: a new iterator per epoch
    assert torch.equal(torch.rand(3), expected)
