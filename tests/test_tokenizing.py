"""Batched tokenizing (data/tokenizing.py) writes the cache row for row as `DataFormat.encode` defines it."""

import datasets
import pytest
from helpers import GUANACO, MIDJOURNEY, prepared_datamodule

from lightning_falcon.data.source import Source

# (the source and max_length as the shipped config sets them, or cut short so rows are truncated and dropped,
# num_proc)
CASES = {
    "midjourney as configs/tiny.yaml": (Source(MIDJOURNEY, template="instruction"), 128, 1),
    "guanaco as configs/falcon-7b-guanaco.yaml": (Source(GUANACO, format="turns", val_fraction=0.05), 512, 1),
    "midjourney cut to 40 tokens, 2 processes": (Source(MIDJOURNEY), 40, 2),
    "guanaco cut to 24 tokens, 2 processes": (Source(GUANACO, format="turns"), 24, 2),
}


def per_row(dm, rows) -> tuple[datasets.Dataset, dict[str, int]]:
    """A split tokenized one row at a time with `format.encode`, stored as a list of rows: the reference."""
    tokenizer, max_length = dm.tokenizer, dm.hparams.max_length
    ids, labels, inputs, truncated, dropped = [], [], [], 0, 0
    for row in rows:
        enc = dm.format.encode(tokenizer, row, max_length)
        if enc is None:
            dropped += 1
            continue
        ids.append(enc.input_ids)
        labels.append(enc.labels)
        inputs.append(dm.format.raw_input(tokenizer, row, enc))
        truncated += enc.truncated
    stats = {"rows": len(ids), "truncated": truncated, "dropped": dropped}
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "input": inputs}), stats


@pytest.mark.parametrize("case", list(CASES))
def test_the_batched_cache_holds_what_per_row_encoding_gives(tmp_path, case):
    source, max_length, num_proc = CASES[case]
    dm = prepared_datamodule(tmp_path, dataset=source, max_length=max_length, num_proc=num_proc)
    # the splits prepare_data tokenized: the same rows, in the same order
    (member,) = dm.members
    rows, _ = dm._load(member, member.source.dataset, "train")
    parts = rows.train_test_split(test_size=member.source.val_fraction, seed=dm.hparams.seed)
    totals = {"truncated": 0, "dropped": 0}
    for name, part in (("train", parts["train"]), ("val", parts["test"])):
        expected, stats = per_row(dm, part)
        cached = datasets.load_from_disk(str(dm.cache_paths[member.name] / name))
        assert cached.features == expected.features  # the same column types (input_ids as int32)
        assert cached.to_dict() == expected.to_dict()
        assert dm.stats[name] == {**stats, "empty": 0}
        totals = {k: totals[k] + stats[k] for k in totals}
    if dm.hparams.max_length < 128:  # the short cases test what they mean to
        assert totals["truncated"] > 0 and totals["dropped"] > 0


def test_num_proc_is_not_part_of_the_cache_key(tmp_path):
    dm = prepared_datamodule(tmp_path, num_proc=2)
    assert dm.cache_paths == prepared_datamodule(tmp_path, num_proc=1).cache_paths
