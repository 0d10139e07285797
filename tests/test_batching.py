"""Length grouping and packing: less padding, the same examples, and packed examples that never see each other."""

import random

import pytest
import torch
from helpers import GUANACO, TINY, cli, prepared_datamodule, scalars

from lightning_falcon import PromptDataModule
from lightning_falcon.data.batching import PackedRows, pack
from lightning_falcon.data.prompts import IGNORE_INDEX
from lightning_falcon.data.sampler import ResumableSampler
from lightning_falcon.data.source import Source
from lightning_falcon.model.module import FalconQLoRA

make = prepared_datamodule


def efficiency(loader) -> float:
    """Real tokens / all tokens over one epoch of `loader`."""
    real = total = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total


def test_grouped_and_packed_batches_waste_less_than_padded(tmp_path):
    padded = efficiency(make(tmp_path, batch_size=8).train_dataloader())
    grouped = efficiency(make(tmp_path, batch_size=8, batching="grouped").train_dataloader())
    packed = efficiency(make(tmp_path, batch_size=2, batching="packed").train_dataloader())
    assert padded < 0.92 and grouped >= 0.95 and packed >= 0.95, (padded, grouped, packed)


def test_grouped_epoch_is_a_permutation_batched_by_length_with_the_longest_first():
    lengths = [random.Random(i).randint(5, 500) for i in range(1000)]
    sampler = ResumableSampler(range(1000), 1, 0, True, seed=3, lengths=lengths, batch_size=8)
    order = list(sampler)
    assert sorted(order) == list(range(1000)) and order == list(sampler)  # every row once; seeded
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new order each epoch
    batches = [order[i : i + 8] for i in range(0, 1000, 8)]
    assert max(lengths) in [lengths[i] for i in batches[0]]  # out of memory at step 1, not hours in
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(spread) / len(spread) < 25  # vs ~390 for random batches of uniform lengths in 5..500


def test_grouped_shares_of_two_ranks_split_every_batch_and_resume_where_they_stopped():
    lengths = [random.Random(i).randint(5, 500) for i in range(101)]
    ranks = [ResumableSampler(range(101), 2, r, True, seed=0, lengths=lengths, batch_size=4) for r in (0, 1)]
    shares = [list(s) for s in ranks]
    assert set(shares[0]) | set(shares[1]) == set(range(101)) and len(shares[0]) == len(shares[1]) == 51
    first = shares[0][:4] + shares[1][:4]  # the first global batch: one sorted block of 8
    assert max(lengths) == max(lengths[i] for i in first)
    ranks[0].skip(epoch=0, samples=12)  # a resumed rank continues its share after 3 batches
    assert list(ranks[0]) == shares[0][12:]


def test_packing_places_every_row_once_within_max_length():
    lengths = [random.Random(i).randint(1, 300) for i in range(500)]
    bins = pack(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert sum(lengths) / (512 * len(bins)) > 0.95  # nearly full sequences
    with pytest.raises(ValueError, match="longer than max_length"):
        pack([10, 600], 512)


def test_packed_batch_carries_restarting_positions_and_keeps_each_eos_trained(tmp_path):
    dm = make(tmp_path, dataset=Source(GUANACO, format="turns"), batching="packed", batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    eos = dm.tokenizer.eos_token_id
    for ids, labels, positions, mask in zip(
        batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"], strict=False
    ):
        starts = (positions == 0).nonzero().flatten().tolist()
        n = int(mask.sum())
        examples = [s for s in starts if s < n]
        assert len(examples) >= 2  # short guanaco rows share a sequence
        for start, end in zip(examples, [*examples[1:], n], strict=False):
            assert labels[start] == IGNORE_INDEX  # never predicted from the previous example
            assert ids[end - 1] == eos and labels[end - 1] == eos  # each example still learns to stop
        assert (labels[n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_attend_only_to_themselves(tmp_path, attn):
    """Logits and loss of a packed batch equal those of its examples run one by one, with the real 4-bit model."""
    torch.manual_seed(0)
    module = FalconQLoRA(TINY, lora_dropout=0.0, attn_implementation=attn)
    module.configure_model()
    module.eval()
    with torch.no_grad():  # a trained-looking adapter, so LoRA takes part in the comparison
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows = make(tmp_path, dataset=Source(GUANACO, format="turns"))._splits["train"]
    packed = PackedRows(rows, 512)
    chosen = [b for b in range(len(packed)) if len(packed.bins[b]) >= 2][:2]
    dm = PromptDataModule(GUANACO, tokenizer=TINY)
    batch = dm.collate([packed[b] for b in chosen])
    with torch.no_grad():
        out = module(**batch)
        weighted, tokens = 0.0, 0
        for row_in_batch, b in enumerate(chosen):
            offset = 0
            for i in packed.bins[b]:
                ids, labels = rows[i]["input_ids"], rows[i]["labels"]
                alone = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([labels]))
                got = out.logits[row_in_batch, offset : offset + len(ids)]
                torch.testing.assert_close(got, alone.logits[0], atol=1e-5, rtol=1e-5)
                n = sum(label != IGNORE_INDEX for label in labels[1:])
                weighted, tokens, offset = weighted + alone.loss.item() * n, tokens + n, offset + len(ids)
        assert out.loss.item() == pytest.approx(weighted / tokens, abs=1e-5)
        # Without the segment mask the same batch scores differently: the comparison above has teeth.
        leaky = module.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        assert abs(leaky.loss.item() - out.loss.item()) > 1e-4


@pytest.mark.slow
def test_packed_fit_trains_through_the_cli(tmp_path):
    proc = cli(
        tmp_path, "fit", "--data.batching", "packed", "--data.max_length", "512", "--data.batch_size", "2",
        "--trainer.max_steps", "30", "--trainer.val_check_interval", "30", "--generation.samples", "[]",
    )  # fmt: skip
    assert "[data] packed 324 train rows into" in proc.stdout + proc.stderr
    loss = [v for _, v in scalars(tmp_path / "runs" / "tiny" / "version_0")["train/loss"]]
    assert loss[-1] < loss[0] - 1.0, loss  # ~3.5 rows per sequence, and it learns
