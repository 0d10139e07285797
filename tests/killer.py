"""A test-only callback that SIGKILLs its own process at a chosen point of training (as an OOM kill or a
node failure would), added to a run with `--trainer.callbacks+=killer.SigkillAt`."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class SigkillAt(Callback):
    def __init__(self, step: int, micro_batch: int = 0) -> None:
        """Kill at the start of micro-batch `micro_batch` of the accumulation window after optimizer step `step`."""
        self.step, self.micro_batch = step, micro_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        window = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1  # this batch's index in the epoch
        if trainer.global_step == self.step and window % trainer.accumulate_grad_batches == self.micro_batch:
            os.kill(os.getpid(), signal.SIGKILL)
