"""The memory planner against reality: its weight bytes match a real bitsandbytes + PEFT load of the tiny model."""

import sys
from dataclasses import replace

import pytest
import torch
from helpers import REPO, TINY
from transformers import AutoConfig

from lightning_falcon.architectures import FALCON
from lightning_falcon.assets import resolve
from lightning_falcon.commands.main import main
from lightning_falcon.commands.plan import parse_bytes
from lightning_falcon.model.lora import apply_lora
from lightning_falcon.model.memory import Setup, count_model, plan
from lightning_falcon.model.quantization import load_causal_lm

sys.path.insert(0, str(REPO / "benchmarks"))
from shapes import held_bytes


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
    main(["plan", "--config", str(REPO / "configs/falcon-40b-qlora.yaml"), "--gpu_memory", "24GB"])
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
    verdict = out.split("verdict (24 GiB GPU)")[1].splitlines()[0]
    # a 24 GB card cannot hold 40B's 4-bit base alone or replicated, and holds it sharded 8 ways
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
