"""Tokens per second, the tokens seen, and peak CUDA memory, logged at every logged step."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

from lightning_falcon.upstream import log_to_loggers, logging_step


class TokenThroughput(Callback):
    """Logs the global `train/tokens_per_sec` and `train/tokens` (real tokens, padding excluded, summed over
    ranks) and each rank's peak CUDA memory, at every logged step.

    The rate is the tokens since the last logged step over the time since then, so data loading counts;
    validation does not (the window restarts after it). Each step adds its count on the device; the count
    is read back (and summed over ranks) only on logged steps and checkpoints: no host sync, and no
    all-reduce, on the other steps.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._window = 0  # tokens since the window started
        self._unread: torch.Tensor | None = None  # this rank's tokens not yet read back from the device
        self._strategy = None
        self.tokens = 0  # seen by all ranks since the run began; checkpointed, so a resume continues the count

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._strategy = trainer.strategy

    def _read(self) -> None:
        """Add the tokens counted on the device since the last read (every rank's) to the total and the window.

        Collective under several ranks: called only where every rank is (logged steps, checkpoints,
        window restarts), so a step that is neither adds no host sync and no all-reduce.
        """
        if self._unread is None:
            return
        tokens = int(self._strategy.reduce(self._unread, reduce_op="sum").item())
        self._unread = None
        self.tokens += tokens
        self._window += tokens  # a read between logged steps (a checkpoint) still counts toward the rate

    def state_dict(self) -> dict:
        self._read()  # the checkpoint is written on every rank, so every rank is here
        return {"tokens": self.tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens = int(state_dict.get("tokens", 0))

    def _restart(self, *args) -> None:
        self._read()  # into the total, not into the next window's rate
        self._start, self._window = None, 0

    on_train_epoch_start = on_validation_end = _restart

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Counted every step (not only when logged), so the checkpointed count is exact wherever a run stops.
        tokens = batch["attention_mask"].sum()  # int64 on the device
        self._unread = tokens if self._unread is None else self._unread + tokens
        if not logging_step(trainer):
            return
        self._read()
        now = time.perf_counter()
        rate = self._window / max(now - self._start, 1e-9)
        pl_module.log("train/tokens_per_sec", rate, prog_bar=True, on_step=True, batch_size=1)
        self._start, self._window = now, 0
        metrics = {"train/tokens": float(self.tokens)}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":  # rank 0's, as the logger is rank 0's
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        log_to_loggers(trainer, metrics)
