"""Where the quantized base loads: onto each rank's own device, or (DeepSpeed ZeRO-3) where a strategy shards it.

The model layer states what it needs from a strategy that shards a quantized base (`ShardsQuantizedBase`);
`training.strategy.QLoRADeepSpeedStrategy` provides it. The model never imports the trainer layer.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy


@runtime_checkable
class ShardsQuantizedBase(Protocol):
    def prepare_quantized_load(self) -> torch.dtype | None:
        """Called just before the base loads. None: load it onto this rank's device as usual. A dtype: the
        strategy shards the base after the load, and its packed 4-bit weights must be stored in that dtype."""


def zero_stage(strategy: Strategy | None) -> int:
    """The DeepSpeed ZeRO stage of `strategy`, 0 if it is not DeepSpeed."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    config = strategy.config or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def base_placement(strategy: Strategy | None, device: torch.device) -> tuple[torch.device | None, torch.dtype]:
    """(the device the base loads onto, the storage dtype of its packed 4-bit weights).

    Under ZeRO-3 the device is None: transformers puts a quantized model on this rank's current device
    itself, and DeepSpeed partitions it afterwards (it shards only floating tensors of its own dtype).
    """
    storage = strategy.prepare_quantized_load() if isinstance(strategy, ShardsQuantizedBase) else None
    if storage is not None:
        return None, storage
    if zero_stage(strategy) == 3:
        raise TypeError(
            f"{type(strategy).__name__} runs ZeRO-3 but cannot shard a quantized base: "
            "use lightning_falcon.training.strategy.QLoRADeepSpeedStrategy"
        )
    return device, torch.uint8
