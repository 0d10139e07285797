"""PromptDataModule: both formats, exact masks in batches, truncation counts, the cache, and bad input."""

import json
from pathlib import Path

import datasets
import pytest
import torch
from helpers import GUANACO, MIDJOURNEY, REPO, TINY, prepared_datamodule

from lightning_falcon import PromptDataModule
from lightning_falcon.data import datamodule
from lightning_falcon.data.conversations import BLANK
from lightning_falcon.data.prompts import IGNORE_INDEX
from lightning_falcon.data.source import Source
from lightning_falcon.errors import ConfigError

make = prepared_datamodule


def test_prompt_response_batches_mask_prompt_and_padding_but_train_eos(tmp_path):
    dm = make(tmp_path, batch_size=8)
    assert dm.stats["train"]["rows"] + dm.stats["val"]["rows"] == 360
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    eos = dm.tokenizer.eos_token_id
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < batch["input_ids"].shape[1]  # dynamic padding: some row is padded
    for ids, mask, labels, n in zip(
        batch["input_ids"], batch["attention_mask"], batch["labels"], lengths, strict=False
    ):
        assert (labels[n:] == IGNORE_INDEX).all() and (mask[n:] == 0).all() and (ids[n:] == eos).all()
        assert labels[n - 1] == eos and ids[n - 1] == eos  # the real EOS is a trained label
        assert labels[0] == IGNORE_INDEX  # the prompt is masked
        trained = labels[:n] != IGNORE_INDEX
        first = int(trained.float().argmax())
        assert trained[first:].all()  # the response is one trained run up to the EOS


def test_truncation_is_counted(tmp_path, tokenizer):
    dm = make(tmp_path, max_length=64, chat_template="instruction")
    rows = [json.loads(line) for line in Path(MIDJOURNEY).read_text().splitlines()]
    template = "### Instruction:\n{}\n\n### Response:\n"
    lengths = [
        len(tokenizer(template.format(r["prompt"]), add_special_tokens=False)["input_ids"])
        + len(tokenizer(r["response"], add_special_tokens=False)["input_ids"])
        + 1
        for r in rows
    ]
    expected = sum(n > 64 for n in lengths)
    assert expected > 0
    assert dm.stats["train"]["truncated"] + dm.stats["val"]["truncated"] == expected
    assert max(len(r["input_ids"]) for r in dm._splits["train"]) == 64


def test_turns_format_trains_only_assistant_turns(tmp_path):
    dm = make(tmp_path, dataset=Source(GUANACO, format="turns", val_fraction=0.25))
    row = dm._splits["train"][0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=False) if label != IGNORE_INDEX]
    text = dm.tokenizer.decode(trained)
    assert "### Human:" not in text and "### Assistant:" not in text
    assert trained[-1] == dm.tokenizer.eos_token_id


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_other_file_types_load(tmp_path, suffix):
    ds = datasets.Dataset.from_dict({"prompt": [f"request {i}" for i in range(10)], "response": ["answer"] * 10})
    path = tmp_path / f"data.{suffix}"
    {"csv": ds.to_csv, "parquet": ds.to_parquet, "json": lambda p: ds.to_json(p, lines=False)}[suffix](str(path))
    dm = make(tmp_path, dataset={"dataset": str(path), "val_fraction": 0.2})
    assert dm.stats["train"]["rows"] == 8 and dm.stats["val"]["rows"] == 2


def test_a_source_alone_is_a_list_of_one_however_it_is_written(tmp_path):
    spellings = [
        MIDJOURNEY,
        {"dataset": MIDJOURNEY},
        Source(MIDJOURNEY),
        [MIDJOURNEY],
        [{"dataset": MIDJOURNEY, "format": "auto", "weight": 2}],  # a default, and a weight without a mix
    ]
    modules = [PromptDataModule(dataset=s, tokenizer=TINY, cache_dir=str(tmp_path)) for s in spellings]
    assert all(dm.cache_paths == modules[0].cache_paths for dm in modules)  # one cache: the same rows
    assert all(dm.val_names == ["midjourney"] and not dm.members[0].mixed for dm in modules)
    # a `Source` is saved as the mapping of its fields, so a checkpoint of it loads weights-only
    torch.save(dict(modules[2].hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["dataset"]["dataset"] == MIDJOURNEY


def test_tokenized_once_then_read_from_cache(tmp_path, monkeypatch):
    make(tmp_path)
    monkeypatch.setattr(datamodule, "tokenize_split", lambda *a, **k: pytest.fail("tokenized again"))
    dm = make(tmp_path)  # same data, tokenizer and settings: a cache hit
    assert dm.stats["train"]["rows"] > 0
    monkeypatch.undo()
    make(tmp_path, max_length=100)  # another setting, another cache entry
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_predict_batches_are_the_held_out_prompts_as_written_then_left_padded(tmp_path):
    from lightning_falcon.model.generation import left_pad

    dm = make(tmp_path, batch_size=4)
    batch = next(iter(dm.predict_dataloader()))
    raw = {json.loads(line)["prompt"] for line in Path(MIDJOURNEY).read_text().splitlines()}
    assert len(batch["inputs"]) == 4 and set(batch["inputs"]) <= raw  # the user's text, not the rendered template
    assert batch["prompt_ids"][0] == dm.encode_input(batch["inputs"][0])  # what training conditioned on
    input_ids, attention_mask = left_pad(batch["prompt_ids"], dm.pad_id)
    assert (attention_mask[:, -1] == 1).all()
    assert attention_mask[:, 0].sum() < 4  # some prompt is shorter, so padded on the left
    assert not (input_ids[attention_mask == 1] == dm.tokenizer.eos_token_id).any()


def test_predict_inputs_replace_the_held_out_prompts(tmp_path):
    dm = make(tmp_path, batch_size=8, predict_inputs=["a fox", "a boy in the snow"])
    batch = next(iter(dm.predict_dataloader()))
    assert batch["inputs"] == ["a fox", "a boy in the snow"]
    assert batch["prompt_ids"] == [dm.encode_input("a fox"), dm.encode_input("a boy in the snow")]


def test_rows_with_empty_or_null_fields_are_skipped_and_counted(tmp_path):
    # 8 rows: a null response, an empty prompt, a missing response key, a whitespace-only prompt, and 4 good rows
    dm = make(tmp_path, dataset={"dataset": str(REPO / "tests/fixtures/data/some_empty.jsonl"), "val_fraction": 0.25})
    assert dm.stats["train"]["skipped"] == {BLANK: 4} and dm.stats["val"]["skipped"] == {}
    assert dm.stats["train"]["rows"] + dm.stats["val"]["rows"] == 4
    kept = {r["input"] for split in ("train", "val") for r in dm._splits[split]}
    assert kept == {"a fox in snow", "a city at night", "a lighthouse", "a forest"}
    trained = [dm.tokenizer.decode(r["input_ids"]) for split in ("train", "val") for r in dm._splits[split]]
    assert not any("None" in text for text in trained)


# ---------------------------------------------------------------------------------- bad input (more in test_bad_input)
def test_bad_settings_are_listed_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        PromptDataModule(dataset={"dataset": MIDJOURNEY, "weight": 0, "val_fraction": 0.0}, batch_size=0)
    assert "weight" in str(e.value) and "val_fraction" in str(e.value) and "batch_size" in str(e.value)


def test_collate_pads_with_eos_when_the_tokenizer_has_no_pad(tmp_path):
    dm = PromptDataModule(dataset=MIDJOURNEY, tokenizer=TINY)
    assert dm.tokenizer.pad_token_id is None and dm.pad_id == dm.tokenizer.eos_token_id
    eos = dm.pad_id
    batch = dm.collate([{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [5], "labels": [-100]}])
    assert batch["labels"].tolist() == [[-100, 6, eos], [-100, -100, -100]]
    assert batch["input_ids"].tolist() == [[5, 6, eos], [5, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
