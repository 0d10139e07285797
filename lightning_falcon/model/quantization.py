"""bitsandbytes settings -> a quantized load. With `upstream.py`, the only module that imports bitsandbytes.

The traps this file exists for, each family's answer in its row of `architectures.py`:
- transformers 5.x swaps in bitsandbytes layers only for modules whose type is *exactly* `nn.Linear`, and
  Falcon's are `FalconLinear(nn.Linear)`, so a plain "4-bit" load of Falcon silently stays full precision.
  The load builds Falcon with `nn.Linear` in their place (`Architecture.build`).
- Falcon-H1's fused Mamba kernels read `out_proj`'s weight directly: a 4-bit one crashes them, so it stays
  in the compute dtype (`Architecture.keep_unquantized`).
`tests/test_quantization.py` proves, family by family, which layers are quantized and which are not.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_falcon.architectures import architecture
from lightning_falcon.errors import ConfigError, first_line
from lightning_falcon.upstream import keep_4bit_layout_trainable, quantization_constants

# The output layer of every supported family; transformers keeps it unquantized unless given its own list.
OUTPUT_LAYER = "lm_head"

Quantization = Literal["nf4", "fp4", "int8", "none"]
ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]

# The dtypes a config names (model.compute_dtype, export --dtype).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_compute_dtype(compute_dtype: ComputeDtype, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU with native bf16 (`has_native_bf16`), else fp16 on CUDA, and fp32 on CPU.

    fp32 on CPU is deliberate: bitsandbytes' bf16 4-bit path on CPU is far slower (BENCHMARKS.md).
    """
    if compute_dtype != "auto":
        return DTYPES[compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return torch.float32


# Compute capability from which a GPU has bf16 tensor cores (Ampere: A100, A10, RTX 30xx; then H100, L4, ...).
NATIVE_BF16_CAPABILITY = (8, 0)


def has_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA GPU `device` computes in bf16 natively (compute capability 8.0 or later).

    Not `torch.cuda.is_bf16_supported()`: it also says yes where bf16 is only emulated (T4 7.5, V100 7.0),
    and it allocates on the current device, which before Lightning sets it is GPU 0 for every DDP rank.
    """
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def check_bf16_is_native(compute_dtype: torch.dtype, precision: str, device: torch.device) -> None:
    """Fail in one line, before any weights load, when a run asks for bf16 on a GPU that only emulates it.

    Args:
        compute_dtype: The resolved compute dtype (`resolve_compute_dtype`).
        precision: The trainer's precision (`bf16-mixed`, `bf16-true`, `16-mixed`, ...).
        device: This rank's device; only a CUDA device is checked.
    """
    if device.type != "cuda":
        return
    asked, fixes, alternative = [], [], ""
    if compute_dtype is torch.bfloat16:
        asked.append("model.compute_dtype bf16")
        fixes.append("--model.compute_dtype fp16")
        alternative = " (or --model.compute_dtype auto, which picks fp16 there)"
    if str(precision).startswith("bf16"):
        asked.append(f"trainer.precision {precision}")
        fixes.append("--trainer.precision 16-mixed")
    if not asked or has_native_bf16(device):
        return
    major, minor = torch.cuda.get_device_capability(device)
    raise ConfigError(
        f"{' and '.join(asked)} need{'s' if len(asked) == 1 else ''} a GPU with native bf16 (compute capability 8.0 "
        f"or later), and {device} is {torch.cuda.get_device_name(device)} ({major}.{minor}), which only emulates it, "
        f"far slower. Fix: {' '.join(fixes)}{alternative}"
    )


def check_quantization_runs(quantization: Quantization, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Fail in one line, before any weights load, when this machine cannot run `quantization`.

    Which modes bitsandbytes runs depends on its version, its build and the device (0.50 runs nf4, fp4
    and int8 on CPU), so this asks the machine rather than a table: it quantizes one small layer on
    `device`, as the load will.
    """
    if quantization == "none":
        return
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(
            f"model.quantization {quantization} needs bitsandbytes, which does not import here ({first_line(e)}). "
            "Fix: pip install bitsandbytes, or --model.quantization none (LoRA on an unquantized base)"
        ) from e
    try:
        # Forked: the probe's random layer must not shift the seeded LoRA initialisation that follows.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _run_quantized_layer(bnb, quantization, compute_dtype, device)
    except Exception as e:
        raise ConfigError(
            f"model.quantization {quantization} ({str(compute_dtype).removeprefix('torch.')} compute) does not run "
            f"on {device} with bitsandbytes {bnb.__version__}: {first_line(e)}. "
            "Fix: choose another --model.quantization (nf4, fp4, int8 or none) or --model.compute_dtype"
        ) from e


def _run_quantized_layer(bnb, quantization: Quantization, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Quantize a 64x64 layer on `device` (bitsandbytes quantizes as it moves the weights there).

    It runs no matmul: a matmul here, before training, has made a resumed CPU run drift from the
    uninterrupted one (bitsandbytes 0.50; tests/test_reliability.py requires them bit-identical).
    """
    dense = nn.Linear(64, 64)
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=compute_dtype, quant_type=quantization)
        layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type=quantization)
    layer.bias = nn.Parameter(dense.bias.data.to(compute_dtype))
    layer = layer.to(device)
    if layer.weight.dtype not in (torch.uint8, torch.int8) or layer.weight.device.type != device.type:
        raise RuntimeError(f"its weight stayed {layer.weight.dtype} on {layer.weight.device}")


def bnb_config(
    quantization: Quantization,
    double_quant: bool,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype = torch.uint8,
    keep: tuple[str, ...] = (),
):
    """The `BitsAndBytesConfig` for a quantization name, or None for `none`.

    `quant_storage` is the dtype the packed 4-bit weights are stored in. DeepSpeed ZeRO-3 partitions
    only floating tensors of its own dtype, so under ZeRO-3 it is that dtype; elsewhere uint8.
    `keep` names linear layers left unquantized (`Architecture.keep_unquantized`). A list of its own replaces
    transformers' default one, which keeps the output layer, so the output layer joins it.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    skip = {"llm_int8_skip_modules": [*keep, OUTPUT_LAYER]} if keep else {}
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def load_causal_lm(
    model_name_or_path: str,
    quantization: Quantization,
    double_quant: bool,
    compute_dtype: torch.dtype,
    device: torch.device | None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Load a causal LM of a supported family (`architectures.py`) through `from_pretrained`, quantized onto `device`.

    `device=None` is the DeepSpeed ZeRO-3 load: transformers refuses a `device_map` there, and puts a
    quantized model on this rank's current device itself (`torch.cuda.current_device()`, set per rank).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    family = architecture(AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code))
    quantization_config = bnb_config(quantization, double_quant, compute_dtype, quant_storage, family.keep_unquantized)
    kwargs = {}
    if quantization_config is not None and device is not None:
        # bitsandbytes quantizes while it moves weights onto the device, so the device is explicit:
        # each DDP rank gets its own copy on its own GPU, never all of them on cuda:0.
        kwargs["device_map"] = {"": str(device)}
    with family.build():
        model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path,
            quantization_config=quantization_config,
            dtype=compute_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            **kwargs,
        )
    if quantization_config is None and device is not None:
        model.to(device)
    keep_4bit_layout_trainable(model)
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every bitsandbytes 4-bit or 8-bit linear layer in `model`."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def constant_bytes(module: nn.Module) -> int:
    """Bytes of a quantized layer's constants, which are neither parameters nor buffers (so
    `get_memory_footprint` leaves them out): 4-bit absmax (with its own constants under double
    quantization) and codes, or 8-bit row scales."""
    return sum(t.numel() * t.element_size() for t in quantization_constants(module.weight))


def paged_adamw_8bit(params, **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW: paged on CUDA; bitsandbytes runs it unpaged on CPU."""
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, **kwargs)
