"""LoRA settings -> a PEFT model: the target check, the wrapping, the parameter report, and the frozen copy of an
adapter that the preference objectives compare against (`add_reference`).

Each family's default targets are its row of `lightning_falcon/architectures.py`."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_falcon.architectures import Architecture
from lightning_falcon.errors import ConfigError
from lightning_falcon.model.quantization import constant_bytes
from lightning_falcon.upstream import loaded_in_kbit


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the linear layers in `model` (the names LoRA can target)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):  # bitsandbytes' 4-bit and 8-bit layers subclass it too
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(available: list[str], target_modules: Sequence[str], family: Architecture) -> None:
    """Fail, listing both problems, when a LoRA target is missing from the model (naming the linear modules it has)
    or is one its family's fused kernels bypass (`Architecture.not_lora`)."""
    problems = []
    bypassed = [t for t in target_modules if t in family.not_lora]
    missing = [t for t in target_modules if t not in available and t not in bypassed]
    if missing:
        problems.append(
            f"model.target_modules {missing} not found in the model; it has linear modules {available}. "
            "Fix: set --model.target_modules to some of those."
        )
    if bypassed:
        problems.append(
            f"model.target_modules {bypassed}: {family.family}'s fused kernels read these weights directly, "
            f"so LoRA there would silently not train. Fix: leave model.target_modules unset "
            f"({', '.join(family.lora_targets)})"
        )
    ConfigError.collect(problems)


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str],
    gradient_checkpointing: bool,
    upcast_frozen: bool = True,
) -> nn.Module:
    """Prepare a (k-bit) base for training and wrap it with LoRA adapters; only LoRA weights train.

    `upcast_frozen`: a k-bit base gets PEFT's `prepare_model_for_kbit_training`, which upcasts every
    unquantized weight to fp32. Without it the base is frozen as it is and keeps its compute dtype.
    The targets are checked before this, on the model's skeleton (`FalconQLoRA.check_targets`).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if loaded_in_kbit(model) and upcast_frozen:
        # Freezes the base, upcasts norms for stability and enables input grads for checkpointing.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model.requires_grad_(False)  # get_peft_model freezes the base too; a k-bit base is frozen here
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    # The KV cache is useless while training and conflicts with checkpointing.
    model.config.use_cache = False
    targets = list(target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


@dataclass
class ParameterReport:
    """What a user wants to know about the wrapped model at the start of fit."""

    quantized_layers: int
    trainable: int
    total: int
    footprint_bytes: int

    def __str__(self) -> str:
        return (
            f"quantized linear layers: {self.quantized_layers} | trainable params: {self.trainable:,} "
            f"of {self.total:,} ({100 * self.trainable / max(self.total, 1):.3f}%) | "
            f"memory footprint: {self.footprint_bytes / 2**20:.1f} MiB"
        )


def parameter_report(peft_model: nn.Module, quantized: dict[str, nn.Module]) -> ParameterReport:
    """The report for `peft_model`, whose bitsandbytes layers are `quantized` (name -> module)."""
    # PEFT counts 4-bit parameters unpacked (two values per stored byte), unlike numel().
    trainable, total = peft_model.get_nb_trainable_parameters()
    constants = sum(constant_bytes(m) for m in quantized.values())
    return ParameterReport(len(quantized), trainable, total, peft_model.get_memory_footprint() + constants)


REFERENCE = "reference"  # the frozen adapter the preference objectives compare against, beside PEFT's "default"


def add_reference(peft_model) -> None:
    """Add a frozen copy of the trained adapter as the reference adapter (`REFERENCE`), without dropout, so that
    the reference's log-probabilities are deterministic, as a reference model in eval mode gives them."""
    config = copy.deepcopy(peft_model.peft_config["default"])  # every LoRA setting the trained one has
    config.lora_dropout = 0.0
    config.inference_mode = True  # frozen
    peft_model.add_adapter(REFERENCE, config)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if ".default." in name:
                params[name.replace(".default.", f".{REFERENCE}.")].copy_(param)
    peft_model.set_adapter("default")  # add_adapter may leave the new one marked trainable


@contextlib.contextmanager
def active_adapter(peft_model, name: str) -> Iterator[None]:
    """Run `peft_model` with its adapter `name` instead of the trained one inside the block."""
    peft_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.set_adapter("default")  # marks the trained adapter trainable again, the other one frozen
