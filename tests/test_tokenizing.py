"""Batched tokenizing (data/tokenizing.py) writes the cache row for row as each format's per-row encoding defines it."""

import datasets
import pytest
from helpers import GUANACO, MIDJOURNEY, prepared_datamodule

from lightning_falcon.assets import resolve
from lightning_falcon.data import conversations
from lightning_falcon.data.formats import Turns
from lightning_falcon.data.prompts import encode_turns, prompt_length
from lightning_falcon.data.source import Source

GUANACO_CHAT = resolve("asset:data/guanaco-chat.jsonl")

# (the source and datamodule settings as the shipped config sets them, or cut short so rows are truncated and
# dropped, num_proc)
CASES = {
    "midjourney as configs/tiny.yaml": (
        Source(MIDJOURNEY, format="prompt_response"),
        {"chat_template": "instruction", "max_length": 128},
        1,
    ),
    "guanaco as configs/falcon-7b-guanaco.yaml": (
        Source(GUANACO, format="turns", val_fraction=0.05),
        {"max_length": 512},
        1,
    ),
    "midjourney cut to 40 tokens, 2 processes": (Source(MIDJOURNEY), {"max_length": 40}, 2),
    "guanaco cut to 24 tokens, 2 processes": (Source(GUANACO, format="turns"), {"max_length": 24}, 2),
    "guanaco chat, the tokenizer's template": (Source(GUANACO_CHAT), {"max_length": 512}, 1),
    "guanaco chat, last reply, cut to 48 tokens, 2 processes": (
        Source(GUANACO_CHAT),
        {"max_length": 48, "train_on": "last_assistant", "system_prompt": "Be brief."},
        2,
    ),
}


def encode_row(fmt, tokenizer, row, max_length):
    """One row as its format's per-row definition encodes it: a `turns` text with `encode_turns` (its input: the
    conversation before the first trained reply), a conversation with `conversations.encode` alone."""
    if isinstance(fmt, Turns):
        text = str(row[fmt.text_column])
        enc = encode_turns(tokenizer, text, fmt.human_marker, fmt.assistant_marker, max_length)
        if enc is not None:
            enc.input = tokenizer.decode(enc.input_ids[: prompt_length(enc.labels)]).strip()
        return enc
    messages = fmt.messages(tuple(row[c] for c in fmt.columns))
    (enc,) = conversations.encode(tokenizer, fmt.rendering, [messages], max_length)
    return enc


def per_row(dm, rows) -> tuple[datasets.Dataset, dict[str, int]]:
    """A split tokenized one row at a time, stored as a list of rows: the reference."""
    tokenizer, max_length = dm.tokenizer, dm.hparams.max_length
    ids, labels, inputs = [], [], []
    stats = {"rows": 0, "truncated": 0, "turns_dropped": 0, "rows_short": 0, "dropped": 0}
    for row in rows:
        enc = encode_row(dm.format, tokenizer, row, max_length)
        if enc is None:
            stats["dropped"] += 1
            continue
        ids.append(enc.input_ids)
        labels.append(enc.labels)
        inputs.append(enc.input)
        stats["rows"] += 1
        stats["truncated"] += enc.truncated
        stats["turns_dropped"] += enc.dropped_turns
        stats["rows_short"] += enc.dropped_turns > 0
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "input": inputs}), stats


@pytest.mark.parametrize("case", list(CASES))
def test_the_batched_cache_holds_what_per_row_encoding_gives(tmp_path, case):
    source, settings, num_proc = CASES[case]
    dm = prepared_datamodule(tmp_path, dataset=source, num_proc=num_proc, **settings)
    # the splits prepare_data tokenized: the same rows, in the same order
    (member,) = dm.members
    rows, skipped, _ = dm._load(member, member.source.dataset, "train")
    assert skipped == {}
    parts = rows.train_test_split(test_size=member.source.val_fraction, seed=dm.hparams.seed)
    totals = {"truncated": 0, "dropped": 0, "turns_dropped": 0}
    for name, part in (("train", parts["train"]), ("val", parts["test"])):
        expected, stats = per_row(dm, part)
        cached = datasets.load_from_disk(str(dm.cache_paths[member.name] / name))
        assert cached.features == expected.features  # the same column types (input_ids as int32)
        assert cached.to_dict() == expected.to_dict()
        assert dm.stats[name] == {**stats, "skipped": {}}
        totals = {k: totals[k] + stats[k] for k in totals}
    if dm.hparams.max_length < 128:  # the short cases test what they mean to
        assert totals["truncated"] > 0 and totals["dropped"] > 0
        if source.dataset == GUANACO_CHAT:
            assert totals["turns_dropped"] > 0  # earlier exchanges were left out to fit


def test_num_proc_is_not_part_of_the_cache_key(tmp_path):
    dm = prepared_datamodule(tmp_path, num_proc=2)
    assert dm.cache_paths == prepared_datamodule(tmp_path, num_proc=1).cache_paths
