"""How a lightning_falcon run shows its progress: on a terminal, Lightning's Rich bar redrawn a few times a
second; elsewhere (a Slurm log, a pipe), a line now and then."""

from __future__ import annotations

import math
import time

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar as LightningProgressBar
from lightning.pytorch.utilities import rank_zero_info


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
        says `Epoch N/-2` then). A touch point: a private method of Lightning's bar (touch_points.py)."""
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


class ProgressLines(LightningProgressBar):
    """Progress as plain lines, for a console that is not a terminal: a Slurm log, a pipe, `nohup`.

    A live bar there draws nothing until the run ends. This writes a line at the first step, at each tenth
    of the run, at least every `every_seconds`, and at the last step (the step, the bar's metrics, the time
    elapsed and left), and one after each validation with its metrics. Rank 0 only, through Lightning's
    logger, like the run's other `[...]` lines.
    """

    def __init__(self, every_seconds: float = 600.0, parts: int = 10) -> None:
        """
        Args:
            every_seconds: The longest wait between two lines during training.
            parts: A line at each `1/parts` of the run's steps.
        """
        super().__init__()
        self.every_seconds, self.parts = every_seconds, parts
        self._enabled = True
        self._started = self._written = 0.0
        self._first_step = self._last_step = 0

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = self._written = time.monotonic()
        self._first_step = self._last_step = trainer.global_step  # a resumed run times only its own steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        if not self.is_enabled or step == self._last_step:
            return  # inside an accumulation window: no new optimizer step
        self._last_step = step
        now = time.monotonic()
        finite = math.isfinite(total)
        total = int(total) if finite else total
        crossed = finite and (step * self.parts) // total > ((step - 1) * self.parts) // total
        first = step == self._first_step + 1
        if not (first or crossed or step >= total or now - self._written >= self.every_seconds):
            return
        self._written = now
        done, elapsed = step - self._first_step, now - self._started
        where = f"step {step}/{total} ({step / total:.0%})" if finite else f"step {step}"
        left = f", {clock(elapsed / done * (total - step))} left" if finite else ""
        # the bar's metrics but the logger version, and the validation's, which have a line of their own
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num" and "val" not in k}
        parts = [where, described(metrics), f"{clock(elapsed)} elapsed{left}"]
        rank_zero_info(f"[fit] {' · '.join(part for part in parts if part)}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.is_enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        rank_zero_info(f"[val] step {trainer.global_step} · {described(metrics)}")


def described(metrics: dict) -> str:
    return " · ".join(f"{name} {number(value)}" for name, value in metrics.items())


def number(value) -> str:
    value = float(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
