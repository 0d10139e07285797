"""Canaries: each reach into a library that `lightning_falcon.touch_points.TOUCH_POINTS` registers still exists and
still behaves as the code assumes, on the real library. A failure names the touch point that a new release moved.

The last test checks that the registry and the canaries agree. `docs/reference/touch-points.md` is generated
from the registry.
"""

import ast
import contextlib
import inspect
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, scalars
from torch import nn

from lightning_falcon import touch_points, upstream


@contextlib.contextmanager
def raises(expected: type[BaseException], touch_point: str):
    """`pytest.raises`, failing with the touch point that no longer holds; yields a list that gets the error."""
    caught = []
    try:
        yield caught
    except expected as e:
        caught.append(e)
        return
    except Exception as e:  # noqa: BLE001 (any other error is the change, named)
        pytest.fail(f"{touch_point}: raises {type(e).__name__} now, not {expected.__name__} ({e})")
    pytest.fail(f"{touch_point}: raises nothing now, not {expected.__name__}")


def quiet_trainer(root: Path, **kwargs):
    """A one-CPU Lightning trainer that writes nothing unless asked: the canaries' runs."""
    import lightning as L

    settings = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "enable_checkpointing": False, "limit_val_batches": 0, "default_root_dir": root,
    }  # fmt: skip
    return L.Trainer(**{**settings, **kwargs})


# ----------------------------------------------------------------- lightning
def test_lightning_cli_still_calls_parse_ckpt_path_which_the_cli_overrides():
    from lightning.pytorch.cli import LightningCLI

    from lightning_falcon.commands.cli import FalconCLI

    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__), "LightningCLI._parse_ckpt_path"
    assert FalconCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


def test_direct_logger_writes_land_on_the_steps_of_self_log(quick_fit):
    # train/grad_norm and train/tokens go through upstream.log_to_loggers (logged_step, logging_step); train/loss
    # through self.log.
    steps = {tag: [step for step, _ in values] for tag, values in scalars(quick_fit).items()}
    assert steps["train/grad_norm"] == steps["train/tokens"] == steps["train/loss"] == list(range(10)), (
        f"upstream.log_to_loggers, logged_step: written at {steps}"
    )


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


def test_jsonargparse_names_the_section_of_a_config_files_unknown_key(tmp_path):
    from jsonargparse import ActionConfigFile, ArgumentParser

    class Model:
        def __init__(self, lora_r: int = 8) -> None:
            self.lora_r = lora_r

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(Model, "model")
    (tmp_path / "config.yaml").write_text("model:\n  lora_rr: 3\n")
    with raises(Exception, "upstream.JSONARGPARSE_GROUP: an unknown key of a config file") as caught:
        parser.parse_args(["--config", str(tmp_path / "config.yaml")])
    found = re.search(upstream.JSONARGPARSE_GROUP, str(caught[0]))
    assert found and found.group(1) == "model", f"upstream.JSONARGPARSE_GROUP: jsonargparse now says {caught[0]}"
    assert any(re.search(pattern, str(caught[0])) for pattern in upstream.JSONARGPARSE_UNKNOWN_KEY), str(caught[0])


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


def test_rich_bar_sets_the_train_bar_to_the_batch_it_is_given():
    from lightning.pytorch.callbacks import RichProgressBar

    # ProgressBar.on_train_batch_end skips calls between redraws: the next call must set the bar, not advance it
    assert "self._update(self.train_progress_bar_id, batch_idx + 1)" in inspect.getsource(
        RichProgressBar.on_train_batch_end
    ), "ProgressBar.on_train_batch_end: RichProgressBar no longer sets its train bar to batch_idx + 1"
    assert "completed=current" in inspect.getsource(RichProgressBar._update), (
        "ProgressBar.on_train_batch_end: RichProgressBar's _update no longer sets the bar's position"
    )


# ----------------------------------------------------------------- lightning: signals, checkpoints, resume
def test_lightning_registers_signal_handlers_between_setup_and_on_train_start(tmp_path, monkeypatch):
    import signal

    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.demos.boring_classes import BoringModel

    slurm = {
        "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0", "SLURM_JOB_NAME": "canary", "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "1",
    }  # fmt: skip
    for key, value in slurm.items():  # a one-task Slurm job, so that Lightning picks its SLURMEnvironment
        monkeypatch.setenv(key, value)

    def before_fit(signum, frame):
        pass

    seen = {}

    class Probe(Callback):  # where SlurmRequeue acts, and what it finds there
        def __init__(self, requeue: bool) -> None:
            self.requeue = requeue

        def setup(self, trainer, pl_module, stage):
            seen["setup"] = signal.getsignal(signal.SIGTERM)
            upstream.cluster_environment(trainer).auto_requeue = self.requeue

        def on_train_start(self, trainer, pl_module):
            seen["train_start"] = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)

    previous = signal.signal(signal.SIGTERM, before_fit), signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        for requeue in (True, False):
            quiet_trainer(tmp_path, max_steps=1, callbacks=[Probe(requeue)]).fit(BoringModel())
            sigterm, sigusr1 = seen["train_start"]
            assert seen["setup"] is before_fit, (
                "SlurmRequeue.setup: Lightning now registers its signal handlers before callbacks' setup"
            )
            assert sigterm is not before_fit, (
                "SlurmRequeue.on_train_start: Lightning no longer installs its SIGTERM handler before on_train_start"
            )
            assert (sigusr1 is not signal.SIG_DFL) == requeue, (
                "SlurmRequeue.setup: auto_requeue turned off in setup no longer keeps Lightning's SIGUSR1 handler out"
            )
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGUSR1, previous[1])


def test_model_checkpoint_saves_when_its_batch_end_hook_is_called_directly(tmp_path):
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    saved_early = []

    class Early(Callback):  # SlurmRequeue's place: before ModelCheckpoint, at a step one is due
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                upstream.write_due_checkpoints(trainer, pl_module, outputs, batch, batch_idx)
                saved_early.append(sorted(path.name for path in tmp_path.glob("*.ckpt")))

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[checkpoint, Early()], enable_checkpointing=True)
    assert trainer.callbacks[-1] is checkpoint, (
        "upstream.write_due_checkpoints: Lightning no longer runs ModelCheckpoint after the other callbacks"
    )
    trainer.fit(BoringModel())
    assert saved_early == [["step=2.ckpt"]], (
        f"upstream.write_due_checkpoints: ModelCheckpoint's batch-end hook, called directly, saved {saved_early}"
    )


def test_model_checkpoint_keeps_a_last_model_path_set_from_outside(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(dirpath=tmp_path)
    callback.last_model_path = str(tmp_path / "last.ckpt")  # as preemption.save_last records its own save
    restored = ModelCheckpoint(dirpath=tmp_path)
    restored.load_state_dict(callback.state_dict())
    assert restored.last_model_path == str(tmp_path / "last.ckpt"), (
        "preemption.save_last: ModelCheckpoint no longer keeps last_model_path in its state"
    )


def test_lightning_builds_the_checkpoint_on_every_rank_callbacks_first(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    calls = []

    class Recorder(Callback):
        def state_dict(self):
            calls.append("callback.state_dict")
            return {}

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            calls.append("callback.on_save_checkpoint")

    class Module(BoringModel):
        def on_save_checkpoint(self, checkpoint):
            calls.append("module.on_save_checkpoint")

    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[Recorder()])
    trainer.fit(Module())
    calls.clear()
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    assert calls == ["callback.state_dict", "callback.on_save_checkpoint", "module.on_save_checkpoint"], (
        f"RNGState/TokenThroughput.state_dict, DiskSpaceCheck.on_save_checkpoint: Lightning's order is now {calls}"
    )
    calls.clear()
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    assert "callback.on_save_checkpoint" not in calls, "DiskSpaceCheck: Lightning now checks weights-only saves too"
    # Every rank builds the checkpoint: neither ModelCheckpoint nor the trainer asks for the rank before it is built.
    for source, call in (
        (inspect.getsource(ModelCheckpoint._save_checkpoint), "trainer.save_checkpoint("),
        (inspect.getsource(L.Trainer.save_checkpoint), "self._checkpoint_connector.dump_checkpoint("),
    ):
        assert call in source and "is_global_zero" not in source[: source.index(call)], (
            f"RNGState/TokenThroughput.state_dict, DiskSpaceCheck: Lightning no longer calls {call}) on every rank"
        )


def test_lightning_checkpoints_a_train_loaders_state_and_fetches_no_batch_ahead(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
    from torch.utils.data import DataLoader

    class CountingLoader(DataLoader):  # ResumableLoader's protocol
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.handed, self.restored = 0, None

        def __iter__(self):
            for batch in super().__iter__():
                self.handed += 1
                yield batch

        def state_dict(self):
            return {"handed": self.handed}

        def load_state_dict(self, state):
            self.restored = state

    class Module(BoringModel):
        def __init__(self) -> None:
            super().__init__()
            self.loader, self.handed_at_step = CountingLoader(RandomDataset(32, 64), batch_size=2), []

        def train_dataloader(self):
            return self.loader

        def training_step(self, batch, batch_idx):
            self.handed_at_step.append(self.loader.handed)
            return super().training_step(batch, batch_idx)

    first = Module()
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(first)
    assert first.handed_at_step == [1, 2, 3], (
        f"ResumableLoader.__iter__: Lightning fetched ahead of the step ({first.handed_at_step} batches handed out)"
    )
    trainer.save_checkpoint(tmp_path / "resume.ckpt")
    resumed = Module()
    quiet_trainer(tmp_path, max_steps=4).fit(resumed, ckpt_path=tmp_path / "resume.ckpt", weights_only=True)
    assert resumed.loader.restored == {"handed": 3}, (
        "ResumableLoader: Lightning no longer checkpoints a train loader's state_dict and restores it"
    )


# ----------------------------------------------------------------- lightning: the module, the CLI, the strategy
def test_a_module_without_a_trainer_still_raises_runtime_error():
    from lightning.pytorch.demos.boring_classes import BoringModel

    with raises(RuntimeError, "FalconQLoRA._strategy: LightningModule.trainer without a Trainer"):
        BoringModel().trainer  # noqa: B018 (the property raises)


def test_lightning_mixed_precision_leaves_unscaling_and_clipping_to_a_fused_adamw():
    from lightning.pytorch.plugins import MixedPrecision
    from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling

    fused = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], fused=True)
    assert _optimizer_handles_unscaling(fused), "step_policy.fused_adamw_fits: a fused AdamW no longer unscales itself"
    assert "_optimizer_handles_unscaling(optimizer)" in inspect.getsource(MixedPrecision.optimizer_step), (
        "step_policy.fused_adamw_fits: MixedPrecision no longer skips unscaling for such an optimizer"
    )
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with raises(RuntimeError, "step_policy.fused_adamw_fits: MixedPrecision clipping for a fused AdamW"):
        plugin.clip_gradients(fused, clip_val=1.0)


def boring_cli(root: Path, cli_class, args: list[str], **kwargs):
    """`cli_class` (a LightningCLI) on Lightning's BoringModel, writing nothing."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "default_root_dir": str(root),
    }  # fmt: skip
    return cli_class(BoringModel, args=args, trainer_defaults=defaults, save_config_callback=None, **kwargs)


def test_lightning_cli_reads_the_subcommand_arguments_after_its_before_hook(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    given = {}

    class CLI(LightningCLI):
        def before_validate(self):  # as FalconCLI.check_run settles ckpt_path
            self.config_init["validate"]["ckpt_path"] = "settled"

        def validate(self, model, ckpt_path=None, **kwargs):  # run in place of trainer.validate, with its arguments
            given["ckpt_path"] = ckpt_path

    boring_cli(tmp_path, CLI, ["validate"])
    assert given == {"ckpt_path": "settled"}, (
        f"FalconCLI.check_run: LightningCLI read the subcommand's arguments before its before_ hook ({given})"
    )


def test_lightning_cli_adds_the_default_callbacks_when_it_builds_the_trainer(tmp_path):
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.cli import LightningCLI

    cli = boring_cli(tmp_path, LightningCLI, [], run=False)
    added = Callback()
    cli.trainer_defaults["callbacks"] = [added]  # as FalconCLI.instantiate_trainer sets them, after parsing
    assert added in cli.instantiate_trainer().callbacks, (
        "FalconCLI.instantiate_trainer: LightningCLI no longer reads trainer_defaults['callbacks'] when it builds"
    )


def test_slurm_environment_meets_where_slurm_args_checks(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    monkeypatch.setenv("SLURM_NODELIST", "gpu-a[003-004]")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    first = SLURMEnvironment.resolve_root_node_address("gpu-a[003-004]")
    assert SLURMEnvironment().main_address == first == "gpu-a003", (
        "slurm_args.Allocation.from_env: Lightning no longer meets at the first node of the job"
    )
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    assert SLURMEnvironment().main_address == "10.1.2.3", "slurm_args.Allocation.from_env: MASTER_ADDR is not taken"


def test_lightning_writes_the_precision_into_the_deepspeed_config():
    from lightning.pytorch.plugins import DeepSpeedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_falcon.training.strategy import deepspeed_param_dtype

    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16), ("32-true", torch.float32)):
        strategy = DeepSpeedStrategy(stage=3, precision_plugin=DeepSpeedPrecision(precision))
        strategy._init_config_if_needed()
        assert deepspeed_param_dtype(strategy) == dtype, (
            f"strategy.deepspeed_param_dtype: Lightning's DeepSpeed config for {precision} is now {strategy.config}"
        )


def test_lightning_deepspeed_strategy_builds_its_engine_in_init_deepspeed():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert "self.init_deepspeed()" in inspect.getsource(DeepSpeedStrategy.setup), (
        "QLoRADeepSpeedStrategy.init_deepspeed: DeepSpeedStrategy.setup no longer builds the engine there"
    )
    assert "self.model = model" in inspect.getsource(DeepSpeedStrategy._initialize_deepspeed_train)
    strategy, engine = DeepSpeedStrategy(stage=2), nn.Linear(1, 1)
    strategy.model = engine
    assert strategy.deepspeed_engine is engine, "QLoRADeepSpeedStrategy.init_deepspeed: deepspeed_engine moved"


def test_lightning_keeps_a_strategys_class_and_arguments_where_the_settings_read_them():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert upstream.registered_strategy("deepspeed_stage_3") == (DeepSpeedStrategy, {"stage": 3}), (
        "upstream.registered_strategy: Lightning's StrategyRegistry entries changed"
    )
    assert upstream.registered_strategy("auto") is None
    assert DeepSpeedStrategy(exclude_frozen_parameters=True).exclude_frozen_parameters is True, (
        "StrategySettings.of: DeepSpeedStrategy no longer keeps exclude_frozen_parameters under that name"
    )


def test_a_lightning_deepspeed_checkpoint_is_a_directory_with_latest_and_a_checkpoint_tag():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert 'tag="checkpoint"' in inspect.getsource(DeepSpeedStrategy.save_checkpoint), (
        "runs.is_deepspeed_checkpoint: Lightning no longer names its DeepSpeed tag directory `checkpoint`"
    )
    assert inspect.signature(DeepSpeedEngine.save_checkpoint).parameters["save_latest"].default is True
    assert "'latest'" in inspect.getsource(DeepSpeedEngine.save_checkpoint), (
        "runs.is_deepspeed_checkpoint: DeepSpeed no longer writes a `latest` file"
    )


def test_jsonargparse_names_a_subcommand_parser_after_its_subcommand():
    from jsonargparse import ArgumentParser

    parser, fit = ArgumentParser(prog="program", exit_on_error=False), ArgumentParser(exit_on_error=False)
    parser.add_subcommands().add_subcommand("fit", fit)
    assert fit.prog.replace(" [options]", "") == "program fit", (
        f"cli.explain_parse_error: jsonargparse names the fit parser {fit.prog!r}"
    )


# ----------------------------------------------------------------- transformers
def test_falcon_attention_computes_with_the_kv_heads_plan_and_gguf_count():
    from transformers import AutoConfig
    from transformers.models.falcon.modeling_falcon import FalconAttention

    from lightning_falcon.architectures import FALCON
    from lightning_falcon.assets import resolve

    # the tiny model's config says 4 key/value heads beside multi_query, as a Falcon-7B config saved by transformers 5
    for name, heads, kv_heads in (
        ("asset:tiny-falcon", 4, 1),
        ("asset:falcon-7b", 71, 1),
        ("asset:falcon-40b", 128, 8),
        ("asset:falcon-180b", 232, 8),
        ("asset:falcon-11b", 32, 8),
    ):
        config = AutoConfig.from_pretrained(resolve(name))
        with torch.device("meta"):
            attention = FalconAttention(config, layer_idx=0)
        restated = FALCON.kv_heads(config)
        assert (attention.num_heads, attention.num_kv_heads, restated) == (heads, kv_heads, kv_heads), (
            f"architectures._falcon_kv_heads: FalconAttention of {name} has {attention.num_heads} heads and "
            f"{attention.num_kv_heads} key/value heads"
        )


def test_falcon_always_hands_its_attention_a_mask():
    from transformers import AutoModelForCausalLM

    from lightning_falcon.model.attention import attend

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, attn_implementation="sdpa")
    given = []

    def recording(query, key, value, attn_mask, is_causal):
        given.append((attn_mask, is_causal))
        return attend(query, key, value, attn_mask, is_causal)

    upstream.route_falcon_attention(model, recording)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        model(ids)
        model(ids, attention_mask=torch.ones_like(ids))
    assert given and all(mask is not None and mask.dtype == torch.bool and not causal for mask, causal in given), (
        "attention.gpu_kernel: Falcon now hands SDPA no mask (is_causal), which picks another CUDA kernel"
    )


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_falcon_takes_a_packed_batchs_mask_and_positions_as_given(backend):
    from transformers import AutoModelForCausalLM

    from lightning_falcon.data.batching import packed_attention_mask

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, attn_implementation=backend).eval()
    first, second = [5, 6, 7, 8, 9], [10, 11, 12]
    positions = torch.tensor([[*range(len(first)), *range(len(second))]])
    mask = packed_attention_mask(positions, backend, torch.float32)
    with torch.no_grad():
        packed = model(torch.tensor([first + second]), attention_mask=mask, position_ids=positions).logits[0]
        alone = torch.cat([model(torch.tensor([ids])).logits[0] for ids in (first, second)])
    assert torch.allclose(packed, alone, atol=1e-4), (
        f"batching.packed_attention_mask: Falcon ({backend}) no longer takes a packed batch's mask and positions as "
        f"given (largest difference {(packed - alone).abs().max():.2e})"
    )


def test_transformers_still_raises_oserror_for_a_missing_model(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    for load in (AutoConfig.from_pretrained, AutoTokenizer.from_pretrained):
        for name, kwargs in ((str(tmp_path / "missing"), {}), ("nobody/no-such-model", {"local_files_only": True})):
            where = "tokenizer.load_tokenizer, config.read_model_config, prefetch.check_offline, plan.model_config"
            with raises(OSError, f"{where}: {load.__qualname__}({name!r}, {kwargs})"):
                load(name, **kwargs)


def test_text_streamer_still_hands_its_text_to_on_finalized_text(tokenizer):
    from transformers import TextStreamer

    pieces = []

    class Collect(TextStreamer):  # chat.Streamer's override
        def on_finalized_text(self, text, stream_end=False):
            pieces.append((text, stream_end))

    ids = tokenizer("a fantasy village at night, lanterns glowing", add_special_tokens=False)["input_ids"]
    streamer = Collect(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.put(torch.tensor([ids[:2]]))  # as generate() puts the prompt, then each new token
    for token in ids[2:]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(text for text, _ in pieces) == tokenizer.decode(ids[2:]) and pieces[-1][1], (
        f"chat.Streamer.on_finalized_text: TextStreamer handed it {pieces}"
    )


def test_a_bitsandbytes_load_still_marks_the_model_as_kbit(tiny_nf4):
    from transformers.quantizers import quantizer_bnb_8bit

    assert upstream.loaded_in_kbit(tiny_nf4) and tiny_nf4.is_loaded_in_4bit, (
        "upstream.loaded_in_kbit: transformers no longer sets is_loaded_in_4bit on a 4-bit load"
    )
    assert '"is_loaded_in_8bit", True' in inspect.getsource(quantizer_bnb_8bit), (
        "upstream.loaded_in_kbit: transformers no longer sets is_loaded_in_8bit on an 8-bit load"
    )
    assert not upstream.loaded_in_kbit(falcon_skeleton())


def test_transformers_quantizer_still_forgets_a_models_quantization():
    from lightning_falcon.model.quantization import load_causal_lm

    model = load_causal_lm(TINY, "nf4", True, torch.float32, torch.device("cpu"))
    with raises(ValueError, "why upstream.forget_quantization exists: transformers casting a 4-bit model"):
        model.to(torch.float32)
    upstream.forget_quantization(model)
    assert "quantization_config" not in model.config.to_dict() and not model.is_quantized, (
        "upstream.forget_quantization: remove_quantization_config no longer leaves a plain model"
    )
    model.to(torch.float32)  # transformers lets it be cast now, as export's merge does


def test_memory_footprint_still_leaves_out_the_quantization_constants(tiny_nf4):
    from lightning_falcon.model.quantization import quantized_layers

    tensors = [*tiny_nf4.parameters(), *tiny_nf4.buffers()]
    constants = [
        c for layer in quantized_layers(tiny_nf4).values() for c in upstream.quantization_constants(layer.weight)
    ]
    assert constants and not {c.data_ptr() for c in constants} & {t.data_ptr() for t in tensors}
    assert tiny_nf4.get_memory_footprint() == sum(t.numel() * t.element_size() for t in tensors), (
        "lora.parameter_report: get_memory_footprint no longer counts parameters and buffers alone"
    )


def test_transformers_schedules_keep_their_multiplier_in_lr_lambdas():
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    for make in (
        lambda optimizer: get_constant_schedule_with_warmup(optimizer, 2),
        lambda optimizer: get_cosine_with_min_lr_schedule_with_warmup(optimizer, 2, 10, min_lr_rate=0.1),
    ):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer)
        factor = scheduler.lr_lambdas[0]
        # lr_factor shifts the warmup a step and holds the rate past the total: the formula it shifts
        assert (factor(0), factor(1), factor(2)) == (0.0, 0.5, 1.0), "step_policy.lr_factor: the warmup changed"
        for step in range(10):
            assert optimizer.param_groups[0]["lr"] == pytest.approx(factor(step)), (
                "step_policy.lr_factor: transformers' schedule no longer keeps its multiplier in lr_lambdas[0]"
            )
            optimizer.step()
            scheduler.step()


# ----------------------------------------------------------------- peft
class OneLinear(nn.Module):
    """A model of one linear layer, `proj`, for PEFT to adapt."""

    def __init__(self, layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = layer if layer is not None else nn.Linear(8, 6)

    def forward(self, x):
        return self.proj(x)


def with_lora(model: nn.Module):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))


def test_peft_saves_lora_weights_under_the_keys_the_checks_read(tmp_path):
    import json

    import peft.utils
    from safetensors import safe_open

    model = with_lora(OneLinear())
    model.save_pretrained(tmp_path)
    names = (peft.utils.CONFIG_NAME, peft.utils.SAFETENSORS_WEIGHTS_NAME, peft.utils.WEIGHTS_NAME)
    assert names == ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"), (
        f"adapter.read_saved_lora: PEFT's adapter files are now {names}"
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    read = {key: config.get(key) for key in ("r", "lora_alpha", "target_modules")}
    assert read == {"r": 2, "lora_alpha": 4, "target_modules": ["proj"]} and "base_model_name_or_path" in config, (
        f"adapter.read_saved_lora, export/run._base_of: adapter_config.json holds {config}"
    )
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        saved = {upstream.lora_weight_name(key) for key in f.keys()}  # noqa: SIM118 (safetensors handles are not dicts)
    in_memory = {upstream.lora_weight_name(name) for name, _ in model.named_parameters()} - {None}
    checkpointed = {
        upstream.lora_weight_name(f"model.{name}") for name, p in model.named_parameters() if p.requires_grad
    }
    assert saved == in_memory == checkpointed == {"proj.lora_A", "proj.lora_B"}, (
        f"upstream.lora_weight_name: PEFT's keys now read {saved}, {in_memory}, {checkpointed}"
    )


def test_peft_reports_the_lora_weights_a_state_dict_lacks():
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(with_lora(OneLinear()), {})
    assert len([key for key in result.missing_keys if "lora_" in key]) == 2, (
        "adapter.load_weights: set_peft_model_state_dict no longer names the LoRA weights it did not get"
    )


def test_peft_keeps_a_second_adapter_beside_the_first_under_its_own_name():
    from lightning_falcon.model.lora import REFERENCE, active_adapter, add_reference

    model = with_lora(OneLinear())
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight)
    add_reference(model)
    names = {name for name, _ in model.named_parameters()}
    assert {name.replace(".default.", f".{REFERENCE}.") for name in names if ".default." in name} <= names, (
        "lora.add_reference: PEFT no longer names a second adapter's weights as the first's, but for its name"
    )
    x = torch.randn(2, 8)
    trained = model(x)
    nn.init.zeros_(layer.lora_B["default"].weight)  # the trained adapter moves; the reference keeps the copy
    with active_adapter(model, REFERENCE):
        assert torch.equal(model(x), trained), "lora.active_adapter: set_adapter no longer switches the forward"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == sorted(
        n for n in names if ".default." in n and "lora_" in n
    ), "lora.active_adapter: set_adapter no longer leaves only the trained adapter trainable"
    assert model.peft_config[REFERENCE].inference_mode


def test_peft_merge_adds_get_delta_weight_to_the_base_weight():
    from peft.tuners.lora import LoraLayer

    model = with_lora(OneLinear())
    layer, adapter = model.base_model.model.proj, model.active_adapter
    nn.init.normal_(layer.lora_B[adapter].weight)  # B starts at zero: give the update a value
    assert isinstance(layer, LoraLayer)
    expected = layer.get_base_layer().weight.detach() + layer.get_delta_weight(adapter)
    assert torch.allclose(model.merge_and_unload().proj.weight, expected), (
        "export/merge.merge_into_dequantized: PEFT's merge no longer adds get_delta_weight to the base weight"
    )


def quantized_4bit(weight: torch.Tensor, double_quant: bool = True) -> nn.Module:
    """`weight` as a bitsandbytes nf4 layer on the CPU (quantized as it moves there), input gradients kept."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    kwargs = {"quant_type": "nf4", "compress_statistics": double_quant}
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, **kwargs)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **kwargs)
    layer = layer.to("cpu")
    upstream.keep_4bit_layout_trainable(layer)
    return layer


def test_peft_counts_4bit_weights_unpacked():
    layer = quantized_4bit(torch.randn(32, 64))
    lora = 2 * (64 + 32)
    assert layer.weight.numel() == 32 * 64 // 2  # packed: two values a byte
    assert with_lora(OneLinear(layer)).get_nb_trainable_parameters() == (lora, 32 * 64 + lora), (
        "lora.parameter_report: PEFT no longer counts a 4-bit weight as its unpacked values"
    )


def test_peft_kbit_preparation_upcasts_every_unquantized_parameter():
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    class KBit(nn.Module):  # a 4-bit model as transformers marks one
        is_loaded_in_4bit = True

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 64, dtype=torch.bfloat16)
            self.norm = nn.LayerNorm(64, dtype=torch.bfloat16)
            self.proj = quantized_4bit(torch.randn(64, 64))
            self.proj.bias = nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))

    model = prepare_model_for_kbit_training(KBit(), use_gradient_checkpointing=False)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if not isinstance(p, bnb.nn.Params4bit)}
    assert set(dtypes.values()) == {torch.float32}, f"memory.plan: prepare_model_for_kbit_training left {dtypes}"


# ----------------------------------------------------------------- bitsandbytes
@pytest.mark.parametrize("quantization, double_quant", [("nf4", True), ("nf4", False), ("int8", False)])
def test_bitsandbytes_keeps_a_weights_constants_beside_it_at_the_sizes_plan_counts(quantization, double_quant):
    import bitsandbytes as bnb

    from lightning_falcon.model.memory import quantized_layer_bytes

    out_features, in_features = 64, 1024  # 1024 blocks of 64: more than one block of 256 under double quantization
    weight = torch.randn(out_features, in_features)
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer = layer.to("cpu")
    else:
        layer = quantized_4bit(weight, double_quant)
    constants = upstream.quantization_constants(layer.weight)
    sizes = (layer.weight.numel() * layer.weight.element_size(), sum(t.numel() * t.element_size() for t in constants))
    planned = quantized_layer_bytes(out_features * in_features, out_features, quantization, double_quant)
    assert sizes == planned, (
        f"upstream.quantization_constants, memory.quantized_layer_bytes: bitsandbytes holds {sizes} bytes "
        f"(weights, constants) for {quantization}{' double' if double_quant else ''}, plan counts {planned}"
    )
    held = {t.data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    assert not {t.data_ptr() for t in constants} & held  # beside the weight: neither parameters nor buffers


def test_bitsandbytes_dequantizes_a_4bit_layer_to_what_it_computes_with():
    import bitsandbytes as bnb

    layer = quantized_4bit(torch.randn(64, 128))
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    inputs = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(layer(inputs), inputs @ weight.T, atol=1e-5), (
            "export/merge.dense_weight: dequantize_4bit no longer gives the weight a Linear4bit computes with"
        )


def test_bitsandbytes_int8_scales_move_to_the_layer_state_on_the_first_forward():
    import bitsandbytes as bnb

    dense = torch.randn(64, 128) * 0.1
    layer = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(dense.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    scales = layer.weight.SCB
    assert isinstance(scales, torch.Tensor) and layer.state.SCB is None, (
        "export/merge.dense_weight: an unused 8-bit layer's scales are no longer weight.SCB"
    )
    expanded = bnb.functional.int8_vectorwise_dequant(layer.weight.data, scales).float()
    step = float(scales.max()) / 127  # one quantization step of the widest row
    assert torch.allclose(expanded, dense, atol=step), "export/merge.dense_weight: int8_vectorwise_dequant changed"
    with torch.no_grad():
        layer(torch.randn(3, 128))
    assert layer.weight.SCB is None and torch.equal(layer.state.SCB, scales), (
        "export/merge.dense_weight: after a forward the 8-bit scales are no longer layer.state.SCB"
    )


# ----------------------------------------------------------------- torch
def test_torch_save_keeps_a_failed_writes_oserror_in_its_chain():
    import errno
    import io

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises((RuntimeError, OSError)) as caught:
        torch.save({"weights": torch.zeros(10_000)}, io.BufferedWriter(FullDisk()))
    chain, error = [], caught.value
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain), (
        f"checkpoint_io.write_failed_for_space: torch.save's error no longer carries the OSError: {chain}"
    )


def test_distributed_sampler_shares_an_epoch_as_the_sampler_restates_it():
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(10), num_replicas=3, rank=1, shuffle=True, seed=5)
    sampler.set_epoch(2)
    kept = (sampler.total_size, sampler.num_replicas, sampler.rank, sampler.epoch, sampler.seed)
    assert kept == (12, 3, 1, 2, 5), f"sampler.ResumableSampler._order: DistributedSampler keeps {kept}"
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 2)).tolist()
    assert list(sampler) == (order * 2)[:12][1:12:3], (
        "sampler.ResumableSampler._order: DistributedSampler no longer shares an epoch as it restates"
    )


def test_sdpa_params_still_take_the_arguments_the_flash_check_gives():
    from torch.backends import cuda

    query, key = torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 8, 8)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    params = cuda.SDPAParams(query, key, key, mask, 0.0, True, True)
    tensors = (params.query, params.key, params.value, params.attn_mask)
    flags = (params.dropout, params.is_causal, params.enable_gqa)
    assert all(a is b for a, b in zip(tensors, (query, key, key, mask), strict=True)) and flags == (0.0, True, True), (
        "upstream.cuda_flash_takes: SDPAParams' arguments changed"
    )
    assert upstream.cuda_flash_takes(query, key, key, mask, False, enable_gqa=True) is False  # CPU: not CUDA's kernel


def test_cpu_flash_attention_takes_grouped_heads_with_a_mask():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query, key, value = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            grouped = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    except RuntimeError as e:
        pytest.fail(f"attention.gqa_is_fused: the CPU flash kernel refuses grouped heads with a mask ({e})")
    expanded = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask
    )
    assert torch.allclose(grouped, expanded, atol=1e-5)
    with warnings.catch_warnings(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        warnings.simplefilter("ignore")  # torch says why the kernel declines before it raises
        with raises(RuntimeError, "attention.gqa_is_fused: the CPU flash kernel with dropout"):
            F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True, dropout_p=0.5)


# ----------------------------------------------------------------- datasets
def test_datasets_holds_out_the_rows_the_datamodule_counts():
    import datasets

    for rows in (7, 11, 25):
        split = datasets.Dataset.from_dict({"row": list(range(rows))}).train_test_split(test_size=0.1, seed=0)
        assert len(split["test"]) == math.ceil(rows * 0.1), (
            f"PromptDataModule._prepare: train_test_split holds out {len(split['test'])} of {rows} rows at 0.1"
        )


# ----------------------------------------------------------------- gguf and tokenizers
def test_gguf_low_level_writer_streams_a_file_that_reads_back(tmp_path):
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

    Q = gguf.GGMLQuantizationType
    weight, norm = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), np.ones(4, dtype=np.float32)
    packed = quantize(weight, Q.Q8_0)
    assert packed.shape == quant_shape_to_byte_shape(weight.shape, Q.Q8_0), (
        "export/gguf._encoded: gguf's q8_0 bytes no longer have the shape the header announces"
    )
    writer = gguf.GGUFWriter(str(tmp_path / "canary.gguf"), arch="falcon")
    writer.add_block_count(1)
    writer.add_tensor_info("blk.0.ffn_up.weight", packed.shape, np.dtype(np.uint8), packed.nbytes, raw_dtype=Q.Q8_0)
    writer.add_tensor_info("output_norm.weight", norm.shape, np.dtype(np.float32), norm.nbytes)
    writer.add_tensor_info("token_embd.weight", weight.shape, np.dtype(np.float16), weight.size * 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in (packed, norm, weight.astype(np.float16)):
        writer.write_tensor_data(data)
    writer.close()
    read = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "canary.gguf")).tensors}
    types = {name: t.tensor_type for name, t in read.items()}
    assert types == {"blk.0.ffn_up.weight": Q.Q8_0, "output_norm.weight": Q.F32, "token_embd.weight": Q.F16}, (
        f"export/gguf.write: gguf's low-level writer wrote {types}"
    )
    up = read["blk.0.ffn_up.weight"]
    assert np.allclose(dequantize(up.data, up.tensor_type).reshape(weight.shape), weight, atol=1 / 127)
    assert np.array_equal(read["output_norm.weight"].data, norm)
    assert np.array_equal(read["token_embd.weight"].data.reshape(weight.shape), weight.astype(np.float16))


# The tensor names export/gguf.py:tensors writes, as gguf spells the templates.
GGUF_FALCON_NAMES = {
    "token_embd", "blk.{bid}.attn_norm", "blk.{bid}.attn_norm_2", "blk.{bid}.attn_qkv", "blk.{bid}.attn_output",
    "blk.{bid}.ffn_up", "blk.{bid}.ffn_down", "output_norm", "output",
}  # fmt: skip


def test_gguf_still_names_falcons_tensors_as_the_writer_does():
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    theirs = {TENSOR_NAMES[tensor] for tensor in MODEL_TENSORS[MODEL_ARCH.FALCON]}
    assert theirs >= GGUF_FALCON_NAMES, (
        f"export/gguf_falcon.tensors: llama.cpp's Falcon no longer has {sorted(GGUF_FALCON_NAMES - theirs)}"
    )


def test_tokenizers_serializes_a_bpe_tokenizer_as_the_gguf_writer_reads_it():
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(  # Falcon's
        [
            pre_tokenizers.Punctuation(),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), "isolated"),
        ]
    )
    definition = json.loads(tokenizer.to_str())
    model, pre = definition["model"], definition["pre_tokenizer"]
    assert model["type"] == "BPE" and model["merges"] in ([["a", "b"]], ["a b"]), f"export/gguf.write: {model}"
    kinds = [step["type"] for step in pre.get("pretokenizers", [])]
    byte_level = pre.get("pretokenizers", [{}, {}])[1]
    assert pre["type"] == "Sequence" and kinds == ["Punctuation", "ByteLevel", "Digits", "Split"], (
        f"export/gguf.pre_tokenizer: a Sequence pre-tokenizer now serializes as {pre}"
    )
    assert byte_level.get("use_regex") is True and byte_level.get("add_prefix_space") is False, (
        f"export/gguf.pre_tokenizer: ByteLevel now serializes as {byte_level}"
    )


# ----------------------------------------------------------------- the console's silenced notices
# The release that began to emit a silenced text: an older one (down to the floors CI installs) has nothing to silence.
EMITTED_SINCE = {
    r"`is_gradient_checkpointing` is deprecated": ("transformers", "5.23"),
    r"`gradient_checkpointing_enable` is deprecated": ("transformers", "5.23"),
    "💡 Tip:": ("lightning", "2.6.1"),
}


def emitted_since(text: str) -> bool:
    """Whether the installed library is one that emits `text` (always, for a text with no entry)."""
    from importlib.metadata import version

    from packaging.version import Version

    package, first = EMITTED_SINCE.get(text, (None, None))
    return package is None or Version(version(package)) >= Version(first)


def test_the_console_still_silences_texts_the_libraries_emit(caplog):
    import importlib
    import logging

    from bitsandbytes.backends.cpu import ops
    from lightning.pytorch.trainer.connectors.logger_connector import logger_connector

    from lightning_falcon.commands import console

    emitters = [
        "transformers.modeling_utils", "torch.utils._pytree", logger_connector.__name__, ops.__name__,
    ]  # fmt: skip
    sources = [inspect.getsource(importlib.import_module(name)) for name in emitters]
    for _, message in console.WARNINGS:
        if emitted_since(message):
            assert any(re.search(message, source) for source in sources), f"console.WARNINGS: none emits {message!r}"
    for _, start in console.RECORDS:
        if emitted_since(start):
            assert any(start in source for source in sources), f"console.RECORDS: none emits {start!r}"
    loggers = {ops.logger.name}
    if emitted_since("💡 Tip:"):
        with caplog.at_level(logging.INFO):
            logger_connector.rank_zero_info("the console's canary")  # as Lightning logs its advertisement
        loggers |= {record.name for record in caplog.records if record.getMessage() == "the console's canary"}
    expected = {name for name, start in console.RECORDS if emitted_since(start)}
    assert loggers == expected, f"console.RECORDS: the notices now go to {loggers}"


# ----------------------------------------------------------------- the registry
def defines(path: Path, symbol: str) -> bool:
    """Whether module `path` defines `symbol`: a top-level function, class or name, or `Class.member`."""
    scope = ast.parse(path.read_text(encoding="utf-8")).body
    for name in symbol.split("."):
        found = next((node for node in scope if name in defined_names(node)), None)
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {target.id for target in node.targets if isinstance(target, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


LIBRARIES = {
    "lightning", "transformers", "peft", "bitsandbytes", "deepspeed", "torch", "datasets", "jsonargparse", "gguf",
    "tokenizers",
}  # fmt: skip


def test_lightning_still_makes_its_default_logger_as_default_logger_does(tmp_path, monkeypatch):
    import lightning as L

    for job in (None, "77"):
        if job is None:
            monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        else:
            monkeypatch.setenv("SLURM_JOB_ID", job)
        theirs = L.Trainer(logger=True, default_root_dir=tmp_path, accelerator="cpu").logger
        ours = upstream.default_logger(str(tmp_path))
        assert type(theirs) is type(ours), "upstream.default_logger: Lightning's default logger class changed"
        assert (theirs.root_dir, theirs.version) == (ours.root_dir, ours.version), "upstream.default_logger"


def test_a_lightning_logger_writes_nothing_until_it_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    (tmp_path / "runs" / "tiny" / "version_0").mkdir(parents=True)
    for cls in (TensorBoardLogger, CSVLogger):
        logger = cls(save_dir=str(tmp_path / "runs"), name="tiny")
        assert Path(logger.log_dir) == tmp_path / "runs" / "tiny" / "version_1", "cli.configured_logger: log_dir"
        assert Path(logger.root_dir) == tmp_path / "runs" / "tiny", "cli.configured_logger: root_dir"
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["version_0"], (
        "cli.configured_logger: a logger made to read its paths wrote to the disk"
    )


def test_the_registry_names_existing_canaries_and_code():
    tests = {node.name for node in ast.parse(Path(__file__).read_text()).body if isinstance(node, ast.FunctionDef)}
    tests = {name for name in tests if name.startswith("test_")}
    named = {point.canary for point in touch_points.TOUCH_POINTS}
    assert not named - tests, f"the registry names canaries this file lacks: {sorted(named - tests)}"
    unnamed = tests - named - {"test_the_registry_names_existing_canaries_and_code"}
    assert not unnamed, f"canaries no touch point names: {sorted(unnamed)}"
    for point in touch_points.TOUCH_POINTS:
        assert point.library in LIBRARIES and point.what and point.why, point
        assert re.fullmatch(r"lightning_falcon/[\w/]+\.py:[\w.]+", point.where), f"where is path.py:symbol: {point}"
        path, symbol = point.where.split(":")
        assert (REPO / path).is_file(), f"{point.where}: no such file"
        assert defines(REPO / path, symbol), f"{point.where}: {path} defines no {symbol}"
