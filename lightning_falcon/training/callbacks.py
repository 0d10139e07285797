"""The callbacks a lightning_falcon run has, which the CLI installs as the trainer's (`trainer.callbacks`).

A library user who builds a `Trainer` picks from these, or none: `FalconQLoRA` trains without any.
The CLI also shows `training.progress.ProgressBar`, unless the config picks its own bar or none.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from lightning_falcon.model.generation import GenerationSettings
from lightning_falcon.training.disk_space import DiskSpaceCheck
from lightning_falcon.training.predictions import PredictionWriter
from lightning_falcon.training.preemption import SlurmRequeue
from lightning_falcon.training.reference import ReferenceLogps
from lightning_falcon.training.rng import RNGState
from lightning_falcon.training.samples import GenerationSamples
from lightning_falcon.training.save_adapter import SaveAdapter
from lightning_falcon.training.throughput import TokenThroughput


def default_callbacks(generation: GenerationSettings | None = None, lr_monitor: bool = True) -> list[Callback]:
    """New instances (they hold a run's state) of every callback the CLI runs with.

    Args:
        generation: The `generation:` section: the samples logged at each validation, and predict's output file.
        lr_monitor: Log the learning rate as `train/lr` each logging step (Lightning's LearningRateMonitor, which
            needs a logger).
    """
    generation = generation or GenerationSettings()
    callbacks = [
        TokenThroughput(),
        SaveAdapter(),
        PredictionWriter(generation.output),
        GenerationSamples(generation.samples),
        RNGState(),
        ReferenceLogps(),
        SlurmRequeue(),
        DiskSpaceCheck(),
    ]
    if lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks
