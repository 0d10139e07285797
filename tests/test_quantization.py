"""The 4-bit load is real: Falcon's FalconLinear layers become bitsandbytes layers and shrink."""

import bitsandbytes as bnb
import pytest
import torch
from helpers import TINY, TINY_FAMILIES, layer_bytes, on_a_gpu, unquantized_bytes
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lightning_falcon.architectures import FALCON, architecture
from lightning_falcon.model.quantization import (
    load_causal_lm,
    quantized_layers,
    resolve_compute_dtype,
)

CPU = torch.device("cpu")


def targeted(model):
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in FALCON.lora_targets}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_targeted_layer_is_4bit_and_at_most_a_third_of_16bit(quant_type, request):
    if quant_type == "nf4":
        model = request.getfixturevalue("tiny_nf4")
    else:
        model = load_causal_lm(TINY, quant_type, double_quant=True, compute_dtype=torch.float32, device=CPU)
    layers = targeted(model)
    assert len(layers) == 4 * model.config.num_hidden_layers
    not_4bit = [n for n, m in layers.items() if not isinstance(m, bnb.nn.Linear4bit)]
    assert not_4bit == []
    assert all(m.weight.quant_state.quant_type == quant_type for m in layers.values())
    quantized = sum(layer_bytes(m) for m in layers.values())
    full = sum(unquantized_bytes(m, torch.bfloat16) for m in layers.values())
    assert quantized <= full / 3, f"4-bit layers hold {quantized} bytes vs {full} unquantized (bf16)"
    too_big = [n for n, m in layers.items() if layer_bytes(m) > unquantized_bytes(m, torch.bfloat16) / 3]
    assert too_big == []


def test_plain_transformers_load_stays_full_precision():
    """The trap the quantization module works around: without it nothing in Falcon's blocks is quantized."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(TINY, quantization_config=config, device_map={"": "cpu"})
    assert quantized_layers(model) == {}


def test_quantized_model_still_predicts_like_the_full_precision_one(tiny_nf4):
    full = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    quant = tiny_nf4
    ids = torch.randint(0, full.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(ids).logits, quant(ids).logits
    # 4-bit weights perturb the logits a little, not wholesale.
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95


def test_no_quantization_loads_plain_linear_layers():
    model = load_causal_lm(TINY, "none", double_quant=True, compute_dtype=torch.float32, device=CPU)
    assert quantized_layers(model) == {}


def test_auto_compute_dtype_is_fp32_on_cpu():
    assert resolve_compute_dtype("auto", CPU) is torch.float32
    assert resolve_compute_dtype("bf16", CPU) is torch.bfloat16


@pytest.mark.parametrize(
    "capability,expected",
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16), ((7, 0), torch.float16)],
    ids=["H100", "A100", "T4", "V100"],
)
def test_auto_compute_dtype_is_bf16_only_where_this_ranks_gpu_has_it_natively(monkeypatch, capability, expected):
    def is_bf16_supported(*args, **kwargs):  # emulation counts for it; it must not decide
        raise AssertionError("is_bf16_supported() was asked")

    asked = on_a_gpu(monkeypatch, capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    device = torch.device("cuda", 3)
    assert resolve_compute_dtype("auto", device) is expected
    assert asked == [device]  # this rank's GPU, not the current device (GPU 0 before Lightning sets it)
    assert resolve_compute_dtype("fp16", device) is torch.float16 and asked == [device]  # explicit: no question


def test_backward_through_4bit_layer_is_exact_after_an_eval_pass():
    """Validation before training (Lightning's sanity check) must not break gradients through the base."""
    import bitsandbytes.functional as F

    model = load_causal_lm(TINY, "nf4", double_quant=True, compute_dtype=torch.float32, device=CPU)
    layer = model.transformer.h[0].mlp.dense_h_to_4h
    weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    model.eval()
    with torch.no_grad():
        layer(torch.randn(3, layer.in_features))
    model.train()
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None
    reference = torch.autograd.grad((x @ weight.T).pow(2).sum(), x)[0]
    torch.testing.assert_close(x.grad, reference)


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_each_family_quantizes_every_block_projection_but_the_ones_its_kernels_read(family):
    """Falcon3: every projection. Falcon-H1: all but Mamba's out_proj, which its fused kernels read directly; and its
    output layer stays whole, though a skip list of our own replaces the one transformers keeps it with."""
    model = load_causal_lm(TINY_FAMILIES[family], "nf4", double_quant=True, compute_dtype=torch.float32, device=CPU)
    family_row = architecture(model.config)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {n for n in linear if n.rsplit(".", 1)[-1] in family_row.keep_unquantized} | {"lm_head"}
    assert sorted(quantized_layers(model)) == sorted(set(linear) - kept)
    assert all(type(linear[n]) is torch.nn.Linear and linear[n].weight.dtype == torch.float32 for n in kept)
    assert {n.rsplit(".", 1)[-1] for n in quantized_layers(model)} == set(family_row.lora_targets)
    assert len(kept) == 1 + (model.config.num_hidden_layers if family == "falcon-h1" else 0)
