"""QLoRA fine-tuning of Falcon LLMs with PyTorch Lightning.

The package is layered, each layer importing only those below it (`tests/test_layers.py` checks it):
`commands` (the CLI and its subcommands) > `training` (callbacks, checkpoint IO, preemption, the
DeepSpeed strategy) > `model` (the LightningModule, quantization, LoRA, generation) > `data` (the
datamodule, formats, batching) > `errors`, `files`, `upstream`, `assets`.
"""

from __future__ import annotations

__all__ = ["FalconQLoRA", "PromptDataModule"]
__version__ = "0.1.0"

# Imported on first use (PEP 562), so that `python -m lightning_falcon --help` does not load torch first.
_LAZY = {"FalconQLoRA": "lightning_falcon.model", "PromptDataModule": "lightning_falcon.data"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_falcon' has no attribute {name!r}")
