"""QLoRA fine-tuning of Falcon LLMs with PyTorch Lightning."""

from lightning_falcon.data import PromptDataModule
from lightning_falcon.module import FalconQLoRA

__all__ = ["FalconQLoRA", "PromptDataModule"]
__version__ = "0.1.0"
