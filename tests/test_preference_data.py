"""Preference data (`data.format: preference`): a request with a chosen and a rejected answer, as TRL writes them.

Each pair is rendered through the run's chat template as SFT renders a conversation, only the answer's tokens
count, both sides are cut alike, and a pair that cannot teach a preference is skipped and counted. Everything goes
through a real `PromptDataModule` on small JSONL files and the tiny tokenizer.
"""

import pytest
import torch
from helpers import prepared_datamodule, write_jsonl

from lightning_falcon.data.prompts import IGNORE_INDEX

PAIRS = [
    {
        "prompt": "mj prompt: a cat",
        "chosen": "a tabby cat asleep on a windowsill, soft light --ar 3:2",
        "rejected": "a cat",
    },
    {"prompt": "mj prompt: a dog", "chosen": "a wet dog shaking off rain, golden hour --ar 16:9", "rejected": "Sure!"},
    {
        "prompt": "mj prompt: a ship",
        "chosen": "a clipper ship in a storm, oil painting --ar 21:9",
        "rejected": "a ship",
    },
    {
        "prompt": "mj prompt: a tree",
        "chosen": "an ancient oak in fog, moody, 35mm --ar 2:3",
        "rejected": "trees are nice",
    },
]


def pairs_of(dm, split: str = "train") -> list[dict]:
    return [row for part in dm._parts[split] for row in part]


def answer(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def prompt_of(ids: list[int], labels: list[int]) -> list[int]:
    return ids[: next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]


def test_auto_finds_pairs_and_only_the_answers_train(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    dm = prepared_datamodule(tmp_path, dataset={"dataset": data, "val_fraction": 0.25}, chat_template="instruction")
    assert dm.format.name == "preference"
    eos = dm.tokenizer.eos_token
    by_prompt = {p["prompt"]: p for p in PAIRS}
    rows = pairs_of(dm) + pairs_of(dm, "val")
    assert len(rows) == 12
    for row in rows:
        pair = by_prompt[row["input"]]
        # the request is the same tokens on both sides; only each answer and its EOS train
        assert prompt_of(row["input_ids"], row["labels"]) == prompt_of(row["rejected_ids"], row["rejected_labels"])
        assert answer(dm.tokenizer, row["input_ids"], row["labels"]).strip() == pair["chosen"] + eos
        assert answer(dm.tokenizer, row["rejected_ids"], row["rejected_labels"]).strip() == pair["rejected"] + eos


def test_a_pair_renders_as_sft_renders_its_chosen_answer(tmp_path):
    """The chosen sequence is exactly what SFT trains on for the same request and answer, template and all."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    sft_rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS * 3]
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    for template in ("instruction", "chatml"):
        pairs = prepared_datamodule(tmp_path / template / "p", dataset=data, chat_template=template)
        chosen = {(tuple(r["input_ids"]), tuple(r["labels"])) for r in pairs_of(pairs) + pairs_of(pairs, "val")}
        dm = prepared_datamodule(tmp_path / template / "s", dataset=sft, chat_template=template)
        rows = [r for split in ("train", "val") for r in pairs_of(dm, split)]
        assert chosen == {(tuple(r["input_ids"]), tuple(r["labels"])) for r in rows}


def test_messages_pairs_and_whole_conversations_read_alike(tmp_path):
    """TRL's conversational pairs (a messages-list prompt and answers) and its implicit-prompt pairs (two whole
    conversations) give the same sequences as string pairs."""
    explicit = [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in PAIRS * 3
    ]
    implicit = [
        {
            "chosen": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}],
        }
        for p in PAIRS * 3
    ]
    ultrafeedback = [{"prompt": p["prompt"], **row} for p, row in zip(PAIRS * 3, implicit, strict=True)]
    seen = []
    for name, rows in (
        ("strings", PAIRS * 3),
        ("explicit", explicit),
        ("implicit", implicit),
        ("ultrafeedback", ultrafeedback),  # the request in `prompt`, and again opening each whole conversation
    ):
        dm = prepared_datamodule(tmp_path / name, dataset=write_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert dm.format.name == "preference"
        seen.append(sorted((r["input_ids"], r["rejected_ids"]) for r in pairs_of(dm) + pairs_of(dm, "val")))
    assert seen[0] == seen[1] == seen[2] == seen[3]


def test_text_answers_without_a_request_and_messages_beside_answers(tmp_path):
    """hh-rlhf's text pairs carry their request inside each answer: refused with the reason, not guessed at. Rows
    holding a messages list beside their answers (UltraFeedback's) read as messages unless the source says
    `format: preference`."""
    from lightning_falcon.errors import ConfigError

    rows = [{"chosen": p["prompt"] + " " + p["chosen"], "rejected": p["prompt"] + " " + p["rejected"]} for p in PAIRS]
    with pytest.raises(ConfigError, match=r"12 answers without a request \(no prompt column"):
        prepared_datamodule(tmp_path / "hh", dataset=write_jsonl(tmp_path / "hh.jsonl", rows * 3))
    both = [
        {
            "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
            **p,
        }
        for p in PAIRS * 3
    ]
    data = write_jsonl(tmp_path / "both.jsonl", both)
    assert prepared_datamodule(tmp_path / "auto", dataset=data).format.kind == "messages"
    chosen = prepared_datamodule(tmp_path / "pairs", dataset={"dataset": data, "format": "preference"})
    assert chosen.format.name == "preference" and len(pairs_of(chosen)) + len(pairs_of(chosen, "val")) == 12


def test_a_long_pair_is_cut_alike_on_both_sides(tmp_path):
    """Earlier exchanges are left out of both sides alike, then each side is cut at max_length."""
    history = []
    for i in range(6):
        history += [
            {"role": "user", "content": f"question {i} " * 4},
            {"role": "assistant", "content": f"reply {i} " * 4},
        ]
    rows = [
        {
            "chosen": [*history, {"role": "user", "content": "last"}, {"role": "assistant", "content": "word " * 60}],
            "rejected": [*history, {"role": "user", "content": "last"}, {"role": "assistant", "content": "no"}],
        }
    ] * 4
    dm = prepared_datamodule(tmp_path, dataset=write_jsonl(tmp_path / "long.jsonl", rows), max_length=64)
    stats = dm.stats["train"]
    assert stats["truncated"] == stats["rows"] and stats["turns_dropped"] > 0
    for row in pairs_of(dm):
        assert len(row["input_ids"]) == 64 and len(row["rejected_ids"]) <= 64
        prompt = prompt_of(row["input_ids"], row["labels"])
        assert prompt == prompt_of(row["rejected_ids"], row["rejected_labels"])  # the same exchanges left
        assert "question 0" not in dm.tokenizer.decode(prompt)


def test_identical_and_empty_answers_are_skipped_and_counted(tmp_path):
    rows = PAIRS * 3 + [
        {"prompt": "same", "chosen": "an answer", "rejected": "an answer "},
        {"prompt": "empty", "chosen": "an answer", "rejected": ""},
        {"prompt": "null", "chosen": None, "rejected": "an answer"},
    ]
    dm = prepared_datamodule(tmp_path, dataset=write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert dm.stats["train"]["skipped"] == {"identical chosen and rejected answers": 1, "an empty or null field": 2}
    assert dm.stats["train"]["rows"] + dm.stats["val"]["rows"] == 12


def test_a_batch_of_pairs_is_the_chosen_sequences_then_the_rejected(tmp_path):
    dm = prepared_datamodule(tmp_path, dataset=write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3))
    rows = sorted(pairs_of(dm), key=lambda row: row["pair"])[:3]
    batch = dm.collate(rows)
    assert batch["input_ids"].shape[0] == 6 and "reference_logps" not in batch
    for i, row in enumerate(rows):
        assert batch["input_ids"][i, : len(row["input_ids"])].tolist() == row["input_ids"]
        assert batch["input_ids"][3 + i, : len(row["rejected_ids"])].tolist() == row["rejected_ids"]
        assert batch["attention_mask"][3 + i].sum() == len(row["rejected_ids"])
    # the reference's log-probabilities computed beforehand, found by each pair's number: a loader made before
    # they were handed over reads them too
    loader = dm.train_dataloader()
    pairs = len(pairs_of(dm)) + len(pairs_of(dm, "val"))
    assert [row["pair"] for row in pairs_of(dm) + pairs_of(dm, "val")] == list(range(pairs))
    values = torch.stack([torch.arange(pairs, dtype=torch.float32), -torch.arange(pairs, dtype=torch.float32)], 1)
    dm.with_reference(values)
    batch = dm.collate(rows)
    assert torch.equal(batch["reference_logps"], torch.tensor([0.0, 1.0, 2.0, -0.0, -1.0, -2.0]))
    batch = next(iter(loader))
    assert torch.equal(batch["reference_logps"][:4], -batch["reference_logps"][4:])


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_rows_that_do_not_fit_the_objective_are_refused(tmp_path, objective):
    from lightning_falcon.errors import ConfigError

    rows = PAIRS * 3 if objective == "sft" else [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS * 3]
    dm = prepared_datamodule(tmp_path, dataset=write_jsonl(tmp_path / "rows.jsonl", rows), batching="packed")
    with pytest.raises(ConfigError) as e:
        dm.check_objective(objective, objective != "sft")
    message = str(e.value)
    if objective == "sft":
        assert "hold preference pairs (chosen and rejected answers)" in message and "--model.objective dpo" in message
    else:
        assert "model.objective dpo trains on preference pairs" in message and "['prompt_response'] rows" in message
