"""The data layer: prompt/response or conversation data, checked, tokenized once into a cache, and batched."""

from lightning_falcon.data.datamodule import PromptDataModule

__all__ = ["PromptDataModule"]
