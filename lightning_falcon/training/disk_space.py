"""Stop every rank together, before anything is written, when a checkpoint will not fit on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_falcon.training.checkpoint_io import DiskFull, checkpoint_dir, room_problem
from lightning_falcon.upstream import last_saved_path


class DiskSpaceCheck(Callback):
    """Before each checkpoint save, check the checkpoint directory has room for it; if not, stop the run.

    `on_save_checkpoint` runs on every rank before the strategy writes (only rank 0 writes under DDP):
    the ranks decide together, as one rank raising alone would leave the others waiting for it forever.
    What is left on disk is the last good checkpoint. A disk that fills during the write is caught by
    the checkpoint IO instead (`checkpoint_io.write_checkpoint`). Lightning calls this hook for full
    checkpoints only: with `checkpoint.save_weights_only` only the write itself is checked.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        problem = room_problem(checkpoint_dir(trainer), written_part(checkpoint, pl_module))
        full = problem is not None
        if trainer.world_size > 1:
            full = trainer.strategy.reduce_boolean_decision(full, all=False)
        if not full:
            return
        callback = trainer.checkpoint_callback
        last = last_saved_path(callback) if callback is not None else ""
        kept = f"the last good checkpoint stays: {last}" if last and Path(last).exists() else "none was saved yet"
        raise DiskFull(
            f"{problem or 'another rank has no room for its checkpoint'}; nothing was written, and {kept}. "
            "Fix: free space there, or point --checkpoint.dirpath at a larger disk (resume with --ckpt_path)"
        )


def written_part(checkpoint: dict[str, Any], pl_module) -> dict[str, Any]:
    """The checkpoint as it will be written: callbacks run before the module's `on_save_checkpoint`, which
    keeps only the trainable weights (`FalconQLoRA`), so the frozen base in the state dict is not counted."""
    trainable = {name for name, p in pl_module.named_parameters() if p.requires_grad}
    state = checkpoint.get("state_dict", {})
    return {**checkpoint, "state_dict": {k: v for k, v in state.items() if k in trainable}}
