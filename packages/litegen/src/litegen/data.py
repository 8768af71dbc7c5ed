"""A deterministic, resumable data pipeline: the same samples on every rank of one SP group.

``ResumableSampler`` shuffles with ``seed + epoch`` and hands data-parallel rank ``r`` of ``n`` the
indices ``perm[r::n]``; ranks of one sequence-parallel group share a dp rank, so they see the same
samples. ``ResumableLoader`` counts the batches the trainer actually took (not what workers
prefetched), so a checkpoint taken mid-epoch resumes with exactly the next unseen batch. It never
draws from the global RNG (a ``DataLoader`` iterator otherwise takes one number from it for its
workers' seeds), so a run resumed mid-epoch draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one data-parallel rank, starting ``start`` samples into the epoch."""

    def __init__(
        self,
        size: int,
        *,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.size, self.dp_rank, self.dp_size = size, dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed by this rank

    def __len__(self) -> int:
        per_rank = self.size // self.dp_size if self.drop_last else -(-self.size // self.dp_size)
        return max(per_rank - self.start, 0)

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size - self.size % self.dp_size]
        elif self.size % self.dp_size:
            order += order[: self.dp_size - self.size % self.dp_size]  # pad by wrapping around
        return order[self.dp_rank :: self.dp_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_indices()[self.start :])


class ResumableLoader:
    """A ``DataLoader`` over a ``ResumableSampler`` whose position is part of the training state.

    Each ``iter()`` continues where the last one stopped; an exhausted epoch moves to the next.
    ``state_dict()`` / ``load_state_dict()`` hold ``{"epoch", "start"}`` (same on every rank).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **loader_kwargs: Any) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.batch_size: int = loader_kwargs["batch_size"]
        self._loader_kwargs = loader_kwargs

    def __len__(self) -> int:
        n = len(self.sampler)
        return (
            n // self.batch_size if self._loader_kwargs.get("drop_last", False) else -(-n // self.batch_size)
        )

    def __iter__(self) -> Iterator[Any]:
        if len(self) == 0:  # the epoch was consumed: the next iteration starts a new one
            self._next_epoch()
        s = self.sampler  # workers' base seed: from (seed, epoch, dp rank), not from the global RNG
        generator = torch.Generator().manual_seed(hash((s.seed, s.epoch, s.dp_rank)) % 2**63)
        loader = DataLoader(self.dataset, sampler=s, generator=generator, **self._loader_kwargs)
        for batch in loader:
            self.sampler.start += self.batch_size
            yield batch
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.sampler.epoch += 1
        self.sampler.start = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "start": self.sampler.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch, self.sampler.start = int(state["epoch"]), int(state["start"])
