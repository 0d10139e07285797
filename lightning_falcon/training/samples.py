"""Generated samples at every validation, logged to TensorBoard: what the model writes, as it trains."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger


class GenerationSamples(Callback):
    """At every validation (the sanity check included, as the before), generate for `samples` and log them to
    TensorBoard as a text table, with `samples/eos_rate` (the share that ended at EOS).

    Every rank generates (DeepSpeed ZeRO-3 needs all of them for each forward); rank 0 logs.

    Args:
        samples: The inputs (`generation.samples`).
    """

    def __init__(self, samples: list[str] | None = None) -> None:
        self.samples = list(samples or [])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        samples = self.samples
        datamodule = trainer.datamodule
        if not samples or not hasattr(datamodule, "encode_input"):
            return
        prompts = [datamodule.encode_input(text) for text in samples]
        # Sampling (do_sample) draws from the global generators: fork them, so that logging samples
        # leaves the training's dropout and shuffling exactly as without them.
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            outputs = pl_module.generate(prompts, batch_size=datamodule.hparams.batch_size)
        rate = sum(o.stopped_at_eos for o in outputs) / len(outputs)
        pl_module.log("samples/eos_rate", rate, batch_size=1, sync_dist=True)
        if not trainer.is_global_zero:
            return
        rows = "\n".join(
            f"| {markdown_cell(text)} | {markdown_cell(out.text)} | {'EOS' if out.stopped_at_eos else 'cut'} |"
            for text, out in zip(samples, outputs, strict=True)
        )
        table = "| input | output | ended at |\n|---|---|---|\n" + rows
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", table, global_step=trainer.global_step)


def markdown_cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or "(empty)"
