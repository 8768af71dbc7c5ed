"""A deterministic, resumable data pipeline: the same samples on every rank of one SP group.

``ResumableSampler`` shuffles with ``seed + epoch``; the epoch is consumed as a prefix of that order,
and its position is a *global* sample index, the same on every rank. Of what remains, data-parallel
rank ``r`` of ``n`` gets ``rest[r::n]``, so one step of ``batch_size`` per rank takes the next
``batch_size * n`` samples of the order, whatever ``n`` is: a run resumed under another data-parallel
size continues the epoch exactly, no sample skipped or repeated. Ranks of one sequence-parallel group
share a dp rank, so they see the same samples.

``ResumableLoader`` counts the batches the trainer actually took (not what workers prefetched), so a
checkpoint taken mid-epoch resumes with exactly the next unseen batch. It never draws from the global
RNG (a ``DataLoader`` iterator otherwise takes one number from it for its workers' seeds), so a run
resumed mid-epoch draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Data-parallel rank ``dp_rank``'s share of the epoch's samples from global index ``position`` on.

    ``drop_last``: the remainder is trimmed to a multiple of ``dp_size``; otherwise it is padded by
    wrapping around to the start of the epoch's order.
    """

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
        self.position = 0  # samples of this epoch's order already consumed, by all dp ranks together

    def __len__(self) -> int:
        rest = self.size - self.position
        return rest // self.dp_size if self.drop_last else -(-rest // self.dp_size)

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        rest = order[self.position :]
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % self.dp_size]
        elif len(rest) % self.dp_size:
            rest += itertools.islice(itertools.cycle(order), self.dp_size - len(rest) % self.dp_size)
        return rest[self.dp_rank :: self.dp_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_indices())


class ResumableLoader:
    """A ``DataLoader`` over a ``ResumableSampler`` whose position is part of the training state.

    Each ``iter()`` continues where the last one stopped; an exhausted epoch moves to the next.
    ``state_dict()`` / ``load_state_dict()`` hold ``{"epoch", "position", "size"}`` (the global
    position in the epoch and the dataset size; the same on every rank). Loading a state saved for
    another dataset size raises a ``ValueError``: its positions would name other samples.
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
            s.position = min(s.position + self.batch_size * s.dp_size, s.size)
            yield batch
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.sampler.epoch += 1
        self.sampler.position = 0

    def state_dict(self) -> dict[str, int]:
        s = self.sampler
        return {"epoch": s.epoch, "position": s.position, "size": s.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = int(state["size"])
        if saved != self.sampler.size:
            raise ValueError(
                f"data: the checkpoint's data position is for a dataset of size {saved}, the current "
                f"dataset has size {self.sampler.size}; resume with the same dataset (or start a new run)"
            )
        self.sampler.epoch, self.sampler.position = int(state["epoch"]), int(state["position"])
