"""The end of fit: the trained LoRA weights saved as a PEFT adapter directory, checked identical across ranks."""

from __future__ import annotations

import hashlib

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_falcon.model import adapter
from lightning_falcon.runs import RunDir
from lightning_falcon.training.strategy import gathered_parameters


class SaveAdapter(Callback):
    """At the end of fit, save the PEFT adapter to `<run dir>/adapter` (load it with `PeftModel.from_pretrained`).

    Every rank takes part: under ZeRO-3 the LoRA weights are gathered first (saving the local shards
    writes an empty adapter: trl #4416, peft #2892), and with several ranks their weights are compared,
    so a run whose replicas drifted apart fails loudly instead of saving one of them. Rank 0 writes.
    """

    def on_fit_end(self, trainer, pl_module) -> None:
        out = RunDir.of_trainer(trainer).adapter  # every rank asks: the run directory is a broadcast from rank 0
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
