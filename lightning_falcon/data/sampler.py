"""Exact resume of the data order: a run killed mid-epoch and resumed trains on the rows it had not yet seen.

Lightning restores the weights, the optimizer, the scheduler and the loop counters, but not where in
an epoch's order a run stopped. `ResumableSampler` draws each epoch's order from (seed, epoch) alone,
and skips what the interrupted epoch had already used. `ResumableLoader` counts the batches it has
handed out and checkpoints the count. Lightning checkpoints any train loader that has `state_dict` /
`load_state_dict`, and it fetches no batch ahead when the loader has a length, so the count is
exactly the batches trained on. Checkpoints fall on optimizer-step boundaries, so a kill inside a
gradient-accumulation window replays that whole window.

A mix of several sources changes which rows an epoch holds, from (seed, epoch) alone too (`mixing.Mix`).

The random number generators are the other half of an exact resume: `training.rng.RNGState`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_falcon.data.batching import group_by_length
from lightning_falcon.data.mixing import Mix


class ResumableSampler(DistributedSampler):
    """A `DistributedSampler` (so Lightning keeps it under DDP) whose epoch can start part-way.

    The order of epoch `e` is a permutation seeded with `seed + e`, split across ranks as
    `DistributedSampler` does: the same for a resumed run as for an uninterrupted one. Given the rows'
    `lengths`, the permutation is grouped by length (`batching.group_by_length`) in blocks of
    `batch_size` x ranks, so each rank's batch holds rows of similar length. Given a `mix`, the
    permutation orders the items that `mix.draw(epoch)` gives instead of every item once.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        mix: Mix | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths, self.batch_size = lengths, batch_size
        self.mix = None if mix is None or mix.identity else mix
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank's share already used)

    def _order(self) -> list[int]:
        if self.lengths is None and self.mix is None:
            return list(super().__iter__())
        # DistributedSampler's own permutation, of the epoch's items (as many as the dataset has)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        if self.mix is not None:
            items = self.mix.draw(self.epoch)
            order = [items[i] for i in order]
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.batch_size * self.num_replicas, generator)
        order = (order * -(-self.total_size // len(order)))[: self.total_size]  # DistributedSampler's equal shares
        return order[self.rank : self.total_size : self.num_replicas]

    def skip(self, epoch: int, samples: int) -> None:
        """Start epoch `epoch` after its first `samples` samples (of this rank's share)."""
        self._skip = (epoch, samples)

    def __iter__(self) -> Iterator[int]:
        indices = self._order()
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
            self._skip = None  # only the interrupted epoch resumes part-way
        return iter(indices)


class ResumableLoader(DataLoader):
    """A `DataLoader` over a `ResumableSampler` that checkpoints how far into the epoch it got."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches = 0  # handed out in the current epoch, counting those skipped on a resume

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        start = sampler._skip[1] // self.batch_size if sampler._skip and sampler._skip[0] == sampler.epoch else 0
        self._batches = start
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.skip(state_dict["epoch"], state_dict["batches"] * self.batch_size)
