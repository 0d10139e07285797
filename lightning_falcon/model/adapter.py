"""The trained result as a PEFT adapter directory: what it holds, how it is checked, saved and loaded.

An adapter directory is what `PeftModel.from_pretrained` reads (`adapter_config.json` and
`adapter_model.safetensors`). Ours also holds the tokenizer, a `generation_config.json` with the EOS
and pad ids, and `lightning_falcon.json`: how the base was quantized (so `export --merge` rebuilds
exactly the 4-bit weights the adapter was trained against) and the prompt template it was trained with.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from lightning_falcon.architectures import architecture
from lightning_falcon.data.tokenizer import special_ids
from lightning_falcon.errors import ConfigError
from lightning_falcon.files import load_weights_only, staged_directory
from lightning_falcon.model.preference import REFERENCED
from lightning_falcon.upstream import lora_weight_name

ADAPTER_CONFIG = "adapter_config.json"
METADATA = "lightning_falcon.json"


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter directory (it has `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter_dir(path: str | Path) -> Path:
    """The adapter directory, or a one-line error saying what is wrong with it."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"adapter directory not found: {path}. Fix: give the `adapter/` directory of a run")
    if not is_adapter_dir(path):
        raise ConfigError(
            f"{path} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter. "
            "Fix: give the `adapter/` directory that fit writes at the end of a run (runs/NAME/version_N/adapter)"
        )
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """`lightning_falcon.json` of an adapter directory; empty for an adapter made elsewhere."""
    file = Path(path) / METADATA
    return json.loads(file.read_text()) if file.is_file() else {}


def _lora_settings(r: int, alpha: float, targets: list[str] | None) -> dict[str, Any]:
    return {"lora_r": r, "lora_alpha": alpha, "target_modules": sorted(targets or [])}


def read_saved_lora(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, tuple[int, ...]]]:
    """What a checkpoint file or adapter directory says of its LoRA, without loading any weights.

    Returns the rank, alpha and targets it was trained with (None if it does not say), and
    `<module path>.lora_A` / `.lora_B` -> weight shape. They come from `adapter_config.json` and the
    safetensors header, or from one memory-mapped load of a checkpoint. A DeepSpeed checkpoint directory
    keeps them in its shards, so it yields nothing here; its weights are checked when they load.
    """
    path = Path(path)
    settings, items = None, []
    if is_adapter_dir(path):
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        settings = _lora_settings(config.get("r"), config.get("lora_alpha"), config.get("target_modules"))
        if (path / "adapter_model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
                items = [(key, tuple(f.get_slice(key).get_shape())) for key in f.keys()]  # noqa: SIM118 (safetensors handles are not dicts)
    elif path.is_file():
        checkpoint = load_weights_only(path, mmap=True)
        hp = checkpoint.get("hyper_parameters", {})
        if "lora_r" in hp:
            settings = _lora_settings(hp["lora_r"], hp.get("lora_alpha"), hp.get("target_modules"))
        items = [(key, tuple(t.shape)) for key, t in checkpoint.get("state_dict", {}).items()]
    shapes = {}
    for key, shape in items:
        name = lora_weight_name(key)  # `<module>.lora_A` or `<module>.lora_B`
        if name is not None:
            shapes[name] = shape
    return settings, shapes


def check_matches(path: str | Path, lora_r: int, lora_alpha: float, target_modules: list[str], skeleton) -> None:
    """Fail in one line, before the base loads, when a checkpoint's LoRA weights cannot fit the configured model.

    Two checks: the LoRA settings it was trained with against the config, and the shape of every LoRA
    weight against the layer it adapts in `skeleton` (the model built on the meta device), which
    catches an adapter trained on another base.
    """
    if not Path(path).expanduser().exists():
        raise ConfigError(
            f"checkpoint or adapter {path} not found. Fix: train it first (fit writes runs/NAME/version_N/adapter), "
            "or give the path of an existing one"
        )
    saved, shapes = read_saved_lora(Path(path).expanduser())
    if saved is not None and not saved["target_modules"]:  # a run of `model.target_modules: null`: the family's own
        saved["target_modules"] = sorted(architecture(skeleton.config).lora_targets)
    configured = _lora_settings(lora_r, lora_alpha, target_modules)
    differ = [k for k in configured if saved is not None and saved[k] != configured[k]]
    if differ:
        found = ", ".join(f"{k}={saved[k]} (config: {configured[k]})" for k in differ)
        fix = " ".join(f"--model.{k} {json.dumps(saved[k])}" for k in differ)
        raise ConfigError(
            f"checkpoint {path} does not match the model config: it was trained with {found}. "
            f"Fix: pass {fix}, or use the run's own config.yaml"
        )
    layers = dict(skeleton.named_modules())
    for name, shape in shapes.items():
        module, kind = name.rsplit(".", 1)
        layer = layers.get(module)
        if layer is None:
            problem = f"checkpoint {path} adapts {module}, which the model does not have"
        elif (kind == "lora_A" and shape[1] != layer.in_features) or (
            kind == "lora_B" and shape[0] != layer.out_features
        ):
            problem = (
                f"checkpoint {path} has {name} of shape {shape}, which does not fit the model's {module} "
                f"({layer.in_features} -> {layer.out_features})"
            )
        else:
            continue
        raise ConfigError(f"{problem}. Fix: use the base model the adapter was trained on (--model.model_name_or_path)")


def training_metadata(pl_module, datamodule, global_step: int) -> dict[str, Any]:
    """What `export --merge` and `predict` need to know about how the adapter was trained."""
    hp = pl_module.hparams
    return {
        "model_name_or_path": hp.model_name_or_path,
        "base": str(pl_module.base_path),  # what was loaded: for random_init, the random checkpoint
        "random_init": hp.random_init,
        "trust_remote_code": hp.trust_remote_code,
        "quantization": hp.quantization,
        "double_quant": hp.double_quant,
        "compute_dtype": str(pl_module.compute_dtype).removeprefix("torch."),
        "prompt": datamodule.prompt_format() if hasattr(datamodule, "prompt_format") else None,
        "objective": hp.objective,
        # what a preference objective compared against: the adapter it started from, or the base (None)
        "reference": hp.adapter if hp.objective in REFERENCED else None,
        "global_step": global_step,
    }


def chat_template(metadata: dict[str, Any]) -> str | None:
    """The chat template the run rendered its conversations with (None: a `turns` run, trained as written)."""
    return (metadata.get("prompt") or {}).get("chat_template_text")


def load_weights(peft_model: torch.nn.Module, path: str | Path) -> None:
    """Load an adapter directory's LoRA weights into a model already wrapped with the same LoRA config."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "adapter_model.safetensors"
    state = load_file(weights) if weights.is_file() else load_weights_only(path / "adapter_model.bin")
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ConfigError(
            f"adapter {path} lacks {len(missing)} LoRA weights the model has (e.g. {missing[0]}). "
            "Fix: use the model config the adapter was trained with"
        )


def save(
    peft_model,
    state: dict[str, torch.Tensor],
    out: Path,
    tokenizer,
    metadata: dict[str, Any],
) -> None:
    """Write the adapter, the tokenizer with the run's chat template, a generation config with EOS/pad, and our
    metadata, to `out`.

    The directory is built whole beside `out` and renamed into place, so a crash leaves the previous adapter.
    """
    from transformers import GenerationConfig

    with staged_directory(out) as staged:
        # the trained adapter only: a preference run's frozen reference is the adapter it started from
        peft_model.save_pretrained(staged, state_dict=state, selected_adapters=["default"])
        if tokenizer is not None:
            # A copy: the run's tokenizer keeps its own template. A `turns` run has none: it was trained on its markers.
            saved = copy.copy(tokenizer)
            saved.chat_template = chat_template(metadata)
            saved.save_pretrained(staged)
            eos, pad = special_ids(tokenizer)
            generation = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id)
            generation.save_pretrained(staged)
        (staged / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
