"""Canaries: each library internal lightning_falcon leans on (lightning_falcon/upstream.py, the README's
"Library touch points") still exists and still behaves as the code assumes. A failure names the touch point
that a new release of lightning, transformers, bitsandbytes, deepspeed, datasets, torch or jsonargparse moved.
"""

import inspect
import re

import pytest
import torch
from helpers import TINY, scalars
from torch import nn

from lightning_falcon import upstream


# ----------------------------------------------------------------- lightning
def test_lightning_cli_still_calls_parse_ckpt_path_which_the_cli_overrides():
    from lightning.pytorch.cli import LightningCLI

    from lightning_falcon.commands.cli import FalconCLI

    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__), "LightningCLI._parse_ckpt_path"
    assert FalconCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


def test_direct_logger_writes_land_on_the_steps_of_self_log(quick_fit):
    # train/lr goes through upstream.log_to_loggers (logged_step, logging_step); train/loss through self.log.
    s = scalars(quick_fit)
    assert [step for step, _ in s["train/lr"]] == [step for step, _ in s["train/loss"]] == list(range(10))


def test_trainer_keeps_the_logging_decision_and_the_stepped_batch_count():
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, log_every_n_steps=1)
    assert isinstance(trainer._logger_connector.should_update_logs, bool), "_logger_connector.should_update_logs"
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 0, "fit_loop.epoch_loop._batches_that_stepped"


def test_model_checkpoint_records_its_last_completed_save(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, logger=False, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert upstream.last_saved_step(callback) == 4, "ModelCheckpoint._last_global_step_saved"
    last = upstream.last_saved_path(callback)
    assert last.endswith("step=4.ckpt") and (tmp_path / last.rsplit("/", 1)[-1]).is_file(), (
        "ModelCheckpoint._last_checkpoint_saved"
    )


def test_a_single_device_trainer_keeps_its_cluster_environment_where_lightnings_sigusr1_handler_reads_it():
    import lightning as L
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert getattr(trainer.strategy, "cluster_environment", None) is None  # why the fallback exists
    assert upstream.cluster_environment(trainer) is trainer._accelerator_connector.cluster_environment
    source = inspect.getsource(_SignalConnector.register_signal_handlers)
    assert "_accelerator_connector.cluster_environment" in source and "auto_requeue" in source, (
        "Lightning's SIGUSR1 handler no longer reads auto_requeue from the accelerator connector"
    )


def test_lightning_deepspeed_strategy_still_has_init_config_if_needed():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert callable(getattr(DeepSpeedStrategy, "_init_config_if_needed", None)), "_init_config_if_needed"


@pytest.mark.parametrize(
    "init",
    [
        {"stage": 2},
        {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
        {"stage": 3, "offload_optimizer": True, "offload_optimizer_device": "nvme", "nvme_path": "/tmp"},
        {"config": {"zero_optimization": {"stage": 1}}},
    ],
    ids=["stage2", "stage3-offload", "stage3-nvme", "own-config"],
)
def test_lightning_deepspeed_strategy_still_builds_its_config_as_plan_reads_it(init):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_falcon.upstream import deepspeed_strategy_config, init_defaults

    built = DeepSpeedStrategy(**init).config["zero_optimization"]
    read = deepspeed_strategy_config(DeepSpeedStrategy, {**init_defaults(DeepSpeedStrategy), **init})
    read = read["zero_optimization"]
    assert read["stage"] == built["stage"], "DeepSpeedStrategy.__init__: the ZeRO stage"
    for key in ("offload_optimizer", "offload_param"):
        device = built.get(key, {}).get("device", "none")
        assert read.get(key, {}).get("device", "none") == device, f"DeepSpeedStrategy.__init__: {key}"


def test_lightning_trainer_errors_about_the_machine_still_read_as_such():
    import lightning as L
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises((MisconfigurationException, ValueError)) as e:
        L.Trainer(accelerator="mps", devices=1)  # Apple's GPU, absent on Linux (with or without CUDA)
    assert re.search(upstream.LIGHTNING_MACHINE_ERROR, str(e.value), re.IGNORECASE), str(e.value)


# ----------------------------------------------------------------- jsonargparse
def test_jsonargparse_error_texts_and_parser_actions():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model.lora_r", type=int, default=8)
    assert "model.lora_r" in upstream.parser_keys(parser), "argparse's parser._actions"
    with pytest.raises(Exception) as unknown:
        parser.parse_args(["--model.lora_rr", "3"])
    assert any(re.search(p, str(unknown.value)) for p in upstream.JSONARGPARSE_UNKNOWN_KEY), str(unknown.value)
    with pytest.raises(Exception) as bad:
        parser.parse_args(["--model.lora_r", "many"])
    found = re.match(upstream.JSONARGPARSE_BAD_VALUE, str(bad.value), re.DOTALL)
    assert found and found.group(1) == "model.lora_r", str(bad.value)


def test_jsonargparse_error_hook_still_takes_the_error_and_marks_subcommand_errors():
    from jsonargparse import ArgumentParser

    assert list(inspect.signature(ArgumentParser.error).parameters) == ["self", "message", "ex"], (
        "jsonargparse's ArgumentParser.error(message, ex) changed: FalconArgumentParser.error overrides it"
    )
    source = inspect.getsource(ArgumentParser.error)
    assert "exit_on_error" in source and "subcommand_parser" in source, "jsonargparse's error() contract changed"
    assert "ex.subcommand_parser = " in inspect.getsource(ArgumentParser), "errors no longer carry subcommand_parser"
    parser = ArgumentParser(exit_on_error=False)
    assert upstream.jsonargparse_recovers(parser) and upstream.failing_parser(parser, ValueError()) is parser


# ----------------------------------------------------------------- transformers
def falcon_skeleton():
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_falcon.assets import resolve

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(TINY)))


def test_falcon_builds_its_projections_from_the_module_global_that_is_swapped():
    from transformers.models.falcon import modeling_falcon

    assert issubclass(modeling_falcon.FalconLinear, nn.Linear) and modeling_falcon.FalconLinear is not nn.Linear
    plain = {type(m) for n, m in falcon_skeleton().named_modules() if n.endswith("query_key_value")}
    assert plain == {modeling_falcon.FalconLinear}, "Falcon no longer builds FalconLinear: is the swap still needed?"
    with upstream.falcon_linear_as_nn_linear():
        swapped = {type(m) for n, m in falcon_skeleton().named_modules() if n.endswith("query_key_value")}
    assert swapped == {nn.Linear}, "modeling_falcon.FalconLinear is no longer what Falcon's layers are built from"
    assert modeling_falcon.FalconLinear is not nn.Linear  # put back


def test_a_model_config_names_the_attention_backend_transformers_resolved():
    backend = upstream.attn_implementation(falcon_skeleton().config)
    assert backend in ("sdpa", "eager", "flash_attention_2"), f"config._attn_implementation is {backend!r}"


# The source of transformers 5.24's FalconAttention and rotary, which upstream._falcon_attention_forward restates.
FALCON_ATTENTION_SHA256 = "64c34ee6edcc1ac3"


def test_falcon_attention_is_the_one_the_fused_forward_restates():
    import hashlib

    from transformers.models.falcon import modeling_falcon

    source = inspect.getsource(modeling_falcon.FalconAttention)
    restated = (modeling_falcon.FalconAttention, modeling_falcon.apply_rotary_pos_emb, modeling_falcon.rotate_half)
    digest = hashlib.sha256("".join(inspect.getsource(x) for x in restated).encode()).hexdigest()[:16]
    assert digest == FALCON_ATTENTION_SHA256, (
        "transformers changed FalconAttention or its rotary: check upstream._falcon_attention_forward against it "
        "(tests/test_attention.py compares the two), then record the new digest here"
    )
    assert "scaled_dot_product_attention(" in source and "ALL_ATTENTION_FUNCTIONS" not in source, (
        "FalconAttention now goes through transformers' attention interface: use that instead of the forward"
    )
    layer = modeling_falcon.FalconDecoderLayer(falcon_skeleton().config, layer_idx=0)
    assert type(layer.self_attention) is modeling_falcon.FalconAttention, "Falcon's SDPA layers changed class"


def test_the_fused_forward_takes_the_place_of_falcon_attentions_own_on_each_layer():
    from lightning_falcon.model.attention import attend

    model = falcon_skeleton()
    layers = [m for m in model.modules() if type(m).__name__ == "FalconAttention"]
    assert upstream.route_falcon_attention(model, attend) == len(layers) > 0
    assert all(m.forward.func is upstream._falcon_attention_forward for m in layers)


def test_transformers_can_still_forget_a_deepspeed_config():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    upstream.forget_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()


# ----------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_still_reads_the_cpu_repack_switch_the_loader_turns_off():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
    assert hasattr(layer, "support_avx512bf16_for_cpu"), "bnb.nn.Linear4bit.support_avx512bf16_for_cpu is gone"
    assert "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    upstream.keep_4bit_layout_trainable(nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is False


# ----------------------------------------------------------------- deepspeed
def test_deepspeed_checkpoints_the_module_state_through_module_state_dict():
    from deepspeed.runtime.engine import DeepSpeedEngine

    parameters = inspect.signature(DeepSpeedEngine.module_state_dict).parameters
    assert "exclude_frozen_parameters" in parameters, "DeepSpeedEngine.module_state_dict changed its signature"
    assert "self.module_state_dict(" in inspect.getsource(DeepSpeedEngine._save_checkpoint), (
        "DeepSpeedEngine._save_checkpoint no longer calls the module_state_dict that is wrapped"
    )

    class Engine:  # the wrap itself, on an engine-shaped object
        module = nn.Linear(2, 2)

        def module_state_dict(self, **kwargs):
            return {"weight": 1, "bias": 2, "weight.absmax": 3}

    engine = Engine()
    engine.module.bias.requires_grad_(False)
    upstream.keep_only_trainable_in_checkpoints(engine)
    assert engine.module_state_dict(exclude_frozen_parameters=True) == {"weight": 1}


# ----------------------------------------------------------------- datasets and torch error texts
def test_datasets_still_words_a_header_only_csv_as_no_data(tmp_path):
    import datasets

    (tmp_path / "empty.csv").write_text("prompt,response\n")
    with pytest.raises(Exception) as e:
        datasets.load_dataset("csv", data_files=str(tmp_path / "empty.csv"), split="train")
    assert upstream.DATASETS_NO_ROWS in str(e.value), str(e.value)


def test_torch_still_names_the_global_a_weights_only_load_refuses(tmp_path):
    import argparse
    import pickle

    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "objects.ckpt")
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(tmp_path / "objects.ckpt", weights_only=True)
    found = re.search(upstream.TORCH_REFUSED_GLOBAL, str(e.value))
    assert found and found.group(1) == "argparse.Namespace", str(e.value)[:500]


def test_lightnings_rich_bar_still_describes_the_train_bar_with_get_train_description():
    import inspect

    from lightning.pytorch.callbacks import RichProgressBar

    # training/progress.py overrides it to say "Epoch N of a MAX-step run" where Lightning says "Epoch N/-2"
    assert list(inspect.signature(RichProgressBar._get_train_description).parameters) == ["self", "current_epoch"]
    assert "self._get_train_description(" in inspect.getsource(RichProgressBar.on_train_epoch_start)
