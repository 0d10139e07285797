"""Each epoch's rows drawn from several sources by weight, from (seed, epoch) alone.

An epoch holds as many items as all sources together (an item is a row, or a packed sequence of one
source's rows), so a mix of one source is that source, each item once, in its own order.

- **Quotas.** Source `i` gets `quota[i]` items an epoch, so that its share of the epoch's *rows* is
  `weight[i] / sum(weights)`: the shares are rounded to whole items by the largest remainder, so a count
  is off its exact share by less than one item, the same in every epoch (`quotas`).
- **The draw** is sampling without replacement within an epoch, pass by pass: a source whose quota is
  below its items gives a random subset each epoch (each epoch's drawn afresh, so subsets of different
  epochs may overlap); one above them gives every item once per whole pass and a random subset for the
  rest, so within an epoch no item comes twice before every item of its source has come once. A source
  whose quota equals its items gives each item once, drawing nothing (`Mix.draw`).

The draw uses a generator of its own, seeded from (seed, epoch, source), so it leaves the order the
sampler then shuffles the epoch into (`sampler.ResumableSampler`) as it was without a mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def quotas(weights: Sequence[float], items: Sequence[int], rows: Sequence[int]) -> list[int]:
    """Items each source gives an epoch of `sum(items)` items, so that its share of rows follows its weight.

    Args:
        weights: Each source's weight (> 0).
        items: Each source's items (rows, or packed sequences).
        rows: Each source's rows; `rows[i] / items[i]` rows make one of its items.
    """
    total = sum(items)
    # items ∝ weight / (rows per item): a source of long sequences needs fewer of them for its share of rows
    need = [w * n / r for w, n, r in zip(weights, items, rows, strict=True)]
    exact = [total * x / sum(need) for x in need]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Mix:
    """Sources laid end to end in one dataset: source `i`'s items are `offsets[i]` .. `offsets[i] + items[i] - 1`."""

    items: tuple[int, ...]
    quotas: tuple[int, ...]
    seed: int

    @property
    def offsets(self) -> list[int]:
        return [sum(self.items[:i]) for i in range(len(self.items))]

    @property
    def identity(self) -> bool:
        """Every item once, an epoch: nothing to draw."""
        return self.items == self.quotas

    def draw(self, epoch: int) -> list[int]:
        """The items of epoch `epoch`, grouped by source (the sampler shuffles them)."""
        drawn: list[int] = []
        for source, (offset, items, quota) in enumerate(zip(self.offsets, self.items, self.quotas, strict=True)):
            passes, rest = divmod(quota, items)
            drawn += list(range(offset, offset + items)) * passes
            if rest:
                rng = np.random.default_rng([self.seed % 2**63, epoch, source])  # entropy must be >= 0
                drawn += (offset + rng.choice(items, size=rest, replace=False)).tolist()
        return drawn
