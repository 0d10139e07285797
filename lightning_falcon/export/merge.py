"""LoRA merged into a quantized base one layer at a time, so a merged 7B never needs twice its size in memory.

Expanding the whole 4-bit model first (`model.dequantize()`) holds every layer dense in the compute
dtype at once: 26.5 GB of weights for a 7B in fp32, twice the merged model itself (13.8 GB in bf16). Here each
layer is expanded, gets its LoRA update in fp32, is cast to the target dtype and replaces the 4-bit
layer, which is then freed: the peak is the merged model plus what is still 4-bit plus one fp32 layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_falcon.model.quantization import quantized_layers
from lightning_falcon.upstream import forget_quantization


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes 4-bit or 8-bit layer computes with, expanded to fp32 by bitsandbytes itself."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    # 8-bit: one scale per row, on the weight until the first forward moves it to the layer's state
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def merge_into_dequantized(peft_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The plain transformers model of `peft_model` (a PeftModel on a bitsandbytes base), LoRA merged, in `dtype`.

    Every 4-bit or 8-bit layer becomes an `nn.Linear` holding its dequantized weight plus its LoRA
    update (`get_delta_weight`, as PEFT's own merge adds it); layers without LoRA are expanded alone.
    """
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    inside_lora = {f"{name}.base_layer" for name in lora}
    bare = {name: m for name, m in quantized_layers(model).items() if name not in inside_lora}
    for name, module in [*lora.items(), *bare.items()]:
        base = module.get_base_layer() if name in lora else module
        with torch.no_grad():
            weight = dense_weight(base)
            if name in lora:
                weight += module.get_delta_weight(adapter).float()
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
            dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            if base.bias is not None:
                dense.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        del weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    forget_quantization(model)  # as `model.dequantize()` does after expanding: now a plain model, which may be cast
    model.to(dtype)  # the embeddings, norms and biases left
    return model
