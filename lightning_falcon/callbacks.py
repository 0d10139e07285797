"""Callbacks the module always installs: throughput, adapter saving, prediction writing and generated samples."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info


def logging_step(trainer) -> bool:
    """Whether Lightning writes this step's logs (every `trainer.log_every_n_steps`).

    Train scalars are computed only on those steps: `self.log` costs about 1 ms a call in Lightning 2.6
    whether or not the step is written, and on the tiny default five calls a step were 11% of a step
    (benchmarks/overhead.py). Lightning's own decision is private; this asks it, as its LearningRateMonitor does.
    """
    return trainer._logger_connector.should_update_logs


def log_to_loggers(trainer, metrics: dict[str, float]) -> None:
    """Write step scalars straight to the loggers (rank 0), at the step Lightning's `self.log` would use.

    For values neither shown in the progress bar nor averaged over an epoch. Lightning's LearningRateMonitor
    and ThroughputMonitor log the same way: `self.log` spends most of its ~1 ms a call moving its result
    collection between devices, the logger itself about 0.05 ms.
    """
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class TokenThroughput(Callback):
    """Logs the global `train/tokens_per_sec` and `train/tokens` (real tokens, padding excluded, summed over
    ranks) and each rank's peak CUDA memory, at every logged step.

    The rate is the tokens since the last logged step over the time since then, so data loading counts;
    validation does not (the window restarts after it).
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._window = 0  # tokens since the window started
        self.tokens = 0  # seen by all ranks since the run began; checkpointed, so a resume continues the count

    def state_dict(self) -> dict:
        return {"tokens": self.tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens = int(state_dict.get("tokens", 0))

    def _restart(self, *args) -> None:
        self._start, self._window = None, 0

    on_train_epoch_start = on_validation_end = _restart

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Counted every step (not only when logged), so the checkpointed count is exact wherever a run stops.
        tokens = int(trainer.strategy.reduce(batch["attention_mask"].sum().float(), reduce_op="sum").item())
        self.tokens += tokens
        self._window += tokens
        if not logging_step(trainer):
            return
        now = time.perf_counter()
        rate = self._window / max(now - self._start, 1e-9)
        pl_module.log("train/tokens_per_sec", rate, prog_bar=True, on_step=True, batch_size=1)
        self._start, self._window = now, 0
        metrics = {"train/tokens": float(self.tokens)}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":  # rank 0's, as the logger is rank 0's
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        log_to_loggers(trainer, metrics)


class SaveAdapter(Callback):
    """At the end of fit, save the PEFT adapter to `<run dir>/adapter` (load it with `PeftModel.from_pretrained`).

    Every rank takes part: under ZeRO-3 the LoRA weights are gathered first (saving the local shards
    writes an empty adapter: trl #4416, peft #2892), and with several ranks their weights are compared,
    so a run whose replicas drifted apart fails loudly instead of saving one of them. Rank 0 writes.
    """

    def on_fit_end(self, trainer, pl_module) -> None:
        from lightning_falcon.strategy import gathered_parameters

        # trainer.log_dir is a broadcast from rank 0: every rank must ask for it, or rank 0 waits forever.
        out = Path(trainer.log_dir or trainer.default_root_dir) / "adapter"
        named = [(n, p) for n, p in pl_module.model.named_parameters() if p.requires_grad]
        lora = [p for _, p in named]
        with gathered_parameters(trainer.strategy, lora):
            if trainer.world_size > 1:
                # on the root device: NCCL carries only CUDA tensors, and offloaded weights may sit on the CPU
                prints = trainer.strategy.all_gather(fingerprint(lora).to(trainer.strategy.root_device)).flatten()
                if not bool((prints == prints[0]).all()):
                    raise RuntimeError(f"LoRA weights differ across ranks (fingerprints {prints.tolist()})")
                rank_zero_info(f"[adapter] LoRA weights identical on all {trainer.world_size} ranks")
            # Copied out while gathered. `model.state_dict()` is not used: under ZeRO-3 it gathers the
            # whole frozen base too, as a collective that rank 0 alone would wait on forever.
            state = {n: p.detach().cpu().clone() for n, p in named}
        if trainer.is_global_zero:
            from lightning_falcon import adapter

            empty = [n for n, t in state.items() if t.numel() == 0]
            if empty:
                raise RuntimeError(f"refusing to save an empty adapter: {len(empty)} LoRA weights, e.g. {empty[0]}")
            datamodule = trainer.datamodule
            adapter.save(
                pl_module.model,
                state,
                out,
                getattr(datamodule, "tokenizer", None),
                adapter.training_metadata(pl_module, datamodule, trainer.global_step),
            )
            rank_zero_info(f"[adapter] saved to {out}")
        trainer.strategy.barrier("adapter saved")


def fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """A 63-bit digest of the exact bytes of `params`, as a tensor that collectives can carry."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return torch.tensor(int.from_bytes(digest.digest()[:8], "little") >> 1, dtype=torch.int64)


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


class GenerationSamples(Callback):
    """At every validation (the sanity check included, as the before), generate for `generation.samples`
    and log them to TensorBoard as a text table, with `samples/eos_rate` (the share that ended at EOS).

    Every rank generates (DeepSpeed ZeRO-3 needs all of them for each forward); rank 0 logs. The last
    outputs stay in `outputs` (evaluate reads them).
    """

    def __init__(self) -> None:
        self.outputs = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        samples = pl_module.generation.samples
        datamodule = trainer.datamodule
        if not samples or not hasattr(datamodule, "encode_input"):
            return
        prompts = [datamodule.encode_input(text) for text in samples]
        # Sampling (do_sample) draws from the global generators: fork them, so that logging samples
        # leaves the training's dropout and shuffling exactly as without them.
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            outputs = self.outputs = pl_module.generate(prompts, batch_size=datamodule.hparams.batch_size)
        rate = sum(o.stopped_at_eos for o in outputs) / len(outputs)
        pl_module.log("samples/eos_rate", rate, batch_size=1, sync_dist=True)
        if not trainer.is_global_zero:
            return
        rows = "\n".join(
            f"| {markdown_cell(text)} | {markdown_cell(out.text)} | {'EOS' if out.stopped_at_eos else 'cut'} |"
            for text, out in zip(samples, outputs)
        )
        table = "| input | output | ended at |\n|---|---|---|\n" + rows
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", table, global_step=trainer.global_step)


def markdown_cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or "(empty)"
