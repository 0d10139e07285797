"""`predict`'s output: one JSONL row per input."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Writes `predict` outputs as JSONL `{input, output, eos}` to `generation.output`.

    The CLI defaults that to `predictions.jsonl` in the checkpoint's run directory. With several ranks
    each writes its share to `NAME.rankN.jsonl`.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def on_predict_start(self, trainer, pl_module) -> None:
        output = pl_module.generation.output
        self.path = Path(output) if output else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            self.path = self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with self.path.open("a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(f"[predict] wrote {self.path}")
