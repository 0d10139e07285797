"""QLoRA fine-tuning of Falcon LLMs with PyTorch Lightning.

The package is layered, each layer importing only those below it (`tests/test_layers.py` checks it):
`commands` (the CLI and its subcommands) > `training` (callbacks, checkpoint IO, preemption, the
DeepSpeed strategy) > `model` (the LightningModule, quantization, LoRA, generation) > `data` (the
datamodule, formats, batching) > `errors`, `files`, `upstream`, `assets`.
"""

from lightning_falcon.data import PromptDataModule
from lightning_falcon.model import FalconQLoRA

__all__ = ["FalconQLoRA", "PromptDataModule"]
__version__ = "0.1.0"
