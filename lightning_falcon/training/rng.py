"""Exact resume of the random number generators (dropout draws from them), the half Lightning does not restore.

The data order is the other half: `data.sampler`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGState(Callback):
    """Saves the torch (CPU and CUDA), NumPy and Python generators with each checkpoint, and restores them
    when training restarts from one.

    The saved state is rank 0's. DDP ranks are seeded alike and draw alike, so their generators match.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain lists and tensors, so checkpoints still load with torch.load(weights_only=True)
        numpy = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
        state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        # Here, not at load time: the sanity check and the loaders' set-up in between draw from them too.
        state, self._to_restore = self._to_restore, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
