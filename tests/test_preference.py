"""Preference tuning (DPO, conservative DPO, IPO, ORPO) gives the numbers TRL gives, against the right reference.

What a user would notice if these failed: `model.objective dpo|ipo|orpo` training towards something other than what
TRL trains towards on the same pairs (a different loss, other gradients, other `rewards/*` and `logps/*` than TRL's
logs), a DPO run whose reference is the base when it should be the SFT adapter it started from (or the reverse), a
reference that moves as the policy trains or lands in the saved adapter, or rewards that are not 0 at step 0.

Everything runs on the tiny Falcon, fp32 on the CPU, without dropout, so that the comparisons are exact up to fp32
rounding: TRL 1.16's `DPOTrainer._compute_loss` (losses `sigmoid` and `ipo`) and the experimental `ORPOTrainer`
run on the very model our module built (the same weights and the same forward), fed by TRL's own collators with the
pairs of our batch. Two known differences are checked against a hand-written formula instead (see the tests):
TRL's `sigmoid` loss no longer applies `label_smoothing` (conservative DPO), and TRL's ORPO takes its NLL term over
the whole chosen sequence, prompt included, where ours (as the ORPO paper) takes it over the chosen answer.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, prepared_datamodule
from safetensors import safe_open

from lightning_falcon.assets import resolve
from lightning_falcon.data.prompts import IGNORE_INDEX
from lightning_falcon.data.source import Source
from lightning_falcon.errors import ConfigError
from lightning_falcon.model import adapter
from lightning_falcon.model.loss import chunked_causal_lm_loss
from lightning_falcon.model.module import REFERENCE, FalconQLoRA
from lightning_falcon.model.preference import log1mexp, sequence_logps
from lightning_falcon.training.reference import ReferenceLogps

PREFERENCES = resolve("asset:data/midjourney-preferences.jsonl")
PAIRS = 4
BETA = 0.1
# Short rows: every summed answer log-probability stays below 256 in magnitude, where fp32's spacing is 1.5e-5, so a
# reward (BETA times a difference of two such sums) can be held to 1e-5 absolute.
MAX_LENGTH = 64
# TRL sums per-token log-probabilities in fp32, we in fp64 (`sequence_logps`): a sum near -220 may differ by an fp32
# ulp (1.5e-5), so the summed log-probabilities are held to 1e-6 relative (a few ulps), not 1e-5 absolute.
LOGPS_RTOL = 1e-6


# ----------------------------------------------------------------- shared pieces
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shipped preference pairs as a preference run reads them: (data module, the first PAIRS rows)."""
    dm = prepared_datamodule(
        tmp_path_factory.mktemp("pairs"),
        dataset=Source(PREFERENCES, format="preference"),
        chat_template="instruction",
        max_length=MAX_LENGTH,
    )
    return dm, [dm._splits["train"][i] for i in range(PAIRS)]


@pytest.fixture(scope="module")
def pairs(data) -> dict[str, torch.Tensor]:
    """One batch of PAIRS pairs, as `collate` makes it: every chosen sequence, then every rejected one."""
    dm, rows = data
    return dm.collate(rows)


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """An adapter directory as fit saves one (`adapter.save`), whose LoRA clearly changes the tiny model: the SFT
    run a preference run starts from."""
    module = lora_module()
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    state = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    out = tmp_path_factory.mktemp("sft") / "adapter"
    adapter.save(module.model, state, out, None, {})
    return out


def lora_module(**kwargs) -> FalconQLoRA:
    """The tiny Falcon with LoRA as fit builds it, unquantized (TRL casts the LoRA weights of a 4-bit model to bf16),
    fp32, without dropout."""
    kwargs = {"quantization": "none", "compute_dtype": "fp32", "lora_dropout": 0.0, "beta": BETA} | kwargs
    torch.manual_seed(0)  # the LoRA A init: the same module whatever ran before (TRL's trainers reseed)
    module = FalconQLoRA(TINY, **kwargs)
    module.configure_model()
    return module


def perturb(peft_model, seed: int, scale: float = 0.02) -> None:
    """Move every trained ('default') LoRA weight by a seeded random step, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".default." in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def lora_grads(module) -> dict[str, torch.Tensor]:
    """The gradient of every trainable tensor (all of them LoRA 'default' weights), then cleared."""
    grads = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            grads[name] = param.grad.clone()
    module.zero_grad(set_to_none=True)
    assert grads and all(".default." in name for name in grads)
    return grads


def assert_grads_equal(ours: dict, theirs: dict, atol: float) -> None:
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], atol=atol, rtol=0, msg=name)


def answer_logps(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Each row's summed log-probability of its answer tokens from whole logits, the plain way (summed in fp64).
    `shifted`: the logits of the last position are already left out."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = logits if shifted else logits[:, :-1]
    logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps.double() * mask).sum(1).float()


def examples(rows) -> list[dict[str, list[int]]]:
    """Our rows as TRL's tokenized examples: the request's ids, then each answer's (our labels mark the answer)."""
    out = []
    for row in rows:
        start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        assert row["rejected_ids"][:start] == row["input_ids"][:start]  # one request, two answers
        assert all(label != IGNORE_INDEX for label in row["labels"][start:] + row["rejected_labels"][start:])
        out.append(
            {
                "prompt_ids": row["input_ids"][:start],
                "chosen_ids": row["input_ids"][start:],
                "rejected_ids": row["rejected_ids"][start:],
            }
        )
    return out


def raw_rows(n: int = 2) -> list[dict]:
    """A few rows of the shipped file, which TRL's trainers insist on tokenizing at construction (unused after)."""
    with open(PREFERENCES) as f:
        return [json.loads(next(f)) for _ in range(n)]


def tokenizer():
    """A tokenizer of TRL's own (its trainers set the pad token on the one they are given)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def test_a_batch_of_pairs_is_every_chosen_sequence_then_every_rejected_one(data, pairs):
    _, rows = data
    assert pairs["input_ids"].shape[0] == 2 * PAIRS
    for i, row in enumerate(rows):
        for index, side in ((i, ("input_ids", "labels")), (PAIRS + i, ("rejected_ids", "rejected_labels"))):
            ids, labels = (row[key] for key in side)
            n = len(ids)
            assert pairs["input_ids"][index, :n].tolist() == ids
            assert pairs["labels"][index, :n].tolist() == labels
            assert pairs["attention_mask"][index].sum() == n
            assert (pairs["labels"][index, n:] == IGNORE_INDEX).all()
    answer = pairs["labels"] != IGNORE_INDEX
    assert torch.equal(pairs["labels"][answer], pairs["input_ids"][answer])  # a label is its own token
    assert answer.any(1).all() and not answer.all(1).any()  # every row has an answer and a request


# ----------------------------------------------------------------- DPO and IPO against TRL
def dpo_trainer(peft_model, loss_type: str, tmp_path):
    """TRL's DPOTrainer on our model. Handed a PeftModel, it copies the 'default' adapter into a frozen 'ref' one,
    its reference, as our module copied it into `REFERENCE`."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        loss_type=[loss_type],
        beta=BETA,
        disable_dropout=True,
        gradient_checkpointing=False,
    )
    return DPOTrainer(
        model=peft_model, args=args, train_dataset=Dataset.from_list(raw_rows()), processing_class=tokenizer()
    )


# what DPOTrainer gathers per pair, in its order, and logs the means of
TRL_PER_PAIR = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def per_pair_gathers(trainer) -> list[torch.Tensor]:
    """TRL keeps its per-pair tensors only long enough to `accelerator.gather` them, then logs their means: record
    what it gathers per pair (its 1-d tensors), in `TRL_PER_PAIR`'s order."""
    seen = []
    gather = trainer.accelerator.gather

    def spy(tensor):
        if tensor.dim() == 1:
            seen.append(tensor.detach().clone())
        return gather(tensor)

    trainer.accelerator.gather = spy
    return seen


# CI's main tiers install `[bench]`; its lowest-versions tier does not (TRL's own floors are above ours)
NO_TRL = "TRL is not installed (pip install -e '.[dev,bench]')"


@pytest.mark.parametrize(("loss_type", "objective"), [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_dpo_equals_trl(loss_type, objective, sft_adapter, data, pairs, tmp_path):
    """DPO (no label smoothing) and IPO from an SFT adapter, after the policy moved away from it: TRL's loss, its
    per-pair rewards and log-probabilities as it logs them, and the gradient of every LoRA tensor."""
    pytest.importorskip("trl", reason=NO_TRL)
    module = lora_module(adapter=str(sft_adapter), objective=objective)
    trainer = dpo_trainer(module.model, loss_type, tmp_path)
    assert {"default", REFERENCE, "ref"} <= set(module.model.peft_config)
    # Both references now hold the SFT adapter; the policy moves away from it, so the log-ratios are not 0.
    perturb(module.model, seed=1)
    module.model.train()

    ours = module.pair_loss(pairs)
    ours.loss.backward()
    our_grads = lora_grads(module)

    inputs = trainer.data_collator(examples(data[1]))  # TRL's own collator on the same pairs
    assert set(inputs) == {"input_ids", "attention_mask", "completion_mask"}
    assert torch.equal(inputs["attention_mask"], pairs["attention_mask"])
    assert torch.equal(inputs["completion_mask"].bool(), pairs["labels"] != IGNORE_INDEX)
    real = pairs["attention_mask"].bool()
    assert torch.equal(inputs["input_ids"][real], pairs["input_ids"][real])
    gathered = per_pair_gathers(trainer)
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    their_grads = lora_grads(module)
    theirs_per_pair = dict(zip(TRL_PER_PAIR, gathered, strict=True))
    for name, values in theirs_per_pair.items():  # what the spy recorded is what TRL logged the mean of
        assert values.mean().item() == pytest.approx(trainer._metrics["train"][name][-1], rel=1e-6), name

    # Measured: loss 1.1e-6 (sigmoid) and 5.7e-6 (ipo: a loss near 25, where fp32's spacing is 1.9e-6, hence the
    # relative 1e-6 beside the absolute 1e-5), rewards 3e-6, logps 7e-8 relative (one ulp), gradients 5e-7.
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-5)
    assert ours.chosen_rewards.abs().min() > 1e-3  # the policy is not its reference
    metrics = ours.metrics()  # what fit logs as train/<name>, per pair
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        torch.testing.assert_close(metrics[name], theirs_per_pair[name], atol=1e-5, rtol=0, msg=name)
    assert torch.equal(metrics["rewards/accuracies"], theirs_per_pair["rewards/accuracies"])
    for name in ("logps/chosen", "logps/rejected"):
        torch.testing.assert_close(metrics[name], theirs_per_pair[name], atol=0, rtol=LOGPS_RTOL, msg=name)
    # the model's own preference, no reference: two sums near -220, each within an ulp (1.5e-5) of TRL's
    their_margin = theirs_per_pair["logps/chosen"] - theirs_per_pair["logps/rejected"]
    torch.testing.assert_close(metrics["preference/margin"], their_margin, atol=4e-5, rtol=0)
    assert_grads_equal(our_grads, their_grads, atol=1e-5)


def test_cdpo_label_smoothing_is_the_conservative_loss(sft_adapter, pairs):
    """Conservative DPO: -(1 - e) log s(b D) - e log s(-b D), D the policy's log-ratio of the chosen over the
    rejected answer minus the reference's. TRL 1.16's `sigmoid` loss ignores `label_smoothing` (the conservative
    variant is gone there), so it is checked against the formula, with its gradient, on our own log-probabilities."""
    smoothing = 0.25
    module = lora_module(adapter=str(sft_adapter), objective="dpo", label_smoothing=smoothing)
    perturb(module.model, seed=1)
    ours = module.pair_loss(pairs)
    ours.loss.backward()
    our_grads = lora_grads(module)

    logps, _ = sequence_logps(module._hidden(pairs), module._head(), pairs["labels"], None)
    reference = module.reference_logps(pairs)
    (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), reference.chunk(2)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    by_hand = (-(1 - smoothing) * F.logsigmoid(BETA * delta) - smoothing * F.logsigmoid(-BETA * delta)).mean()
    plain = -F.logsigmoid(BETA * delta).mean()
    by_hand.backward()
    hand_grads = lora_grads(module)

    assert abs(ours.loss.item() - by_hand.item()) < 1e-6
    assert abs(ours.loss.item() - plain.item()) > 1e-3  # the smoothing takes part
    torch.testing.assert_close(ours.chosen_rewards - ours.rejected_rewards, BETA * delta.detach(), atol=1e-5, rtol=0)
    assert_grads_equal(our_grads, hand_grads, atol=1e-6)


# ----------------------------------------------------------------- ORPO against TRL
def orpo_features(rows) -> list[dict[str, list[int]]]:
    """Our rows as ORPOTrainer's tokenized rows: each side's whole sequence, its mask, and its labels (the answer)."""
    features = []
    for example in examples(rows):
        prompt, feature = example["prompt_ids"], {}
        for side in ("chosen", "rejected"):
            answer = example[f"{side}_ids"]
            feature[f"{side}_input_ids"] = prompt + answer
            feature[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            feature[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
        features.append(feature)
    return features


def test_orpo_equals_trl(data, pairs, tmp_path):
    """TRL's ORPO loss is its NLL over the whole chosen sequence, prompt included (its own comment says so), minus
    the odds-ratio term; ours (and the ORPO paper's) takes the NLL over the chosen answer's tokens. So the odds-ratio
    term, the rewards, the log-probabilities and the log-odds are compared as they are, and our loss (and its
    gradients) with TRL's loss less TRL's NLL plus the cross-entropy of the answer tokens under TRL's own logits."""
    pytest.importorskip("trl", reason=NO_TRL)
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    module = lora_module(objective="orpo")
    perturb(module.model, seed=2)  # a fresh LoRA changes nothing yet: make it count
    module.model.train()
    ours = module.pair_loss(pairs)
    ours.loss.backward()
    our_grads = lora_grads(module)

    args = ORPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        beta=BETA,
        max_length=MAX_LENGTH,
        disable_dropout=True,
        gradient_checkpointing=False,
    )
    orpo_tokenizer = tokenizer()
    orpo_tokenizer.pad_token = orpo_tokenizer.eos_token  # ORPO's collator asks for one, and pads with it
    trainer = ORPOTrainer(
        model=module.model, args=args, train_dataset=Dataset.from_list(raw_rows()), processing_class=orpo_tokenizer
    )
    inputs = trainer.data_collator(orpo_features(data[1]))  # TRL's own collator on the same pairs
    joined = trainer.concatenated_inputs(inputs, padding_value=trainer.padding_value)
    assert torch.equal(joined["concatenated_labels"], pairs["labels"])
    assert torch.equal(joined["concatenated_attention_mask"], pairs["attention_mask"])
    captured = {}
    forward, odds_ratio_loss = trainer.concatenated_forward, trainer.odds_ratio_loss

    def spy_forward(model, batch):
        captured["forward"] = forward(model, batch)
        return captured["forward"]

    def spy_odds(chosen, rejected):
        captured["odds"] = odds_ratio_loss(chosen, rejected)
        return captured["odds"]

    trainer.concatenated_forward, trainer.odds_ratio_loss = spy_forward, spy_odds
    theirs = trainer.compute_loss(trainer.model, inputs)
    chosen_logps, rejected_logps, chosen_logits, rejected_logits, whole_nll = captured["forward"]
    odds_terms, chosen_rewards, rejected_rewards, _, mean_log_odds = captured["odds"]
    chosen_labels = pairs["labels"][:PAIRS, 1:]
    answer_nll = F.cross_entropy(chosen_logits.flatten(0, 1), chosen_labels.flatten(), ignore_index=IGNORE_INDEX)
    comparable = theirs - whole_nll + answer_nll
    comparable.backward()
    their_grads = lora_grads(module)

    counts = (chosen_labels != IGNORE_INDEX).sum(1)
    our_nll = -(ours.chosen_logps * counts).sum() / counts.sum()
    log_odds = (ours.chosen_logps - ours.rejected_logps) - (log1mexp(ours.chosen_logps) - log1mexp(ours.rejected_logps))
    # the known difference: TRL's NLL is over every real token of the chosen sequences, the prompt's included
    whole = pairs["input_ids"][:PAIRS, 1:].masked_fill(pairs["attention_mask"][:PAIRS, 1:] == 0, IGNORE_INDEX)
    assert (whole != IGNORE_INDEX).sum() > 1.5 * counts.sum()
    prompt_included = F.cross_entropy(chosen_logits.flatten(0, 1), whole.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(whole_nll.item() - prompt_included.item()) < 1e-6
    assert abs(whole_nll.item() - answer_nll.item()) > 1e-3
    # Measured: the loss, NLL, rewards, log-probabilities and log-odds equal to the last bit (both take
    # log-softmax over the same logits here), the odds-ratio term 4e-7, the gradients 3e-8.
    assert abs(ours.loss.item() - comparable.item()) < 1e-5
    assert abs(our_nll.item() - answer_nll.item()) < 1e-5
    assert abs((ours.loss - our_nll).item() - (-odds_terms.mean()).item()) < 1e-5  # the odds-ratio term
    torch.testing.assert_close(BETA * F.logsigmoid(log_odds), odds_terms.detach(), atol=1e-5, rtol=0)
    assert abs(log_odds.mean().item() - mean_log_odds.item()) < 1e-5
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.chosen_logps, chosen_logps.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.rejected_logps, rejected_logps.detach(), atol=1e-5, rtol=0)
    # the model's own preference is of the summed log-probabilities (under TRL's logits), not ORPO's means
    their_sums = answer_logps(torch.cat([chosen_logits, rejected_logits]).detach(), pairs["labels"], shifted=True)
    their_margin = their_sums[:PAIRS] - their_sums[PAIRS:]
    torch.testing.assert_close(ours.margin, their_margin, atol=4e-5, rtol=0)
    assert_grads_equal(our_grads, their_grads, atol=1e-5)


# ----------------------------------------------------------------- the reference
def test_reference_is_the_base_without_an_adapter(pairs):
    """A fresh LoRA (fit not started from an adapter) compares against the base itself: no copy is made, its rewards
    are exactly 0 at step 0 (the untrained LoRA adds exactly nothing, dropout or not), and the reference's
    log-probabilities are the base model's. 4-bit, with dropout: as fit builds it."""
    module = FalconQLoRA(TINY, quantization="nf4", compute_dtype="fp32", objective="dpo", beta=BETA)
    module.configure_model()
    module.model.train()
    assert REFERENCE not in module.model.peft_config
    ours = module.pair_loss(pairs)
    zeros = torch.zeros(PAIRS)
    assert torch.equal(ours.chosen_rewards, zeros) and torch.equal(ours.rejected_rewards, zeros)

    reference = module.reference_logps(pairs)
    assert not reference.requires_grad
    with torch.no_grad(), module.model.disable_adapter():
        logits = module.model(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"]).logits
    torch.testing.assert_close(reference, answer_logps(logits, pairs["labels"]), atol=1e-5, rtol=0)


def test_reference_is_the_sft_adapter_not_the_base(sft_adapter, pairs, tmp_path):
    """Started from an SFT adapter, DPO compares against that adapter (PEFT's own load of it), kept frozen beside the
    trained copy: rewards exactly 0 at step 0, the reference unmoved by a step, and not saved with the result."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = lora_module(adapter=str(sft_adapter), objective="dpo")
    module.model.train()
    ours = module.pair_loss(pairs)
    zeros = torch.zeros(PAIRS)
    assert torch.equal(ours.chosen_rewards, zeros) and torch.equal(ours.rejected_rewards, zeros)

    reference = module.reference_logps(pairs)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(sft_adapter)).eval()
    model_inputs = {"input_ids": pairs["input_ids"], "attention_mask": pairs["attention_mask"]}
    with torch.no_grad():
        by_peft = answer_logps(tuned(**model_inputs).logits, pairs["labels"])
        with tuned.disable_adapter():
            by_base = answer_logps(tuned(**model_inputs).logits, pairs["labels"])
    torch.testing.assert_close(reference, by_peft, atol=0, rtol=LOGPS_RTOL)
    gap = (reference - by_base).abs()
    assert gap.mean() > 0.5 and gap.min() > 0.01  # the adapter, clearly not the base (a mean gap of 1.0 here)

    # frozen: nothing of it trains, before or after a forward that switched to it and back
    frozen = [p for n, p in module.model.named_parameters() if f".{REFERENCE}." in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    # a training step moves the policy, not the reference
    ours.loss.backward()
    with torch.no_grad():
        for param in module.model.parameters():
            if param.requires_grad:
                param -= 5e-3 * param.grad.sign()
    module.zero_grad(set_to_none=True)
    assert torch.equal(module.reference_logps(pairs), reference)
    stepped = module.pair_loss(pairs)
    assert (stepped.chosen_logps - ours.chosen_logps).abs().min() > 1e-3
    torch.testing.assert_close(stepped.chosen_rewards, BETA * (stepped.chosen_logps - reference[:PAIRS]))

    # the saved adapter is the trained one alone, as `SaveAdapter` collects it
    state = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    out = tmp_path / "adapter"
    adapter.save(module.model, state, out, None, {})
    assert not (out / REFERENCE).exists()
    assert [p for p in out.iterdir() if p.is_dir()] == []
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(state) and not any(REFERENCE in k for k in keys)


def few_pairs(tmp_path):
    """Ten of the shipped pairs (nine to train on, one held out), four a batch, with their cache under `tmp_path`."""
    return prepared_datamodule(
        tmp_path,
        dataset=Source(PREFERENCES, format="preference"),
        chat_template="instruction",
        max_length=MAX_LENGTH,
        max_samples=10,
        batch_size=4,
    )


def quiet_trainer(**kwargs):
    """A CPU trainer with the `ReferenceLogps` callback that writes nothing (no logger, checkpoint or bar)."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ReferenceLogps()],
        **kwargs,
    )


def test_a_model_built_outside_fit_is_refused_before_any_reference_is_computed(sft_adapter, tmp_path):
    """A model built with a trainer but no fit running (as `chat` builds it; validate, test and predict alike) has no
    frozen copy of `model.adapter`, so a fit of it would compare against the base: refused before `ReferenceLogps`
    computes anything, so that no cache file holds the base's log-probabilities under the adapter's key."""
    dm = few_pairs(tmp_path)
    module = FalconQLoRA(
        TINY,
        quantization="none",
        compute_dtype="fp32",
        adapter=str(sft_adapter),
        objective="dpo",
        precompute_reference=True,
    )
    module.trainer = quiet_trainer()  # chat's way: the trainer's device and precision, no loop running
    module.configure_model()
    assert REFERENCE not in module.model.peft_config
    with pytest.raises(ConfigError, match="built outside fit"):
        quiet_trainer(max_steps=1).fit(module, datamodule=dm)
    assert not (tmp_path / "cache" / "reference").exists()


def test_precomputed_reference_logps_serve_only_the_fit_that_computed_them(tmp_path, monkeypatch):
    """The values `ReferenceLogps` hands the datamodule belong to the model of that fit: a validate after it, and a
    later fit of another model without precomputing, on the same datamodule, run their own reference."""
    dm = few_pairs(tmp_path)
    carried = []  # whether each batch of pairs came with reference log-probabilities
    original = FalconQLoRA.pair_loss
    monkeypatch.setattr(
        FalconQLoRA,
        "pair_loss",
        lambda self, batch: carried.append("reference_logps" in batch) or original(self, batch),
    )
    one_step = {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    module = FalconQLoRA(TINY, quantization="none", compute_dtype="fp32", objective="dpo", precompute_reference=True)
    quiet_trainer(**one_step).fit(module, datamodule=dm)
    assert carried == [True, True]  # the training step and the validation one
    carried.clear()
    quiet_trainer(limit_val_batches=1).validate(module, datamodule=dm)
    other = FalconQLoRA(TINY, quantization="none", compute_dtype="fp32", objective="dpo", lora_r=4)
    quiet_trainer(**one_step).fit(other, datamodule=dm)
    assert carried == [False, False, False]


# ----------------------------------------------------------------- the chunked log-probabilities
def test_sequence_logps_chunked_equals_whole(pairs):
    """`sequence_logps` runs the output layer a chunk of positions at a time: the same sums and the same gradient as
    the whole logits at once."""
    module = lora_module(objective="dpo")
    perturb(module.model, seed=3)
    two_pairs = {key: value[[0, 1, PAIRS, PAIRS + 1]] for key, value in pairs.items()}  # chunks of 1 take a while
    with torch.no_grad():
        hidden = module._hidden(two_pairs)
    head, labels = module._head(), two_pairs["labels"]
    weights = torch.randn(len(labels), generator=torch.Generator().manual_seed(4))  # every row's gradient counts

    leaf = hidden.clone().requires_grad_()
    whole = answer_logps(head(leaf), labels)
    (whole * weights).sum().backward()
    expected_counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    for chunk in (1, 7, None):
        leaf_c = hidden.clone().requires_grad_()
        logps, counts = sequence_logps(leaf_c, head, labels, chunk)
        (logps * weights).sum().backward()
        assert torch.equal(counts, expected_counts)
        # one fp32 ulp of a sum near -220 (1.5e-5) at most: the output layer on one row rounds unlike on many
        torch.testing.assert_close(logps, whole.detach(), atol=0, rtol=LOGPS_RTOL, msg=f"chunk {chunk}")
        # the gradient reaching the decoder (all that chunking can change): 2e-6 at most, of entries up to 1.3
        torch.testing.assert_close(leaf_c.grad, leaf.grad, atol=1e-5, rtol=0, msg=f"chunk {chunk}")
        with torch.no_grad():  # validation's path: no checkpointing
            unchecked, _ = sequence_logps(hidden, head, labels, chunk)
        torch.testing.assert_close(unchecked, logps.detach(), atol=0, rtol=0, msg=f"chunk {chunk}")


@pytest.mark.parametrize("function", ["sequence_logps", "chunked_causal_lm_loss"])
def test_padding_chunks_call_the_output_layer_as_often_as_asked_and_change_nothing(function, pairs):
    """Under ZeRO-3 a rank with fewer positions than another calls the output layer on empty chunks until it has
    called it `chunks` times (each call gathers its weight, a collective): every call is made, with gradients and
    without, and the results and the gradient are exactly those without padding."""
    module = lora_module(objective="dpo")
    with torch.no_grad():
        hidden = module._hidden(pairs)
    head, labels, chunk = module._head(), pairs["labels"], 32
    weights = torch.randn(len(labels), generator=torch.Generator().manual_seed(5))  # every row's gradient counts
    positions = (labels[:, 1:] != IGNORE_INDEX).sum() if function == "sequence_logps" else labels[:, 1:].numel()
    needed = math.ceil(int(positions) / chunk)
    calls = []
    hook = head.register_forward_hook(lambda *_: calls.append(1))

    def result(states, chunks):
        if function == "sequence_logps":
            return (sequence_logps(states, head, labels, chunk, chunks)[0] * weights).sum()
        return chunked_causal_lm_loss(states, head, labels, chunk, chunks)

    outcomes = []
    for chunks in (1, needed + 3):
        leaf = hidden.clone().requires_grad_()
        calls.clear()
        value = result(leaf, chunks)
        assert len(calls) == max(chunks, needed)  # before backward, which calls it again to recompute each chunk
        value.backward()
        calls.clear()
        with torch.no_grad():  # validation's path: no checkpointing
            unchecked = result(hidden, chunks)
        assert len(calls) == max(chunks, needed)
        outcomes.append((value.detach(), unchecked, leaf.grad))
    hook.remove()
    (plain, plain_unchecked, plain_grad), (padded, padded_unchecked, padded_grad) = outcomes
    torch.testing.assert_close(padded, plain, atol=0, rtol=0)
    torch.testing.assert_close(padded_unchecked, plain_unchecked, atol=0, rtol=0)
    torch.testing.assert_close(padded_grad, plain_grad, atol=0, rtol=0)
    assert plain_grad.abs().sum() > 0


def test_log1mexp_has_a_finite_gradient_next_to_zero():
    """Just below 0, where exp(x) rounds to 1 in fp32, log(1 - e^x) has the gradient -1 / expm1(-x) (about 1/x), not
    NaN from the branch torch.where did not select; and its values are the two branches' as before."""
    x = torch.tensor([-1e-8, -3e-8, -1e-6, -0.5], requires_grad=True)
    log1mexp(x).sum().backward()
    exact = -1 / torch.expm1(-x.detach().double())
    torch.testing.assert_close(x.grad.double(), exact, atol=0, rtol=1e-5)

    split = -math.log(2)
    x = torch.cat([-torch.logspace(-8, 2, 2001), torch.tensor([split, math.nextafter(split, 0)])])
    x = x.float().requires_grad_()
    plain = torch.where(x < split, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    values = log1mexp(x)
    torch.testing.assert_close(values, plain.detach(), atol=0, rtol=0)
    values.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("stop", ["max_steps", "max_epochs"])
def test_a_precomputed_reference_replaces_the_reference_forward_of_every_step(tmp_path, monkeypatch, stop):
    """With `model.precompute_reference` the reference runs once per pair before the first step, and no step runs it
    again, whichever way the run is bounded (with `max_epochs` the optimizer's schedule builds the training loader
    before fit starts); a second run reads the cache and trains alike."""
    from helpers import fit_in_process, scalars

    calls = []
    original = FalconQLoRA.reference_logps
    monkeypatch.setattr(FalconQLoRA, "reference_logps", lambda self, batch: calls.append(1) or original(self, batch))
    bound = ["--trainer.max_steps", "6"] if stop == "max_steps" else ["--trainer.max_epochs", "1"]
    args = [
        "--model.adapter", "null", "--model.precompute_reference", "true", "--data.max_samples", "40",
        "--trainer.max_steps", "-1", *bound, "--trainer.val_check_interval", "null", "--generation.samples", "[]",
    ]  # fmt: skip
    fit_in_process(tmp_path / "first", *args, config="tiny-dpo.yaml")
    # 40 training pairs (the held-out ones are their own file) and 40 held-out ones, 8 a batch, once each; then never
    assert len(calls) == 5 + 5
    (cached,) = (tmp_path / "first" / "cache" / "reference").glob("*.pt")
    assert torch.load(cached, weights_only=True).shape == (80, 2)
    calls.clear()
    (tmp_path / "second").mkdir()
    shutil.copytree(tmp_path / "first" / "cache", tmp_path / "second" / "cache")
    fit_in_process(tmp_path / "second", *args, config="tiny-dpo.yaml")
    assert calls == []  # read from the cache
    first, second = (scalars(tmp_path / name / "runs" / "tiny-dpo" / "version_0") for name in ("first", "second"))
    assert first["train/loss"] == second["train/loss"] and len(first["train/loss"]) >= 1
