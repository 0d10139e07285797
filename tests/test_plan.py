"""The memory planner against reality: its weight bytes match a real bitsandbytes + PEFT load of the tiny model and
of narrow models of each family's shipped shape; the table and the fewest nodes `plan` prints."""

import sys
from dataclasses import replace

import pytest
import torch
from helpers import REPO, TINY
from transformers import AutoConfig

from lightning_falcon.architectures import FALCON, architecture
from lightning_falcon.assets import resolve
from lightning_falcon.commands.main import main
from lightning_falcon.commands.plan import parse_bytes
from lightning_falcon.model.lora import apply_lora
from lightning_falcon.model.memory import (
    WORKSPACE_RESERVE,
    GiB,
    Setup,
    count_model,
    fewest_nodes,
    mamba_bytes,
    peak,
    plan,
)
from lightning_falcon.model.quantization import load_causal_lm, quantized_layers
from lightning_falcon.model.random_weights import random_checkpoint

sys.path.insert(0, str(REPO / "benchmarks"))
from shapes import held_bytes, shape


def measured(quantization: str, double_quant: bool, r: int) -> dict[str, int]:
    """Bytes a real load holds, by the planner's rows (on CPU, so the compute dtype is fp32)."""
    base = load_causal_lm(TINY, quantization, double_quant, torch.float32, torch.device("cpu"))
    model = apply_lora(base, r, 2 * r, 0.0, FALCON.lora_targets, gradient_checkpointing=False)
    rows = held_bytes(model)
    return {
        "quantized": rows["quantized"] + rows["constants"],
        "unquantized": rows["unquantized"],
        "lora": rows["lora"],
    }


@pytest.mark.parametrize("quantization,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_weight_bytes_match_a_real_load_within_5_percent(quantization, double_quant):
    r = 16
    real = measured(quantization, double_quant, r)
    count = count_model(AutoConfig.from_pretrained(TINY), FALCON.lora_targets, r)
    rows = plan(count, Setup(quantization=quantization, double_quant=double_quant, compute_bytes=4), "single").rows
    predicted = {
        "quantized": rows["quantized base weights"] + rows["quantization constants"],
        "unquantized": rows["unquantized parameters"],
        "lora": rows["LoRA parameters"],
    }
    for key in real:
        assert predicted[key] == pytest.approx(real[key], rel=0.05), (key, predicted, real)
    assert sum(predicted.values()) == pytest.approx(sum(real.values()), rel=0.05)


def test_frozen_weights_kept_in_bf16_plan_and_load_at_2_bytes():
    """`upcast_frozen: false`: the unquantized weights stay in the compute dtype, as the planner counts them."""
    count = count_model(AutoConfig.from_pretrained(TINY), FALCON.lora_targets, 8)
    base = load_causal_lm(TINY, "nf4", True, torch.bfloat16, torch.device("cpu"))
    kept = held_bytes(apply_lora(base, 8, 16, 0.0, FALCON.lora_targets, False, upcast_frozen=False))
    base = load_causal_lm(TINY, "nf4", True, torch.bfloat16, torch.device("cpu"))
    upcast = held_bytes(apply_lora(base, 8, 16, 0.0, FALCON.lora_targets, False, upcast_frozen=True))
    rows = {
        frozen: plan(count, Setup(compute_bytes=2, upcast_frozen=frozen), "single").rows["unquantized parameters"]
        for frozen in (True, False)
    }
    assert kept["unquantized"] == rows[False] == count.unquantized * 2
    assert upcast["unquantized"] == rows[True] == count.unquantized * 4


def test_the_chunked_loss_plans_one_chunk_of_logits_not_the_batch():
    count = count_model(AutoConfig.from_pretrained(resolve("asset:falcon-7b")), FALCON.lora_targets, 64)
    setup = Setup(batch_size=4, max_length=512)
    whole = plan(count, setup, "single").rows["logits"]
    chunked = plan(count, replace(setup, loss_chunk_size=256), "single").rows["logits"]
    assert whole == 4 * 512 * 65_024 * (2 + 8)  # 1.24 GiB: bf16 logits, fp32 log-probabilities, fp32 gradient
    assert chunked == 256 * 65_024 * (2 + 8) + 4 * 512 * 4544 * 2  # one chunk, and the hidden states it recomputes from
    adam8 = plan(count, replace(setup, optimizer="paged_adamw_8bit"), "single").rows["LoRA optimizer states"]
    assert adam8 == pytest.approx(count.lora * (2 + 8 / 256))


def test_attention_is_planned_by_the_kernel_the_run_gets():
    falcon_7b = count_model(AutoConfig.from_pretrained(resolve("asset:falcon-7b")), FALCON.lora_targets, 64)
    falcon_40b = count_model(AutoConfig.from_pretrained(resolve("asset:falcon-40b")), FALCON.lora_targets, 64)
    assert (falcon_7b.heads, falcon_7b.kv_heads, falcon_40b.heads, falcon_40b.kv_heads) == (71, 1, 128, 8)
    setup = Setup(batch_size=4, max_length=2048, attn_implementation="sdpa")

    def attention(count, **changes):
        return plan(count, replace(setup, **changes), "single").rows["attention"]

    # the memory-efficient kernel: its fp32 log-sum-exp, and for the layer in flight the keys' and values'
    # gradients at every head (its backward's, for zero-stride keys and values): 2.2 MiB + 284 MiB at 7B
    assert attention(falcon_7b) == 4 * 71 * 2048 * 4 + 2 * 4 * 2048 * 4544 * 2
    math = attention(falcon_7b, fused_attention=False)
    assert math == 3 * 4 * 71 * 2048**2 * 4  # the fp32 probabilities, the scores, then their gradients: 13.3 GiB
    assert attention(falcon_7b, attn_implementation="eager") == math / 2  # the same three matrices in bf16
    assert attention(falcon_7b, attn_implementation="flash_attention_2") == 4 * 71 * 2048 * 4
    # transformers' own 40B: keys and values copied to all 128 heads in bf16, kept, then their gradients
    assert attention(falcon_40b, fused_attention=False) == 4 * 128 * 2048 * 4 + 2 * (2 * 4 * 2048 * 8192 * 2)
    assert attention(falcon_40b) == 4 * 128 * 2048 * 4 + 2 * 4 * 2048 * 8192 * 2
    # null: sdpa here, flash-attn 2 where it is installed, which copies 40B's keys and values: the larger
    assert attention(falcon_40b, attn_implementation=None) == attention(falcon_40b, fused_attention=False)
    assert attention(falcon_7b, attn_implementation=None, fused_attention=False) == math
    unchecked = attention(falcon_7b, fused_attention=False, gradient_checkpointing=False)
    assert unchecked == 31 * 4 * 71 * 2048**2 * 4 + math  # every layer keeps its probabilities


@pytest.mark.parametrize(
    ("flags", "kernel"),
    [
        ([], "SDPA memory-efficient kernel (keys and values at 1 head); flash-attn 2 (keys and values at 1 head)"),
        (["--model.fused_attention", "false"], "SDPA math kernel (the whole score matrix, in fp32)"),
        (["--model.attn_implementation", "eager"], "eager (the whole score matrix, in the compute dtype)"),
    ],
)
def test_plan_names_the_attention_kernel(capsys, flags, kernel):
    main(["plan", "--config", str(REPO / "configs/falcon-7b-qlora.yaml"), *flags])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("attention "))
    assert f"attention: {kernel}" in out and len(row.split()) == 6  # the row, and one figure per strategy


def test_falcon_7b_count_is_the_published_parameter_count():
    count = count_model(AutoConfig.from_pretrained(resolve("asset:falcon-7b")), FALCON.lora_targets, 64)
    assert count.quantized_weights + count.unquantized == 6_921_720_704  # tiiuae/falcon-7b's model card
    assert len(count.quantized) == 32 * 4


def test_sharding_divides_what_each_strategy_shards():
    count = count_model(AutoConfig.from_pretrained(resolve("asset:falcon-40b")), FALCON.lora_targets, 64)
    setup = Setup(world_size=8, batch_size=2, max_length=512)
    single, ddp, zero2, zero3, offload = (
        plan(count, setup, s)
        for s in ("single", "ddp", "deepspeed-zero2", "deepspeed-zero3", "deepspeed-zero3-offload")
    )
    weights = "quantized base weights"
    assert ddp.rows[weights] == zero2.rows[weights] == single.rows[weights] == pytest.approx(8 * zero3.rows[weights])
    assert zero3.rows["quantization constants"] == single.rows["quantization constants"]  # not partitionable
    assert zero2.rows["LoRA optimizer states"] == pytest.approx(single.rows["LoRA optimizer states"] / 8)
    assert offload.total < zero3.total < zero2.total < ddp.total
    assert zero3.load_peak > single.rows[weights]  # each rank holds the whole 4-bit base while it loads
    checkpointed = plan(count, setup, "single").rows["activations"]
    full = plan(count, replace(setup, gradient_checkpointing=False), "single").rows["activations"]
    assert checkpointed < full / 5


def test_parse_bytes():
    assert parse_bytes("80GB") == parse_bytes("80 GiB") == parse_bytes("80") == 80 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_plan_command_prints_the_table_and_verdicts(capsys):
    main(["plan", "--config", str(REPO / "configs/falcon-40b-qlora.yaml"), "--gpu_memory", "25GB"])
    out = capsys.readouterr().out
    lines = {line[:26].strip(): line[26:].split() for line in out.splitlines()}
    for row in (
        "quantized base weights",
        "quantization constants",
        "unquantized parameters",
        "LoRA parameters",
        "LoRA gradients",
        "LoRA optimizer states",
        "activations",
        "attention",
        "logits",
        "workspace",
        "total",
    ):
        assert len(lines[row]) == 5, row
    assert "deepspeed-zero3*" in out  # the config's own strategy is marked
    assert "8 GPU(s) x 1 node(s)" in out
    verdict = out.split("verdict (25 GiB GPU)")[1].splitlines()[0]
    # a 25 GB card cannot hold 40B's 4-bit base alone or replicated (ZeRO-2 too), but can load it whole once and
    # then hold it sharded 8 ways
    assert verdict.split()[:2] == ["does", "not"] and verdict.rstrip().endswith("fits")
    assert "with gradient checkpointing" in out


def test_plan_takes_devices_and_nodes(capsys):
    main(["plan", "--config", str(REPO / "configs/falcon-40b-qlora.yaml"), "--devices", "4", "--num_nodes", "2"])
    assert "4 GPU(s) x 2 node(s)" in capsys.readouterr().out


def test_gpu_count_reads_every_form_of_trainer_devices():
    from lightning_falcon.commands.plan import gpu_count

    assert gpu_count(4) == gpu_count("4") == 4
    assert gpu_count([0, 1]) == gpu_count("0,1") == gpu_count("[0, 1, 2]") - 1 == 2
    assert gpu_count("auto") == gpu_count(-1) == gpu_count("-1") == max(torch.cuda.device_count(), 1)


# Each family's shipped config.json, narrowed (2 layers, 128 wide, a 1,024-token vocabulary) so a real random
# checkpoint builds and loads in about a second; the real widths are the scale tier's (tests/test_scale.py).
NARROW = {
    "falcon3-7b": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 256},
    "falcon-h1-7b": {
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 320,
        "mamba_d_ssm": 256, "mamba_n_heads": 4, "mamba_d_head": 64, "mamba_d_state": 16, "mamba_chunk_size": 16,
    },
    "falcon-11b": {"num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 512},  # untied lm_head
}  # fmt: skip


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """asset -> (its narrowed config's directory, a random checkpoint of it), built once."""
    root = tmp_path_factory.mktemp("narrow")
    built = {}

    def get(asset: str):
        if asset not in built:
            config = shape(asset, 2, root, "-narrow", hidden_size=128, vocab_size=1024, **NARROW[asset])
            built[asset] = config, random_checkpoint(str(config), root / "random")
        return built[asset]

    return get


def loaded(checkpoint, r: int = 8, **load):
    """The checkpoint's nf4 base (fp32 compute, as on CPU) with LoRA r on its family's default targets."""
    base = load_causal_lm(str(checkpoint), "nf4", True, load.pop("dtype", torch.float32), torch.device("cpu"), **load)
    quantized = sorted(quantized_layers(base))
    return apply_lora(base, r, 2 * r, 0.0, architecture(base.config).lora_targets, False), quantized


@pytest.mark.parametrize("asset", list(NARROW))
def test_weight_bytes_equal_a_real_load_of_each_family_to_the_byte(narrow, asset):
    config_dir, checkpoint = narrow(asset)
    model, _ = loaded(checkpoint)
    count = count_model(AutoConfig.from_pretrained(config_dir), architecture(model.config).lora_targets, 8)
    rows = plan(count, Setup(compute_bytes=4, mixed_16bit=False), "single").rows
    assert held_bytes(model) == {
        "quantized": rows["quantized base weights"],
        "constants": rows["quantization constants"],
        "unquantized": rows["unquantized parameters"],
        "lora": rows["LoRA parameters"],
    }


def test_falcon_h1_keeps_out_proj_and_lm_head_unquantized_and_the_planner_counts_them_so(narrow):
    config_dir, checkpoint = narrow("falcon-h1-7b")
    model, quantized = loaded(checkpoint)
    leaves = {name.rsplit(".", 1)[-1] for name in quantized}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"}
    config = AutoConfig.from_pretrained(config_dir)
    count = count_model(config, architecture(config).lora_targets, 8)
    d, h, layers, vocab = 256, 128, 2, 1024
    assert (d, h) not in count.quantized and len(count.quantized) == 8 * layers  # out_proj (d -> h) left out
    in_proj = 2 * d + 2 * 16 + 4  # the gate, the convolution's x, B and C, one step size per head
    assert (h, in_proj) in count.quantized
    base = model.get_base_model()
    assert type(base.model.layers[0].mamba.out_proj) is torch.nn.Linear  # neither 4-bit nor LoRA-wrapped
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight is not base.get_input_embeddings().weight
    assert held_bytes(model)["unquantized"] == 4 * count.unquantized  # fp32, as PEFT upcasts them
    assert count.unquantized > 2 * vocab * h + layers * d * h  # embeddings, lm_head and every out_proj among them


def test_falcon2_11b_untied_lm_head_is_counted_once_beside_the_embeddings(narrow):
    config_dir, checkpoint = narrow("falcon-11b")
    model, quantized = loaded(checkpoint)
    base = model.get_base_model()
    assert base.lm_head.weight is not base.get_input_embeddings().weight and "lm_head" not in quantized
    count = count_model(AutoConfig.from_pretrained(config_dir), FALCON.lora_targets, 8)
    norms = sum(p.numel() for n, p in base.named_parameters() if "ln_" in n or "layernorm" in n)
    assert count.unquantized == 2 * 1024 * 128 + norms  # the embeddings and the output layer, each once
    # the same model with its output layer tied to the embeddings holds one vocabulary matrix fewer
    tied = count_model(AutoConfig.from_pretrained(config_dir, tie_word_embeddings=True), FALCON.lora_targets, 8)
    assert count.unquantized - tied.unquantized == 1024 * 128


@pytest.mark.parametrize("upcast_frozen", [True, False])
def test_zero3_load_peak_is_what_fit_builds_before_deepspeed_shards_it(upcast_frozen):
    """Under ZeRO-3 each rank loads the whole base (4-bit weights stored in bf16, no device map) and adds LoRA before
    DeepSpeed partitions anything: the planner's load peak is those bytes, or the load's own where that is more
    (the largest weight in bf16 before it is packed), plus its 1 GiB reserve."""
    base = load_causal_lm(TINY, "nf4", True, torch.bfloat16, None, quant_storage=torch.bfloat16)
    loaded = held_bytes(base)
    model = apply_lora(base, 8, 16, 0.0, FALCON.lora_targets, True, upcast_frozen=upcast_frozen)
    count = count_model(AutoConfig.from_pretrained(TINY), FALCON.lora_targets, 8)
    largest = 2 * max(i * o for i, o in count.quantized)
    built = sum(held_bytes(model).values())
    setup = Setup(compute_bytes=2, world_size=8, upcast_frozen=upcast_frozen)
    for strategy in ("deepspeed-zero3", "deepspeed-zero3-offload"):
        planned = plan(count, setup, strategy).load_peak
        assert planned == max(built, sum(loaded.values()) + largest) + WORKSPACE_RESERVE
    assert plan(count, setup, "deepspeed-zero2").load_peak == 0  # loaded onto each GPU as trained: no extra peak
    assert plan(count, replace(setup, quantization="none"), "deepspeed-zero3").load_peak == 0  # built under zero.Init


def test_mamba_rows_keep_every_layers_saved_part_only_without_checkpointing():
    """Without checkpointing each Mamba-2 layer keeps what mamba_ssm saves (in_proj's outputs and the scan's
    output); what backward rebuilds (the convolution, the gated norm, the chunk states) is one layer's either way."""
    config = AutoConfig.from_pretrained(resolve("asset:falcon-h1-7b"))
    count = count_model(config, architecture(config).lora_targets, 64)
    assert count.mamba == {"d": 3072, "g": 1, "n": 256, "H": 24, "P": 128, "Q": 256, "k": 4}
    assert (count.heads, count.kv_heads, count.head_dim, count.hidden) == (12, 2, 128, 3072)  # 12 x 128 != 3072
    setup = Setup(batch_size=4, max_length=512)
    kept = 4 * 512 * (3 * 3072 + 2 * 256 + 24) * 2
    checkpointed, full = mamba_bytes(count, setup), mamba_bytes(count, replace(setup, gradient_checkpointing=False))
    assert full - checkpointed == (44 - 1) * kept
    rebuilt = 4 * 512 * (2 * 3072 + 2 * 256) * 2 + 4 * 2 * 24 * 128 * 256 * 4 + 2 * 4 * 24 * 512 * 4
    caches = 44 * 4 * (24 * 128 * 256 + (3072 + 2 * 256) * 4) * 4
    assert checkpointed == kept + rebuilt + caches
    # the attention's keys and values copied to every query head are 12 heads of 128, not the hidden width
    attention = plan(count, replace(setup, attn_implementation="eager"), "single").rows["attention"]
    assert attention == 3 * 4 * 12 * 512**2 * 2 + 2 * (2 * 4 * 512 * 12 * 128 * 2)


def test_fewest_nodes_is_the_first_count_that_fits_or_none_with_what_stops_it():
    count = count_model(AutoConfig.from_pretrained(resolve("asset:falcon-40b")), FALCON.lora_targets, 64)
    setup = Setup(batch_size=2, max_length=512, optimizer="paged_adamw_8bit")
    one = plan(count, replace(setup, world_size=1), "deepspeed-zero3")
    memory = (one.load_peak + one.total) / 2  # the load fits one GPU, training on one GPU does not
    assert one.load_peak < memory < one.total
    found = fewest_nodes(count, setup, "deepspeed-zero3", 1, memory)
    assert found.nodes > 1 and peak(found.plan) <= memory == pytest.approx(memory)
    below = plan(count, replace(setup, world_size=found.nodes - 1), "deepspeed-zero3")
    assert peak(below) > memory  # one node fewer does not fit
    stopped = fewest_nodes(count, setup, "deepspeed-zero3", 8, one.load_peak - 1)
    assert stopped.nodes is None and stopped.plan.load_peak == one.load_peak  # no node count lowers the load peak
    ddp = fewest_nodes(count, setup, "ddp", 8, 24 * GiB)  # DDP replicates the 19 GiB base on every GPU
    assert ddp.nodes is None and ddp.plan.rows["quantized base weights"] == one.rows["quantized base weights"]


def test_plan_prints_the_fewest_nodes_and_takes_nodes_for_num_nodes(capsys):
    config = str(REPO / "configs/falcon-40b-qlora.yaml")
    main(["plan", "--config", config, "--devices", "4", "--nodes", "2", "--gpu_memory", "80GB"])
    out = capsys.readouterr().out
    assert "4 GPU(s) x 2 node(s)" in out
    assert "nodes: deepspeed-zero3 fits 80 GiB GPUs from 1 node(s) of 4 GPU(s)" in out
    main(["plan", "--config", config, "--gpu_memory", "16GB"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("nodes:")]
    assert line.startswith("nodes: no node count fits 16 GiB GPUs with deepspeed-zero3: the load peak, ")
    assert line.endswith("while it loads, before DeepSpeed shards it")


# The preference objectives (model/preference.py): pairs double the sequences of a forward; dpo and ipo add the
# reference's forward without gradients, ORPO none; the reference is never a second base.
BASE_ROWS = ("quantized base weights", "quantization constants", "unquantized parameters")


def falcon_7b_plans(**changes) -> dict[str, dict[str, float]]:
    """The single-GPU rows of Falcon-7B at batch 4 x 512 with the chunked loss, by objective."""
    count = count_model(AutoConfig.from_pretrained(resolve("asset:falcon-7b")), FALCON.lora_targets, 64)
    setup = Setup(**{"batch_size": 4, "max_length": 512, "loss_chunk_size": 256, **changes})
    return {o: plan(count, replace(setup, objective=o), "single").rows for o in ("sft", "dpo", "ipo", "orpo")}


def test_dpo_plans_pairs_and_a_reference_forward_without_gradients_but_no_second_base():
    plans = falcon_7b_plans()
    sft, dpo, orpo = (sum(plans[o].values()) for o in ("sft", "dpo", "orpo"))
    second_base = sum(plans["sft"][row] for row in BASE_ROWS)
    assert sft < orpo < dpo < 2 * sft + second_base
    assert dpo < sft + second_base  # what the pairs and the reference add is less than the 4-bit base alone
    assert plans["ipo"] == plans["dpo"]
    # the pairs: twice the sequences' activations; the weights are the same model's
    eight = falcon_7b_plans(batch_size=8)["sft"]
    for row in ("activations", "attention", "logits"):
        assert plans["dpo"][row] == plans["orpo"][row] == eight[row], row
    for row in (*BASE_ROWS, "LoRA parameters", "LoRA gradients", "LoRA optimizer states", "workspace"):
        assert plans["dpo"][row] == plans["sft"][row], row
    # the reference saves nothing for backward: one layer's working set, the hidden states and one chunk of logits
    b, s, h, c = 8, 512, 4544, 2
    reference = 34 * b * s * h * c / 2 + b * 71 * s * 4 + b * s * h * c + 256 * 65_024 * (c + 8)
    assert plans["dpo"]["reference forward"] == reference  # 0.78 GiB, against the pairs' 1.70 GiB of activations
    assert reference < plans["dpo"]["activations"]
    assert "reference forward" not in plans["orpo"] and "reference forward" not in plans["sft"]
    assert not any(row.startswith("reference") for row in plans["orpo"])
    # precomputed, the reference runs once before training: a step holds no more than ORPO's
    assert falcon_7b_plans(precompute_reference=True)["dpo"] == plans["orpo"]


def test_a_reference_adapter_is_a_frozen_copy_of_lora_not_a_second_base():
    plans = falcon_7b_plans(reference_adapter=True)
    assert plans["dpo"]["reference adapter"] == plans["dpo"]["LoRA parameters"]  # 0.49 GiB of fp32 LoRA weights
    assert "reference adapter" not in plans["orpo"] and "reference adapter" not in plans["sft"]  # no reference


def test_pairs_are_scored_from_the_hidden_states_even_without_a_loss_chunk():
    """`loss_chunk_size: null`: SFT takes the model's own loss; the pairs still go through the hidden states, in one
    chunk of the whole batch."""
    plans = falcon_7b_plans(loss_chunk_size=None)
    positions = 8 * 512
    assert plans["sft"]["logits"] == 4 * 512 * 65_024 * (2 + 8)
    assert plans["orpo"]["logits"] == positions * 65_024 * (2 + 8) + positions * 4544 * 2


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--model.objective", "dpo"],
            (
                "objective dpo: 2 sequences per pair (8 a forward for 4 pair(s)), reference forward without "
                "gradients (the base, the adapter switched off; no second base)"
            ),
        ),
        (
            ["--model.objective", "orpo"],
            "objective orpo: 2 sequences per pair (8 a forward for 4 pair(s)), no reference",
        ),
    ],
)
def test_plan_names_the_objective_it_counted(capsys, flags, line):
    config = str(REPO / "configs/falcon-7b-qlora.yaml")
    main(["plan", "--config", config])
    sft = capsys.readouterr().out
    main(["plan", "--config", config, *flags])
    out = capsys.readouterr().out
    assert line in out.splitlines() and "objective" not in sft
    assert "batch 4 pairs x 512 tokens" in out and "batch 4 x 512 tokens" in sft
    totals = [float(t) for t in next(x for x in out.splitlines() if x.startswith("total")).split()[1:]]
    sft_totals = [float(t) for t in next(x for x in sft.splitlines() if x.startswith("total")).split()[1:]]
    assert all(a > b for a, b in zip(totals, sft_totals, strict=True))
    assert ("reference forward  " in out) is ("dpo" in flags)


def test_plan_reads_the_objective_from_the_configs_model_section(capsys):
    """configs/tiny-dpo.yaml sets `model.objective: dpo` and starts from an adapter, its frozen reference."""
    main(["plan", "--config", str(REPO / "configs/tiny-dpo.yaml")])
    out = capsys.readouterr().out
    assert (
        "objective dpo: 2 sequences per pair (16 a forward for 8 pair(s)), reference forward without gradients "
        "(a frozen copy of model.adapter; no second base)" in out
    )
    assert "reference adapter  " in out and "reference forward  " in out
