"""How tokenized rows become batches without wasting compute on padding: length grouping and packing.

- `padded`: rows in random order, each batch right-padded to its longest row (what HF/TRL do by default).
- `grouped`: rows of similar length share a batch (HF's `group_by_length`): a random permutation is cut
  into megabatches of `GROUP_MEGABATCHES` batches, each sorted by length, then the batches are shuffled
  (`group_by_length`, used by `sampler.ResumableSampler`, so a grouped epoch resumes exactly too).
- `packed`: rows are packed whole into sequences of at most `max_length` tokens, of near-equal size (`pack`).
  Examples never attend to each other: position ids restart at each example, and the attention mask
  is block-diagonal causal (`segment_attention_mask`), or FlashAttention-2 reads the boundaries from
  the position ids. A packed example's loss and gradients are those it has alone.

Padding efficiency (real tokens / all tokens in the batches) of each: `benchmarks/data_pipeline.py`.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from typing import Any, Literal

import torch

from lightning_falcon.data.prompts import IGNORE_INDEX

Batching = Literal["padded", "grouped", "packed"]

# Batches per sorted megabatch, HF Trainer's `group_by_length` value: large enough that neighbours in a
# megabatch have near-equal lengths, small enough that an epoch's order stays random.
GROUP_MEGABATCHES = 50


def group_by_length(order: list[int], lengths: Sequence[int], block: int, generator: torch.Generator) -> list[int]:
    """Reorder `order` so that each consecutive `block` of indices holds rows of similar length.

    `order` is cut into megabatches of `GROUP_MEGABATCHES * block`, each sorted longest first and cut
    into blocks; the blocks are shuffled with `generator`, and the block holding the longest row goes
    first, so a batch that does not fit in memory fails at the first step, not hours in.
    """
    mega = GROUP_MEGABATCHES * block
    blocks, rest = [], []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        for b in range(0, len(chunk), block):
            (blocks if len(chunk) - b >= block else rest).append(chunk[b : b + block])
    blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
    if blocks:
        longest = max(range(len(blocks)), key=lambda b: lengths[blocks[b][0]])  # blocks are sorted longest first
        blocks.insert(0, blocks.pop(longest))
    # The one short block (the epoch's remainder) goes last, so every other block stays aligned with the
    # batches: a rank's batch k is its share of block k.
    return [i for b in blocks + rest for i in b]


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most `max_length`, as equal in size as they can be.

    Rows are never split. Best-fit decreasing finds how few bins suffice; the rows are then dealt,
    longest first, each to the emptiest of that many bins (and one more bin at a time while some bin
    overflows). Equal bins matter as much as few: a batch is padded to its longest bin, so one nearly
    empty bin among full ones (the usual last bin of a first-fit packing) wastes most of its batch.
    Deterministic: every rank computes the same bins.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} rows are longer than max_length={max_length} (e.g. row {too_long[0]})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fitted = _best_fit(order, lengths, max_length)
    for count in range(len(fitted), len(fitted) + 8):
        bins = _deal(order, lengths, count)
        if max(sum(lengths[i] for i in b) for b in bins) <= max_length:
            return bins
    return fitted  # rows too coarse to balance within max_length: the tight packing stands


def _best_fit(order: list[int], lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Each row (longest first) into the fullest bin it still fits, else a new bin."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the tightest bin that fits is a bisect away
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = max_length - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, b))
    return bins


def _deal(order: list[int], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Each row (longest first) into the emptiest of `count` bins."""
    bins: list[list[int]] = [[] for _ in range(count)]
    heap = [(0, b) for b in range(count)]
    for i in order:
        total, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (total + lengths[i], b))
    return [b for b in bins if b]


class PackedRows(torch.utils.data.Dataset):
    """Tokenized rows packed into sequences: item `i` is bin `i`, its rows concatenated with restarting positions."""

    def __init__(self, rows: Any, max_length: int, lengths: Sequence[int] | None = None) -> None:
        self.rows = rows
        self.bins = pack(lengths or [len(ids) for ids in rows["input_ids"]], max_length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        input_ids, labels, position_ids = [], [], []
        for row in (self.rows[i] for i in self.bins[index]):
            n = len(row["input_ids"])
            input_ids += row["input_ids"]
            # The first token of an example is never a target alone (the loss is shifted by one); here it
            # would be predicted from the previous example's last token, so it is masked explicitly.
            labels += [IGNORE_INDEX, *row["labels"][1:]]
            position_ids += range(n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def segment_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The (batch, 1, length, length) boolean mask that lets each token see only earlier tokens of its own example.

    An example starts wherever the position id is 0. Padding after the last example carries its own
    restarting positions, so it is a segment that no real token sees, and no row of the mask is empty
    (an empty row would make SDPA return NaN).
    """
    segment = torch.cumsum(position_ids == 0, dim=-1)
    same = segment[:, :, None] == segment[:, None, :]
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def packed_attention_mask(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """The attention mask to pass with packed `position_ids`, in the form the attention backend reads.

    SDPA takes the boolean mask as is, eager attention adds it to the scores (0 or the dtype's minimum),
    and FlashAttention finds the boundaries in the position ids itself, so it gets no mask.
    """
    if "flash" in attn_implementation:
        return None
    mask = segment_attention_mask(position_ids)
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask
