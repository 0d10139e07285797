"""The callbacks a lightning_falcon run has, which the CLI installs as the trainer's (`trainer.callbacks`).

A library user who builds a `Trainer` picks from these, or none: `FalconQLoRA` trains without any.
The CLI also shows `training.progress.ProgressBar`, unless the config picks its own bar or none.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from lightning_falcon.training.disk_space import DiskSpaceCheck
from lightning_falcon.training.predictions import PredictionWriter
from lightning_falcon.training.preemption import SlurmRequeue
from lightning_falcon.training.rng import RNGState
from lightning_falcon.training.samples import GenerationSamples
from lightning_falcon.training.save_adapter import SaveAdapter
from lightning_falcon.training.throughput import TokenThroughput


def default_callbacks() -> list[Callback]:
    """New instances (they hold a run's state) of every callback the CLI runs with."""
    return [
        TokenThroughput(),
        SaveAdapter(),
        PredictionWriter(),
        GenerationSamples(),
        RNGState(),
        SlurmRequeue(),
        DiskSpaceCheck(),
    ]
