"""Several datasets in one run (a list under `data.dataset`): each epoch's mix, per-source validation and caches.

The proportions' error, as `lightning_falcon/data/mixing.py` states it: an epoch's count of a source's
items is its exact share rounded to a whole item, so it is off by less than one, in every epoch.
"""

import collections
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from first_epoch import FIXTURE, fingerprints
from helpers import (
    GUANACO,
    MIDJOURNEY,
    REPO,
    fit_in_process,
    prepared_datamodule,
    restored_process_state,
    scalars,
    tiny_arguments,
    write_jsonl,
)

from lightning_falcon.commands.main import main
from lightning_falcon.data import datamodule
from lightning_falcon.data.prompts import IGNORE_INDEX

MIX = [
    {"name": "midjourney", "dataset": MIDJOURNEY, "weight": 3},
    {"name": "guanaco", "dataset": GUANACO, "format": "turns", "weight": 1, "val_fraction": 0.25},
]


def mixed(tmp_path, sources=MIX, **kwargs):
    kwargs.setdefault("max_length", 128)
    kwargs.setdefault("chat_template", "instruction")  # as configs/tiny-mix.yaml renders the midjourney pairs
    return prepared_datamodule(tmp_path, dataset=sources, **kwargs)


def epoch(dm, number: int, world: int = 1, rank: int = 0) -> list[int]:
    """The training items rank `rank` of `world` gets in epoch `number`, in order."""
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(number)
    return list(loader.sampler)


def by_source(dm, items: list[int]) -> list[collections.Counter]:
    """Each source's items, counted: source i's rows sit after those of the sources before it."""
    ends = list(itertools.accumulate(len(part) for part in dm._parts["train"]))
    source = [sum(i >= end for end in ends) for i in items]
    return [collections.Counter(i for i, s in zip(items, source, strict=False) if s == k) for k in range(len(ends))]


@pytest.mark.parametrize("batching", ["padded", "grouped"])
def test_each_epoch_draws_rows_by_weight_without_replacement(tmp_path, batching):
    third = write_jsonl(tmp_path / "third.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)])
    sources = [{**MIX[0], "weight": 1}, {**MIX[1], "weight": 2}, {"dataset": third, "weight": 5}]
    dm = mixed(tmp_path, sources, batching=batching)
    rows = [len(part) for part in dm._parts["train"]]
    total, weights = sum(rows), [1, 2, 5]
    seen = []
    for number in range(4):
        items = epoch(dm, number)
        assert len(items) == total  # an epoch holds as many rows as the sources together
        counts = by_source(dm, items)
        for count, n, w in zip(counts, rows, weights, strict=False):
            share = total * w / sum(weights)
            assert abs(sum(count.values()) - share) < 1, (sum(count.values()), share)
            # without replacement: a row comes again only once every row of its source has come
            times = sum(count.values()) // n
            assert set(count.values()) <= {times, times + 1} and (times > 0 or len(count) == sum(count.values()))
        seen.append(set(counts[0]))
    assert len({frozenset(s) for s in seen}) == 4  # the down-sampled source: a fresh subset each epoch
    # from (seed, epoch) alone: a new datamodule draws the same epoch; another seed draws another
    assert epoch(mixed(tmp_path, sources, batching=batching), 2) == epoch(dm, 2)
    assert epoch(mixed(tmp_path, sources, batching=batching, seed=7), 2) != epoch(dm, 2)


def test_the_ranks_share_the_epoch_that_one_process_would_train_on(tmp_path):
    dm = mixed(tmp_path, batching="grouped")
    alone = collections.Counter(epoch(dm, 3))
    assert collections.Counter(epoch(dm, 3, 2, 0) + epoch(dm, 3, 2, 1)) == alone  # 348 rows: no padding


def test_packed_sequences_hold_one_source_and_are_drawn_by_its_share_of_rows(tmp_path):
    dm = mixed(tmp_path, batching="packed")
    loader = dm.train_dataloader()
    packed = loader.dataset.datasets  # one PackedRows per source
    rows = [len(p.rows) for p in packed]
    for number in range(3):
        loader.sampler.set_epoch(number)
        items = list(loader.sampler)
        offsets = [0, len(packed[0])]
        drawn = [[i - offsets[s] for i in items if (i >= offsets[1]) == bool(s)] for s in range(2)]
        drawn_rows = [sum(len(packed[s].bins[i]) for i in drawn[s]) for s in range(2)]
        exact = [len(items) * w * len(p) / n for w, p, n in zip((3, 1), packed, rows, strict=False)]
        exact = [e * len(items) / sum(exact) for e in exact]
        for s in range(2):
            # the sequences' count: within one of its exact share; the rows they hold, within the spread of
            # rows per sequence over the part of the epoch drawn at random
            assert abs(len(drawn[s]) - exact[s]) < 1
            per = [len(b) for b in packed[s].bins]
            random_part = len(drawn[s]) % len(packed[s])
            expected = len(drawn[s]) * rows[s] / len(packed[s])
            assert abs(drawn_rows[s] - expected) <= random_part * (max(per) - min(per)) + max(per)
        share = drawn_rows[0] / sum(drawn_rows)
        assert 0.70 < share < 0.80, share  # weights 3 : 1
    batch = next(iter(loader))
    assert "position_ids" in batch and batch["input_ids"].shape[1] <= 128


def test_one_dataset_gives_the_batches_it_gave_before_datasets_could_be_mixed():
    assert fingerprints() == json.loads(FIXTURE.read_text())


def test_each_source_is_held_out_and_reported_on_its_own(tmp_path, caplog):
    caplog.set_level("INFO")
    dm = mixed(tmp_path)
    assert dm.val_names == ["midjourney", "guanaco"]
    assert [len(p) for p in dm._parts["val"]] == [36, 8]  # 10 % of 360, 25 % of 32
    assert len(dm.val_dataloader()) == 2 and len(dm.test_dataloader().dataset) == 44
    dm.train_dataloader()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[data]")]
    assert "[data] train guanaco: 24 rows, 0 truncated to max_length=128" in "\n".join(lines)
    assert any(
        line.startswith("[data] mix midjourney: weight 3, 75.0% of an epoch's rows (261 of 348)") for line in lines
    )
    assert any(line.startswith("[data] mix guanaco: weight 1, 25.0% of an epoch's rows (87 of 348)") for line in lines)
    # generation renders a request as the first source does
    assert dm.prompt_format()["rows"] == "prompt_response" and dm.prompt_format()["chat_template"] == "instruction"


def test_changing_one_source_tokenizes_only_that_one_again(tmp_path, monkeypatch):
    rows = [json.loads(line) for line in Path(GUANACO).read_text().splitlines()]
    sources = [MIX[0], {**MIX[1], "dataset": write_jsonl(tmp_path / "guanaco.jsonl", rows)}]
    first = mixed(tmp_path, sources).cache_paths
    tokenized = []
    real = datamodule.tokenize_split
    monkeypatch.setattr(
        datamodule, "tokenize_split", lambda source, *a, **k: tokenized.append(source) or real(source, *a, **k)
    )
    write_jsonl(tmp_path / "guanaco.jsonl", rows[:-1])
    second = mixed(tmp_path, sources).cache_paths
    assert first["midjourney"] == second["midjourney"] and first["guanaco"] != second["guanaco"]
    assert len(tokenized) == 2 and all("'guanaco'" in source for source in tokenized)  # its train and val splits


def test_validation_logs_each_sources_loss_beside_the_overall_one(tmp_path):
    run = fit_in_process(
        tmp_path, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--generation.samples", "[]",
        "--checkpoint.every_n_train_steps", "4", config="tiny-mix.yaml",
    )  # fmt: skip
    logged = scalars(run)
    steps = [step for step, _ in logged["val/loss"]]
    assert len(steps) == 2  # a validation at step 2 and one at the end
    assert [s for s, _ in logged["val/loss/midjourney"]] == steps == [s for s, _ in logged["val/loss/guanaco"]]
    # val/loss is the mean over every held-out token: the sources' losses weighted by their trained tokens
    data = yaml.safe_load((REPO / "configs" / "tiny-mix.yaml").read_text())["data"]
    sources = [
        {**s, "dataset": {"asset:data/midjourney.jsonl": MIDJOURNEY}.get(s["dataset"], GUANACO)}
        for s in data["dataset"]
    ]
    dm = mixed(tmp_path / "again", sources, max_length=data["max_length"], chat_template=data["chat_template"])
    tokens = [sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in part) for part in dm._parts["val"]]
    for k, (_, overall) in enumerate(logged["val/loss"]):
        parts = [logged[f"val/loss/{name}"][k][1] for name in dm.val_names]
        weighted = sum(t * loss for t, loss in zip(tokens, parts, strict=False)) / sum(tokens)
        assert overall == pytest.approx(weighted, rel=1e-5)
        assert parts[0] != pytest.approx(parts[1], rel=1e-3)  # two sources, two different losses
    # evaluate's report sets each source's loss beside the base's
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"input": "Midjourney prompt for a cat"}])
    with restored_process_state():
        main(
            tiny_arguments(tmp_path, "evaluate", "--ckpt_path", "last", "--generation.queries", queries,
                           "--generation.max_new_tokens", "2", config="tiny-mix.yaml")
        )  # fmt: skip
    report = json.loads((run / "evaluation.json").read_text())
    assert report["fine-tuned"]["val_loss_by_source"].keys() == {"midjourney", "guanaco"}
    assert report["fine-tuned"]["val_loss_by_source"]["midjourney"] == pytest.approx(
        logged["val/loss/midjourney"][-1][1]
    )
    assert "| validation loss, guanaco |" in (run / "evaluation.md").read_text()


def test_a_source_whose_weight_rounds_to_no_row_is_warned_about(tmp_path):
    dm = mixed(tmp_path, [MIX[0], {**MIX[1], "weight": 1e-6}])
    with pytest.warns(UserWarning, match="source 'guanaco' gets no row of an epoch at weight 1e-06"):
        dm.train_dataloader()
