"""The architecture table's claims against each family's real config.json, built on the meta device (no weights).

What each row says (LoRA targets, layers kept out of quantization or LoRA, KV heads, template, GGUF) is what
docs/reference/models.md tells users; these tests hold the two together. The whole path per family is
tests/test_families.py.
"""

import os
import sys

import pytest
import torch
from helpers import REPO, cli_error
from processes import run_process
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_falcon.architectures import ARCHITECTURES, architecture
from lightning_falcon.assets import resolve
from lightning_falcon.commands.plan import SHIPPED_CONFIGS
from lightning_falcon.data.chat_templates import NAMED
from lightning_falcon.errors import ConfigError
from lightning_falcon.model.lora import check_target_modules, linear_module_names

# shipped config -> (model_type, query heads, KV heads the attention computes with, head width, tied output)
REAL = {
    "falcon-7b": ("falcon", 71, 1, 64, True),
    "falcon-40b": ("falcon", 128, 8, 64, True),
    "falcon-180b": ("falcon", 232, 8, 64, True),
    "falcon-11b": ("falcon", 32, 8, 128, False),
    "falcon3-7b": ("llama", 12, 4, 256, False),
    "falcon-h1-0.5b": ("falcon_h1", 8, 2, 64, False),
    "falcon-h1-7b": ("falcon_h1", 12, 2, 128, False),
}


def skeleton(name: str):
    config = AutoConfig.from_pretrained(resolve(f"asset:{name}"))
    family = architecture(config)
    with family.build(), torch.device("meta"):
        return config, family, AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", list(REAL))
def test_each_shipped_config_has_its_familys_layers_heads_and_output(name):
    model_type, heads, kv_heads, head_dim, tied = REAL[name]
    config, family, model = skeleton(name)
    assert family.model_type == model_type == config.model_type
    assert (config.num_attention_heads, family.kv_heads(config), family.head_dim(config)) == (heads, kv_heads, head_dim)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    linear = linear_module_names(model)
    assert set(family.lora_targets) <= set(linear)  # every default target exists
    assert not set(family.lora_targets) & set(family.not_lora)
    assert set(family.keep_unquantized) <= set(linear)
    # Every linear layer of a block either adapts by default, or is one the kernels bypass
    assert set(linear) - {"lm_head"} == set(family.lora_targets) | (set(family.not_lora) & set(linear))


@pytest.mark.parametrize("family", ARCHITECTURES.values(), ids=list(ARCHITECTURES))
def test_each_familys_default_template_is_a_named_one(family):
    assert family.chat_template in NAMED


def test_an_unknown_architecture_is_refused_naming_the_supported_ones():
    with pytest.raises(ConfigError) as error:
        architecture(AutoConfig.for_model("gpt2"))
    message = str(error.value)
    assert "model_type 'gpt2' is not a supported architecture" in message and "\n" not in message
    assert all(model_type in message for model_type in ARCHITECTURES) and "Fix:" in message


def test_lora_on_a_layer_the_mamba_kernels_bypass_is_refused_with_the_safe_targets():
    _, family, model = skeleton("falcon-h1-0.5b")
    with pytest.raises(ConfigError) as error:
        check_target_modules(linear_module_names(model), ["in_proj", "out_proj", "conv1d"], family)
    message = str(error.value)
    assert "model.target_modules ['out_proj', 'conv1d']" in message and "silently not train" in message
    assert "not found" not in message  # conv1d is not linear, but the reason that matters is the kernels


def test_fit_refuses_an_unsupported_architecture_before_loading(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2).save_pretrained(model)
    err = cli_error(
        tmp_path, "fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--model.model_name_or_path", str(model),
        "--data.tokenizer", resolve("asset:tiny-falcon"),
    )  # fmt: skip
    assert "model_type 'gpt2' is not a supported architecture" in err


def test_packed_batches_are_refused_for_falcon_h1_by_fit_and_plan(tmp_path):
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--model.model_name_or_path", "asset:tiny-falcon-h1"]
    args += ["--data.batching", "packed"]
    for subcommand in ("fit", "plan"):
        err = cli_error(tmp_path, subcommand, *args)
        assert "data.batching packed: Falcon-H1" in err and "Mamba state" in err and "--data.batching padded" in err


def test_zero3_is_refused_for_falcon_h1_whose_kernels_read_weights_directly(tmp_path):
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--model.model_name_or_path", "asset:tiny-falcon-h1"]
    args += ["--config", str(REPO / "configs" / "strategy" / "deepspeed-zero3.yaml")]
    err = cli_error(tmp_path, "plan", *args)
    assert "DeepSpeed ZeRO-3: Falcon-H1" in err and "empty partition" in err and "deepspeed-zero2.yaml" in err


@pytest.mark.parametrize("hub_id", sorted({asset: hub_id for hub_id, asset in SHIPPED_CONFIGS.items()}.values()))
def test_each_shipped_config_plans_offline_from_its_hub_id(tmp_path, hub_id):
    proc = run_process(
        [sys.executable, "-m", "lightning_falcon", "plan", "--config", str(REPO / "configs" / "tiny.yaml"),
         "--model.model_name_or_path", hub_id, "--model.compute_dtype", "bf16", "--trainer.precision", "bf16-mixed"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{hub_id} (architecture from the shipped asset:" in proc.stdout and "verdict" in proc.stdout
