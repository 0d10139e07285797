"""DeepSpeed for a 4-bit base with LoRA: what Lightning's DeepSpeedStrategy needs to shard QLoRA under ZeRO-3.

Three things go wrong with the stock strategy (pytorch-lightning #19731, #20949, trl #4416):

1. It runs `configure_model` inside `deepspeed.zero.Init`, which partitions every parameter the moment
   its module is built. transformers cannot load a quantized model into partitioned parameters (it
   skips zero.Init for quantized models itself), so the load fails or mixes devices.
   `QLoRADeepSpeedStrategy` instead hands its DeepSpeed config to transformers (`HfDeepSpeedConfig`)
   when the model asks, just before its load (`prepare_quantized_load`, `model.placement`):
   transformers builds an unquantized base under zero.Init, and loads a quantized one onto this rank's
   device with its 4-bit weights in a floating storage dtype; `deepspeed.initialize` then partitions it.
   LoRA layers are added afterwards, outside zero.Init, so PEFT initialises them normally.
2. Its checkpoints include the frozen base; here `exclude_frozen_parameters` defaults to True, and the
   quantization constants are left out too (`upstream.keep_only_trainable_in_checkpoints`).
3. Saving the adapter on rank 0 under ZeRO-3 writes empty tensors; `SaveAdapter` gathers them first.

Its checkpoint directories are also swapped in whole, so a crash mid-save keeps the previous one.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy

from lightning_falcon.errors import ConfigError, first_line
from lightning_falcon.files import swap_in_directory
from lightning_falcon.model.placement import zero_stage
from lightning_falcon.training.checkpoint_io import disk_full, write_failed_for_space
from lightning_falcon.upstream import (
    deepspeed_strategy_config,
    forget_hf_deepspeed_config,
    init_defaults,
    keep_only_trainable_in_checkpoints,
    registered_strategy,
)


class QLoRADeepSpeedStrategy(DeepSpeedStrategy):
    def __init__(self, *args: Any, exclude_frozen_parameters: bool = True, **kwargs: Any) -> None:
        """Lightning's `DeepSpeedStrategy` (same arguments) made to shard a quantized base with LoRA.

        Args:
            exclude_frozen_parameters: Leave the frozen base out of checkpoints (only LoRA weights and their
                optimizer state are saved; the base is reloaded from `model_name_or_path` on resume).
        """
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        self._hf_deepspeed_config = None
        if isinstance(self.config, dict):
            # With optimizer offload DeepSpeed insists on its compiled CPU Adam by default. The LoRA states are
            # small enough for torch's AdamW on the CPU, which needs no build step on the cluster.
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    def supports_accelerator(self) -> bool:
        """Lightning's DeepSpeedStrategy runs on CUDA GPUs only: its `setup_environment` refuses anything else."""
        return isinstance(self.accelerator, CUDAAccelerator)

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        # No zero.Init around configure_model (see the module docstring, point 1): the model calls
        # `prepare_quantized_load` just before its `from_pretrained` instead.
        self._init_config_if_needed()
        yield

    def prepare_quantized_load(self) -> torch.dtype | None:
        """`model.placement.ShardsQuantizedBase`: under ZeRO-3, tell transformers (and PEFT) the run is ZeRO-3,
        so that their loaders and generate() act on it, and return the dtype DeepSpeed keeps parameters in.
        DeepSpeed shards the packed 4-bit weights only when they are stored in it. Elsewhere None.

        transformers holds only a weak reference to the config, so the strategy keeps it alive for the run.
        """
        from transformers.integrations import HfDeepSpeedConfig

        self._init_config_if_needed()
        if not self.zero_stage_3:
            return None
        if self._hf_deepspeed_config is None:
            self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)
        return deepspeed_param_dtype(self)

    def init_deepspeed(self) -> None:
        super().init_deepspeed()
        if self.exclude_frozen_parameters:
            keep_only_trainable_in_checkpoints(self.deepspeed_engine)

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        """DeepSpeed's directory of shards, written whole under a hidden name and then swapped in
        (`files.swap_in_directory`): a crash mid-save leaves the previous checkpoint usable."""
        target = Path(self.broadcast(str(filepath)))
        tag = f"step{checkpoint.get('global_step', 0)}"  # the same name on every rank
        staged = target.with_name(f".{target.name}.tmp-{tag}")
        if self.is_global_zero and staged.exists():  # left by a crash during an earlier save
            shutil.rmtree(staged)
        self.barrier("checkpoint staging")
        try:
            super().save_checkpoint(checkpoint, staged, storage_options)
        except Exception as e:
            # This rank's shard did not fit. The staged directory is left to the other ranks still writing into
            # it (rank 0 clears it before the next save); the previous checkpoint is untouched.
            if write_failed_for_space(e, staged.parent):
                raise disk_full(target) from e
            raise
        self.barrier("checkpoint shards written")
        if self.is_global_zero:
            swap_in_directory(staged, target, tag)
        self.barrier("checkpoint swapped in")

    def teardown(self) -> None:
        super().teardown()
        if self._hf_deepspeed_config is not None:
            forget_hf_deepspeed_config()
            self._hf_deepspeed_config = None


def deepspeed_param_dtype(strategy: Strategy) -> torch.dtype:
    """The dtype DeepSpeed keeps (and partitions) parameters in: bf16 or fp16 under mixed precision, else fp32."""
    config = getattr(strategy, "config", None) or {}
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class StrategySettings:
    """What the run checks need of a strategy, as plain values: `of` reads them from the strategy fit builds,
    `from_config` from the `trainer.strategy` a config names, building nothing (plan runs where DeepSpeed may not)."""

    deepspeed: bool = False
    stage: int = 0  # ZeRO stage; 0 without DeepSpeed
    offloads_optimizer: bool = False
    offloads_parameters: bool = False
    shards_quantized_base: bool = False  # a QLoRADeepSpeedStrategy, which can load a quantized base under ZeRO-3
    exclude_frozen_parameters: bool = False

    @classmethod
    def of(cls, strategy: Strategy) -> StrategySettings:
        if not isinstance(strategy, DeepSpeedStrategy):
            return cls()
        # strategy.config already holds the ZeRO settings. `_init_config_if_needed` must not run here: before the
        # module is attached it would freeze DeepSpeed's batch size at a value it cannot use.
        return cls._deepspeed(
            strategy.config or {},
            isinstance(strategy, QLoRADeepSpeedStrategy),
            bool(getattr(strategy, "exclude_frozen_parameters", False)),
        )

    @classmethod
    def from_config(cls, value: Any) -> StrategySettings:
        """`trainer.strategy` as a config parses it: a registry name (`ddp`, `deepspeed_stage_3`), a class_path
        with init_args, or a Strategy. `tests/test_configs.py` checks that it reads what `of` reads."""
        if isinstance(value, Strategy):
            return cls.of(value)
        if hasattr(value, "class_path"):
            module, _, name = value.class_path.rpartition(".")
            strategy_class, init = getattr(importlib.import_module(module), name), dict(value.init_args or {})
        elif (registered := registered_strategy(str(value))) is not None:
            strategy_class, init = registered
        else:  # `auto`: Lightning picks a single-device or DDP strategy
            return cls()
        if not issubclass(strategy_class, DeepSpeedStrategy):
            return cls()
        init = {**init_defaults(DeepSpeedStrategy), **init_defaults(strategy_class), **init}
        return cls._deepspeed(
            deepspeed_config(strategy_class, init),
            issubclass(strategy_class, QLoRADeepSpeedStrategy),
            bool(init["exclude_frozen_parameters"]),
        )

    @classmethod
    def _deepspeed(cls, config: dict, shards_quantized_base: bool, exclude_frozen_parameters: bool) -> StrategySettings:
        zero = config.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return zero.get(key, {}).get("device", "none") not in (None, "none")

        return cls(
            deepspeed=True,
            stage=int(zero.get("stage", 0)),
            offloads_optimizer=offloaded("offload_optimizer"),
            offloads_parameters=offloaded("offload_param"),
            shards_quantized_base=shards_quantized_base,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )


def deepspeed_config(strategy_class: type[DeepSpeedStrategy], init: dict[str, Any]) -> dict:
    """`upstream.deepspeed_strategy_config`, with an unreadable config file as a one-line error."""
    try:
        return deepspeed_strategy_config(strategy_class, init)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot read the DeepSpeed config {init.get('config') or 'in PL_DEEPSPEED_CONFIG_PATH'}: "
            f"{first_line(e)}. Fix: give the path of a DeepSpeed JSON config, or leave the strategy's config unset"
        ) from e


def strategy_problems(strategy: StrategySettings, quantization: str, optimizer: str) -> list[str]:
    """The strategy/model combinations that cannot work on any machine, one line each (`check_config` lists them)."""
    if not strategy.deepspeed:
        return []
    problems = []
    if strategy.stage == 3 and not strategy.shards_quantized_base:
        problems.append(
            "Lightning's DeepSpeedStrategy builds the model inside zero.Init, which cannot hold a quantized base "
            "(pytorch-lightning #19731). Fix: use --config configs/strategy/deepspeed-zero3.yaml "
            "(lightning_falcon.training.strategy.QLoRADeepSpeedStrategy)"
        )
    if strategy.stage == 3 and quantization == "int8":
        problems.append(
            "int8 + ZeRO-3 cannot work: bitsandbytes int8 weights keep per-row scales beside an int8 tensor that "
            "DeepSpeed cannot partition. Fix: --model.quantization nf4, or ZeRO-2 "
            "(configs/strategy/deepspeed-zero2.yaml)"
        )
    if optimizer == "paged_adamw_8bit" and strategy.offloads_optimizer:
        problems.append(
            "paged_adamw_8bit cannot run with DeepSpeed optimizer offload, which steps the optimizer on its CPU "
            "partitions, where nothing pages. Fix: --model.optimizer adamw, or an overlay without offload"
        )
    if not strategy.exclude_frozen_parameters:
        problems.append(
            "DeepSpeed would write the whole frozen base into every checkpoint (pytorch-lightning #20949). "
            "Fix: set exclude_frozen_parameters: true on the strategy, or use an overlay in configs/strategy/"
        )
    return problems


def check_strategy_runs(strategy: Strategy) -> None:
    """Fail before any weights load when this machine cannot run `strategy` (fit's check: plan plans a run for
    another machine)."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return
    if isinstance(strategy, QLoRADeepSpeedStrategy):
        supported = strategy.supports_accelerator()
    else:
        supported = isinstance(strategy.accelerator, CUDAAccelerator)
    if not supported:
        raise ConfigError(
            f"DeepSpeed runs on CUDA GPUs only, and this run's accelerator is {type(strategy.accelerator).__name__}. "
            "Fix: on CPU train with --trainer.strategy ddp (or auto); use the DeepSpeed overlays on GPU nodes"
        )


def gathered_parameters(strategy: Strategy, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Inside this context every rank holds the full `params`: under ZeRO-3 they are gathered, else a no-op.

    All ranks must enter it (it is a collective).
    """
    if zero_stage(strategy) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
