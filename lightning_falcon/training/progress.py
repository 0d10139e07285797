"""The progress bar a lightning_falcon run shows: Lightning's Rich bar, redrawn a few times a second."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's `RichProgressBar`, updated at most `refresh_rate` times a second during training.

    Lightning's default updates the bar's state at every step and wakes its drawing thread 100 times a
    second, which on a short step is a measurable share of it (BENCHMARKS.md); a person reads nothing
    faster than a few redraws a second. The last batch of an epoch and of the run is always shown.
    Validation and prediction bars are Lightning's own.
    """

    def __init__(self, refresh_rate: int = 4, leave: bool = False) -> None:
        """
        Args:
            refresh_rate: Redraws a second at most; 0 hides the bar.
            leave: Keep each finished epoch's bar on the console.
        """
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._updated = float("-inf")

    def _get_train_description(self, current_epoch: int) -> str:
        """`Epoch N/LAST`, or `Epoch N of a MAX-step run` when the run is bounded by steps (Lightning's own
        says `Epoch N/-2` then). A touch point: a private method of Lightning's bar (see upstream.py)."""
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0 and (trainer.max_epochs or -1) < 0:
            text = f"Epoch {current_epoch} of a {trainer.max_steps}-step run"
        else:
            text = super()._get_train_description(current_epoch)
        return f"{text:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        last = batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= trainer.global_step
        if self.refresh_rate and now - self._updated < 1 / self.refresh_rate and not last:
            return  # the next update sets the bar to its batch: nothing is lost by skipping this one
        self._updated = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
