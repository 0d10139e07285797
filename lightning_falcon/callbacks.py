"""Callbacks the module always installs: throughput, adapter saving and prediction writing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info


class TokenThroughput(Callback):
    """Logs `train/tokens_per_sec` (real tokens, padding excluded, summed over ranks) and peak CUDA memory.

    The interval runs from one batch end to the next, so data loading counts; validation does not.
    """

    def __init__(self) -> None:
        self._last: float | None = None

    def _restart(self, *args) -> None:
        self._last = None

    on_train_epoch_start = on_validation_end = _restart

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        tokens = trainer.strategy.reduce(batch["attention_mask"].sum().float(), reduce_op="sum")
        pl_module.log(
            "train/tokens_per_sec", tokens / max(now - self._last, 1e-9), prog_bar=True, on_step=True, batch_size=1
        )
        self._last = now
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("train/peak_mem_gib", peak, on_step=True, batch_size=1)


class SaveAdapter(Callback):
    """At the end of fit, save the PEFT adapter to `<run dir>/adapter` (load it with `PeftModel.from_pretrained`)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(trainer.log_dir or trainer.default_root_dir) / "adapter"
        pl_module.model.save_pretrained(out)
        rank_zero_info(f"[adapter] saved to {out}")


class PredictionWriter(BasePredictionWriter):
    """Writes `predict` outputs as JSONL `{input, output}` to `<run dir>/predictions.jsonl`."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / f"predictions.rank{trainer.global_rank}.jsonl"
        if trainer.world_size == 1:
            self.path = self.path.with_name("predictions.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        tokenizer = trainer.datamodule.tokenizer
        inputs = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        outputs = tokenizer.batch_decode(prediction, skip_special_tokens=True)
        with self.path.open("a") as f:
            for i, o in zip(inputs, outputs):
                f.write(json.dumps({"input": i, "output": o}, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(f"[predict] wrote {self.path}")
