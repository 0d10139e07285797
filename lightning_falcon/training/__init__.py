"""The training layer: callbacks, checkpoint IO, exact resume, Slurm preemption and the DeepSpeed strategy."""

from lightning_falcon.training.callbacks import default_callbacks
from lightning_falcon.training.strategy import QLoRADeepSpeedStrategy

__all__ = ["QLoRADeepSpeedStrategy", "default_callbacks"]
