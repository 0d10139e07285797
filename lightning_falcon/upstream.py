"""The reaches into libraries' internals or undocumented behaviour that are expressions, as functions the rest of
the package calls. `lightning_falcon/touch_points.py` registers every reach, these and the rest, each with its canary.

Where the reach is an expression it lives here, as a function the rest of the package calls. Where it is a method
of our subclass of a library class (`FalconCLI._parse_ckpt_path`, `ProgressBar._get_train_description`, ...) or
an order of hooks a callback relies on, it stays with that code, and the registry names it there.

This module imports only libraries, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ----------------------------------------------------------------- error texts matched by a regex
# No library gives these as data; the messages are read so that the user gets one line with a fix.
# jsonargparse: an unknown key, as its parser or argparse words it.
JSONARGPARSE_UNKNOWN_KEY = (r"does not accept option '([^']+)'", r"unrecognized arguments: (\S+)")
# jsonargparse: the section a config file's unknown key sits in (its message names the key without it).
JSONARGPARSE_GROUP = r"Group '([^']+)' does not accept"
# jsonargparse: a value that does not fit its key's type.
JSONARGPARSE_BAD_VALUE = r'Parser key "([^"]+)":\s*(.*)'
# Lightning's MisconfigurationException/ValueError texts that are about the machine, not the setting.
LIGHTNING_MACHINE_ERROR = r"accelerator|strateg|device|gpu|cuda|backend"
# datasets: a CSV (or other file) with a header and no rows.
DATASETS_NO_ROWS = "corresponds to no data"
# torch.load(weights_only=True): the global it refused to unpickle.
TORCH_REFUSED_GLOBAL = r"Unsupported global: GLOBAL (\S+)"


# ----------------------------------------------------------------- lightning
def logging_step(trainer) -> bool:
    """Whether Lightning writes this step's logs (every `trainer.log_every_n_steps`).

    Train scalars are computed only on those steps, as `self.log` costs about a millisecond a call
    whether or not the step is written. Lightning keeps the decision private; its own
    LearningRateMonitor asks it the same way.
    """
    return trainer._logger_connector.should_update_logs


def logged_step(trainer) -> int:
    """The step Lightning's `self.log` writes metrics at (optimizer steps taken, not `global_step`)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_to_loggers(trainer, metrics: dict[str, float]) -> None:
    """Write step scalars straight to the loggers (rank 0), at the step Lightning's `self.log` would use.

    For values neither shown in the progress bar nor averaged over an epoch: `self.log` spends most of
    its time moving its result collection between devices. Lightning's LearningRateMonitor and
    ThroughputMonitor log the same way.
    """
    step = logged_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def last_saved_step(callback) -> int:
    """The global step of ModelCheckpoint's last completed save (-1 before any)."""
    return callback._last_global_step_saved


def last_saved_path(callback) -> str:
    """The file of ModelCheckpoint's last completed save ("" before any).

    The public `last_model_path` names `last.ckpt` before that file is written, so it cannot say
    whether a good copy exists.
    """
    return callback._last_checkpoint_saved


def cluster_environment(trainer):
    """The trainer's cluster environment (a SLURMEnvironment under Slurm).

    Parallel strategies expose it publicly; a single-device strategy has none, and Lightning's own
    SIGUSR1 handler reads it from the accelerator connector, so that is where `auto_requeue` must be off.
    """
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return environment if environment is not None else trainer._accelerator_connector.cluster_environment


def write_due_checkpoints(trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
    """Have each ModelCheckpoint write now the periodic checkpoint due at this step, if any.

    ModelCheckpoint decides and saves in its `on_train_batch_end`, which Lightning runs after every other
    callback's, and it has no public "save what is due": its hook, called early, saves what its own call would.
    """
    for callback in trainer.checkpoint_callbacks:
        callback.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def default_logger(default_root_dir: str):
    """The logger Lightning's Trainer makes for `logger: true`: TensorBoard under `default_root_dir`, the version
    pinned to the Slurm job's id inside a job. Lightning makes it in its logger connector and exposes no factory."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return TensorBoardLogger(save_dir=default_root_dir, version=SLURMEnvironment.job_id())


def registered_strategy(name: str) -> tuple[type, dict[str, Any]] | None:
    """The class and arguments Lightning's `StrategyRegistry` holds under `name` (`deepspeed_stage_3`), or None."""
    from lightning.pytorch.strategies import StrategyRegistry

    if name not in StrategyRegistry:
        return None
    entry = StrategyRegistry[name]
    return entry["strategy"], dict(entry["init_params"])


# ----------------------------------------------------------------- jsonargparse / argparse
def parser_keys(parser) -> list[str]:
    """Every key a parser accepts (for "did you mean"). argparse keeps its actions private."""
    return [action.dest for action in parser._actions if action.dest != "help"]


def jsonargparse_recovers(parser) -> bool:
    """Whether jsonargparse will catch what its `error(message, ex)` raises: it parses tentatively with
    `exit_on_error` off, and `JSONARGPARSE_DEBUG` asks for tracebacks. An `error` override must then raise."""
    return not parser.exit_on_error or bool(os.environ.get("JSONARGPARSE_DEBUG"))


def failing_parser(parser, error: Exception | None):
    """The parser whose keys a parse error is about: jsonargparse marks an error inside a subcommand with that
    subcommand's parser (an undocumented attribute), whose keys are the ones to suggest."""
    return getattr(error, "subcommand_parser", None) or parser


# ----------------------------------------------------------------- transformers
@contextlib.contextmanager
def falcon_linear_as_nn_linear() -> Iterator[None]:
    """Build Falcon with plain `nn.Linear` projections, so that transformers' quantizer replaces them.

    transformers 5.x swaps in bitsandbytes layers only for modules whose type is exactly `nn.Linear`,
    and Falcon builds its projections from `FalconLinear(nn.Linear)`: a plain 4-bit load of Falcon
    silently stays full precision. The two compute the same `x @ W.T + b` with the same state-dict
    keys, so checkpoints load unchanged. transformers has no hook for this; the module global is swapped.
    """
    from transformers.models.falcon import modeling_falcon

    original = modeling_falcon.FalconLinear
    modeling_falcon.FalconLinear = nn.Linear
    try:
        yield
    finally:
        modeling_falcon.FalconLinear = original


def attn_implementation(config) -> str:
    """The attention backend transformers resolved for a model (`sdpa`, `eager`, `flash_attention_2`).

    A packed batch needs a block-diagonal mask for eager and SDPA, and none for FlashAttention-2, so the
    resolved backend matters; transformers exposes only the setting it was given.
    """
    return config._attn_implementation


def route_falcon_attention(model: nn.Module, attend) -> int:
    """Make each SDPA `FalconAttention` with rotary positions hand `attend` its keys and values at their own head
    count; the number of layers changed.

    transformers 5.x's `FalconAttention.forward` calls SDPA directly, not through transformers' attention
    interface, with Falcon-7B's single key/value head and no `enable_gqa` (SDPA's math kernel), and copies
    Falcon-40B's 8 key/value groups to all 128 query heads first (`_split_heads`). This forward is the same
    computation (fused projection, heads split, rotary, cache, attention, output projection) with the keys
    and values left as views of the projection. ALiBi models and `output_attentions` keep transformers' own.
    The forward is set on each instance, so a model built later is untouched.
    """
    from transformers.models.falcon.modeling_falcon import FalconAttention

    count = 0
    for module in model.modules():
        if type(module) is FalconAttention and attn_implementation(module.config) == "sdpa" and not module.config.alibi:
            module.forward = functools.partial(_falcon_attention_forward, module, attend)
            count += 1
    return count


def _falcon_attention_forward(
    self,
    attend,
    hidden_states,
    alibi,
    attention_mask,
    position_ids=None,
    layer_past=None,
    use_cache=False,
    output_attentions=False,
    position_embeddings=None,
    **kwargs,
):
    """`FalconAttention.forward` (transformers 5.24, the rotary SDPA branch) with `attend` over keys and values
    at their own head count."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    if alibi is not None or output_attentions:
        return type(self).forward(
            self, hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache, output_attentions,
            position_embeddings, **kwargs,
        )  # fmt: skip
    fused = self.query_key_value(hidden_states)
    batch, length, _ = fused.shape
    heads, dim = self.num_heads, self.head_dim
    if self.new_decoder_architecture:  # per group: its query heads, then one key head and one value head
        groups = self.num_kv_heads
        qkv = fused.view(batch, length, groups, heads // groups + 2, dim)
        query, key, value = qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
    elif self.multi_query:  # every query head, then the one key head and the one value head
        qkv = fused.view(batch, length, heads + 2, dim)
        query, key, value = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
    else:  # per head: query, key, value
        qkv = fused.view(batch, length, heads, 3, dim)
        query, key, value = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, length, dim)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    # transformers' condition: a mask, or a single query (a decoding step), is never causal
    is_causal = self.is_causal and attention_mask is None and length > 1
    output = attend(query, key, value, attention_mask, is_causal)
    output = output.transpose(1, 2).reshape(batch, length, heads * dim)
    return self.dense(output), None


def forget_hf_deepspeed_config() -> None:
    """Undo `HfDeepSpeedConfig` at the end of a ZeRO-3 run, so that later loads in the process are plain."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def loaded_in_kbit(model: nn.Module) -> bool:
    """Whether transformers loaded `model` with bitsandbytes 4-bit or 8-bit weights: the flags its quantizers set on
    the model, which PEFT's `prepare_model_for_kbit_training` reads too."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def forget_quantization(model: nn.Module) -> None:
    """Mark a bitsandbytes-loaded model whose quantized layers were all replaced by dense ones as a plain model: no
    `quantization_config` in its config (nor in the config it saves), and transformers lets it be cast.

    `model.dequantize()` does this after expanding every layer at once; transformers has no public call for it.
    """
    model.hf_quantizer.remove_quantization_config(model)


# ----------------------------------------------------------------- bitsandbytes
def keep_4bit_layout_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` on its first eval-mode forward
    without grad (Lightning's sanity check, any validation). After that, backward through the layer
    returns no input gradient, so every LoRA adapter below it silently stops learning. The switch is
    an undocumented instance attribute.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantization_constants(weight: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a bitsandbytes weight keeps beside its packed data, neither parameters nor buffers: a 4-bit
    weight's `quant_state` (absmax, with its own absmax and code under double quantization, and the code), or an
    8-bit weight's row scales (`SCB`, until the layer's first forward moves them to its `state`)."""
    constants = []
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        constants += [t for t in quant_state.as_dict(packed=False).values() if isinstance(t, torch.Tensor)]
    scales = getattr(weight, "SCB", None)
    if isinstance(scales, torch.Tensor):
        constants.append(scales)
    return constants


# ----------------------------------------------------------------- peft
def lora_weight_name(key: str) -> str | None:
    """`<module>.lora_A` or `<module>.lora_B` for the state-dict key of a LoRA weight; None for any other key.

    PEFT keys a saved adapter's weights `base_model.model.<module>.lora_A.weight` and holds them in memory as
    `...lora_A.<adapter>.weight` (a Lightning checkpoint puts the module's `model.` in front); it documents neither.
    """
    for kind in ("lora_A", "lora_B"):
        if f".{kind}." in key:
            return f"{key.split(f'.{kind}.')[0].split('base_model.model.', 1)[-1]}.{kind}"
    return None


# ----------------------------------------------------------------- torch
def cuda_flash_takes(query, key, value, attn_mask, is_causal: bool, enable_gqa: bool) -> bool:
    """Whether SDPA's CUDA flash kernel takes these inputs without dropout, by torch's own check, whose `SDPAParams`
    arguments are undocumented."""
    from torch.backends import cuda

    return cuda.can_use_flash_attention(cuda.SDPAParams(query, key, value, attn_mask, 0.0, is_causal, enable_gqa))


# ----------------------------------------------------------------- deepspeed
def init_defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of a class's `__init__` (a strategy's arguments a config leaves out)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def deepspeed_strategy_config(strategy_class: type, init: dict[str, Any]) -> dict:
    """The DeepSpeed config (its ZeRO part) that `strategy_class(**init)`, a Lightning `DeepSpeedStrategy`, would
    hold, without building one: `plan` checks a run where DeepSpeed may not be installed, and Lightning has no
    public function for it. As `DeepSpeedStrategy.__init__` builds it: the user's own config (a dict, a JSON
    file, or the file `PL_DEEPSPEED_CONFIG_PATH` names), else the ZeRO arguments. `init` holds every argument,
    defaults included (`init_defaults`). Raises OSError or ValueError for a config file that cannot be read.
    """
    config = init.get("config")
    if config is None:
        config = os.environ.get(strategy_class.DEEPSPEED_ENV_VAR)
    if isinstance(config, dict):
        return config
    if config is not None:
        return json.loads(Path(config).read_text())
    if not init["zero_optimization"]:
        return {}
    zero: dict[str, Any] = {"stage": init["stage"]}
    if init["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": init["offload_optimizer_device"]}
    if init["offload_parameters"]:
        zero["offload_param"] = {"device": init["offload_params_device"]}
    return {"zero_optimization": zero}


def keep_only_trainable_in_checkpoints(engine: Any) -> None:
    """Make a DeepSpeed engine's checkpointed module state hold only trainable (LoRA) weights.

    DeepSpeed's `exclude_frozen_parameters` drops frozen *parameters* by name, but bitsandbytes writes
    each 4-bit layer's quantization constants (absmax, quant_map, ...) as extra state-dict entries, and
    a tied lm_head survives under its second name. All of it is rebuilt from the base on load. DeepSpeed
    has no filter for its checkpointed state, so the engine's `module_state_dict` is wrapped.
    """
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    module_state_dict = engine.module_state_dict

    def trainable_only(*args: Any, **kwargs: Any) -> dict:
        state = module_state_dict(*args, **kwargs)
        for key in [k for k in state if k not in trainable]:
            del state[key]
        return state

    engine.module_state_dict = trainable_only
