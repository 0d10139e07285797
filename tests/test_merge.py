"""The layer-by-layer merge: each quantized layer becomes its dequantized weight plus its LoRA update."""

import pytest
import torch
from helpers import TINY
from torch import nn

from lightning_falcon.export.merge import dense_weight, merge_into_dequantized
from lightning_falcon.model.lora import apply_lora
from lightning_falcon.model.quantization import load_causal_lm, quantized_layers


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_every_quantized_layer_becomes_its_dense_weight_plus_its_lora_update(quantization):
    base = load_causal_lm(TINY, quantization, True, torch.float32, torch.device("cpu"))
    model = apply_lora(base, 8, 16, 0.0, ["query_key_value", "dense"], gradient_checkpointing=False)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)  # a trained-looking update: PEFT starts B at zero
    model.eval()
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lora = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected = {n: dense_weight(m.get_base_layer()) + m.get_delta_weight("default") for n, m in lora.items()}
    untargeted = {n: dense_weight(m) for n, m in quantized_layers(model).items() if ".base_layer" not in n}
    assert len(expected) == 4 and len(untargeted) == 4  # 2 layers x (2 adapted + 2 left alone)

    merged = merge_into_dequantized(model, torch.float32)

    assert not quantized_layers(merged) and not hasattr(merged.config, "quantization_config")
    for name, weight in {**expected, **{n.removeprefix("base_model.model."): w for n, w in untargeted.items()}}.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight), name
    if quantization == "nf4":  # 4-bit matmuls are the dense weight's; 8-bit ones also round the activations
        with torch.no_grad():
            after = merged(input_ids=ids).logits
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
