"""The model layer: the LightningModule, the quantized load, LoRA, generation and the adapter directory."""

from lightning_falcon.model.module import FalconQLoRA
from lightning_falcon.model.step_policy import NonFiniteLoss

__all__ = ["FalconQLoRA", "NonFiniteLoss"]
