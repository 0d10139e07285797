"""A split of rows -> its tokenized Arrow table and counts: batched, in worker processes, streamed to disk.

`datasets.Dataset.map` hands a format a batch of rows at a time (`DataFormat.encode_batch`: one tokenizer
call for the batch, not one per row) in `num_proc` processes, each writing its rows to an Arrow file as
they come, so memory holds a few batches whatever the number of rows. The counts come from the table
(`truncated` and `turns_dropped` columns summed by Arrow, then dropped) and from the row counts (the rows
dropped). Before that, `screen_rows` skips the rows that cannot train, counting each reason.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lightning_falcon.data.formats import DataFormat
from lightning_falcon.errors import ConfigError

# The cache's columns and the types `datasets` infers for them from lists of ints (int32 for a column named
# `input_ids`), so that every cache under one key holds the same types, `Dataset.from_dict` wrote it or not.
COLUMNS = {"input_ids": "int32", "labels": "int64", "input": "string"}
# and those of a preference pair's rejected sequence (the chosen one's are `input_ids` and `labels`)
REJECTED = {"rejected_ids": "int32", "rejected_labels": "int64"}

# Rows of a split that each process must have to pay for itself: starting one (a fork, the tokenizer
# pickled into it, its file merged) costs about what tokenizing a few thousand rows in parallel saves
# (benchmarks/data_pipeline.py).
ROWS_PER_PROCESS = 4_000


def _processes(num_proc: int | None, rows: int) -> int:
    """`num_proc`, or `default_processes` when None; never more than the rows (`datasets` would make empty
    shards of the extra processes)."""
    return min(default_processes(rows) if num_proc is None else num_proc, rows)


def default_processes(rows: int) -> int:
    """One process per `ROWS_PER_PROCESS` rows, at most one per CPU this process may run on (a Slurm allocation's)."""
    # sched_getaffinity honours a CPU set (Slurm's); macOS lacks it
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, rows // ROWS_PER_PROCESS))


def _features(pairs: bool):
    """The cache's columns (with a pair's rejected sequence, for `pairs`), and the `truncated` flag and
    `turns_dropped` count that are summed and dropped before the cache is saved."""
    from datasets import Features, List, Value

    rejected = {k: List(Value(v)) for k, v in REJECTED.items()} if pairs else {}
    return Features(
        {
            "input_ids": List(Value(COLUMNS["input_ids"])),
            "labels": List(Value(COLUMNS["labels"])),
            **rejected,
            "input": Value(COLUMNS["input"]),
            "truncated": Value("bool"),
            "turns_dropped": Value("int32"),
        }
    )


def _reasons(*columns: list, data_format: DataFormat) -> dict[str, list]:
    """Why each row of a batch is skipped ("" when kept), and whether it has a system message of its own."""
    screened = [data_format.screen(values) for values in zip(*columns, strict=True)]
    return {"reason": [reason or "" for reason, _ in screened], "system": [system for _, system in screened]}


def screen_rows(rows: Any, data_format: DataFormat, num_proc: int | None) -> tuple[Any, dict[str, int], tuple, bool]:
    """The rows that can train; how many were skipped, by reason; the first skipped (its index, its reason);
    and whether a kept row has a system message of its own."""
    import numpy as np
    import pyarrow.compute as pc

    num_proc = _processes(num_proc, len(rows))
    screened = rows.map(
        functools.partial(_reasons, data_format=data_format),
        batched=True,
        input_columns=data_format.columns,
        remove_columns=rows.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        keep_in_memory=True,
    )
    reason = screened.data.column("reason")
    counts = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(reason).to_pylist() if v["values"]}
    systems = bool(pc.any(screened.data.column("system")).as_py())
    if not counts:
        return rows, {}, (), systems
    kept = np.flatnonzero(pc.equal(reason, "").to_numpy(zero_copy_only=False))
    first = int(np.flatnonzero(pc.not_equal(reason, "").to_numpy(zero_copy_only=False))[0])
    return rows.select(kept), counts, (first, reason[first].as_py()), systems


def _encode_rows(*columns: list, data_format: DataFormat, tokenizer, max_length: int) -> dict[str, list]:
    """A batch of rows (the format's columns, in order) -> the kept rows' cache columns and `truncated` flags."""
    batch = dict(zip(data_format.columns, columns, strict=True))
    out: dict[str, list] = {"input_ids": [], "labels": [], "input": [], "truncated": [], "turns_dropped": []}
    pairs = data_format.name == "preference"
    if pairs:
        out.update({key: [] for key in REJECTED})
    for enc in data_format.encode_batch(tokenizer, batch, max_length):
        if enc is None:  # no reply token fits within max_length: dropped, counted from the row counts
            continue
        if pairs:
            out["rejected_ids"].append(enc.rejected_ids)
            out["rejected_labels"].append(enc.rejected_labels)
        out["input_ids"].append(enc.input_ids)
        out["labels"].append(enc.labels)
        out["input"].append(enc.input)
        out["truncated"].append(enc.truncated)
        out["turns_dropped"].append(enc.dropped_turns)
    return out


def tokenize_split(
    source: str,
    rows: Any,
    data_format: DataFormat,
    tokenizer,
    max_length: int,
    num_proc: int | None,
    scratch: Path,
    fingerprint: str,
) -> tuple[Any, dict[str, int]]:
    """Tokenize `rows` (a `datasets.Dataset`) into Arrow files under `scratch`; (the tokenized dataset, counts).

    Args:
        source: The data source the rows came from, for the error when none is left.
        rows: The split's rows, holding at least `data_format.columns`.
        data_format: How a row becomes ids and labels.
        tokenizer: A fast tokenizer (its batched call encodes a whole batch in one call).
        max_length: Rows are cut to this many tokens; those left without a trained token are dropped.
        num_proc: Processes that tokenize; None: `default_processes(len(rows))`.
        scratch: A directory for the tokenized Arrow files, which the returned dataset maps; the caller
            removes it once the dataset is saved elsewhere.
        fingerprint: Names the result in `datasets`' bookkeeping (the cache key and the split): without it,
            `datasets` would hash the tokenizer to make one.

    Returns:
        The kept rows with columns `COLUMNS`, and counts: rows kept, rows truncated, earlier exchanges left out
        (and the rows that lost some), rows dropped.
    """
    import pyarrow.compute as pc

    num_proc = _processes(num_proc, len(rows))
    encode = functools.partial(_encode_rows, data_format=data_format, tokenizer=tokenizer, max_length=max_length)
    scratch.mkdir(parents=True, exist_ok=True)
    tokenized = rows.map(
        encode,
        batched=True,
        input_columns=data_format.columns,
        remove_columns=rows.column_names,
        features=_features(data_format.name == "preference"),
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(scratch / "tokenized.arrow"),
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
    )
    if len(tokenized) == 0:
        raise ConfigError(
            f"every one of the {len(rows)} rows of dataset {source} leaves no response token "
            f"within data.max_length={max_length}. Fix: raise --data.max_length"
        )
    truncated = pc.sum(tokenized.data.column("truncated")).as_py()
    turns = tokenized.data.column("turns_dropped")
    stats = {
        "rows": len(tokenized),
        "truncated": truncated,
        "turns_dropped": pc.sum(turns).as_py() or 0,
        "rows_short": pc.sum(pc.greater(turns, 0)).as_py() or 0,  # rows that lost earlier exchanges
        "dropped": len(rows) - len(tokenized),
    }
    return tokenized.remove_columns(["truncated", "turns_dropped"]), stats
