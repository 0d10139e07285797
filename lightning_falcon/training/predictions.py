"""`predict`'s output: one JSONL row per input."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_falcon.runs import RunDir


class PredictionWriter(BasePredictionWriter):
    """Writes `predict` outputs as JSONL `{input, output, eos}` (eos: the output ended at EOS, not at
    `max_new_tokens`). With several ranks each writes its share to `NAME.rankN.jsonl`.

    Args:
        output: The file written (`generation.output`). None: `predictions.jsonl` in the run of the checkpoint
            or adapter predicted with, else in the trainer's run directory.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output

    def on_predict_start(self, trainer, pl_module) -> None:
        source = trainer.ckpt_path or pl_module.hparams.get("adapter")
        run = RunDir.of_source(Path(source)) if source else RunDir.of_trainer(trainer)
        self.path = Path(self.output) if self.output else run.predictions
        if trainer.world_size > 1:
            self.path = self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with self.path.open("a", encoding="utf-8") as f:
            for text, out in prediction:
                f.write(json.dumps({"input": text, "output": out.text, "eos": out.stopped_at_eos}, ensure_ascii=False))
                f.write("\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(f"[predict] wrote {self.path}")
