"""Exact resume of the random number generators (dropout draws from them), the half Lightning does not restore.

The data order is the other half: `data.sampler`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


class RNGState(Callback):
    """Saves every rank's random number generators with each checkpoint, and gives each rank its own back
    when training restarts from one.

    A rank's generators are the torch CPU generator, the CUDA generator of the device it trains on (its
    current device; none when CUDA is unavailable), and the NumPy and Python ones. Ranks do not draw alike:
    batches padded to different lengths advance dropout's generator by different amounts. Lightning calls
    `state_dict` on every rank and only rank 0 writes, so the ranks' generators are gathered there: the
    checkpoint holds `{"ranks": [rank 0's, rank 1's, ...]}`, in tensors, lists and plain values that
    `torch.load(weights_only=True)` reads. So saving is a collective: every rank saves together, as
    `ModelCheckpoint` and the Slurm requeue do; a checkpoint one rank writes alone (Lightning's on-exception
    checkpoint under several ranks) waits for the others, as Lightning's own save barrier already does.

    A checkpoint written by another number of ranks, with a GPU when there is none now (or the reverse), or in
    the older layout (rank 0's generators, with the CUDA generator of every GPU rank 0 saw) restores what
    applies and warns once that the resume is not bit-exact, and why.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._device = torch.device("cpu")  # this rank's device, from `setup`

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The strategy's device, not torch.cuda's current one: a CPU run on a GPU machine must not open a CUDA
        # context, and a rank touches no other rank's GPU.
        self._device = trainer.strategy.root_device

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather_from_ranks(own_generators(self._device))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not at load time: the sanity check and the loaders' set-up in between draw from them too.
        state, self._to_restore = self._to_restore, None
        if state is None:
            return
        device = trainer.strategy.root_device
        if "ranks" in state:
            own, reasons = _entry_for_rank(state["ranks"], trainer.global_rank, trainer.world_size, device)
        else:
            own, reasons = _entry_from_rank_zero_layout(state, trainer.global_rank, trainer.world_size, device)
        set_generators(own, device)
        if reasons:
            rank_zero_warn(
                f"[resume] random generators restored in part, so the resume is not bit-exact: {'; '.join(reasons)}"
            )


def own_generators(device: torch.device) -> dict[str, Any]:
    """This process's generators, with the CUDA one of `device` (this rank's) if it is a GPU, in values
    `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_generators(state: dict[str, Any], device: torch.device) -> None:
    """Set this process's generators to `own_generators()`'s `state`; the CUDA one of `device` if present."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_from_ranks(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `state`, in rank order. Under torch.distributed it is a collective: every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _entry_for_rank(
    ranks: list[dict[str, Any]], rank: int, world_size: int, device: torch.device
) -> tuple[dict[str, Any], list[str]]:
    """The generators this rank (on `device`) restores from the `ranks` saved, and the reasons the resume is not
    exact."""
    reasons = []
    if len(ranks) != world_size:
        reasons.append(
            f"the checkpoint was written by {len(ranks)} rank(s) and this run has {world_size}, "
            f"so rank r takes the generators of rank r % {len(ranks)}"
        )
    own = dict(ranks[rank % len(ranks)])
    if "cuda" in own and device.type != "cuda":
        reasons.append("it was written on a GPU and this run is on the CPU, so the CUDA generator is not restored")
        del own["cuda"]
    elif "cuda" not in own and device.type == "cuda":
        reasons.append("it was written without a GPU, so the CUDA generator keeps its seed")
    return own, reasons


def _entry_from_rank_zero_layout(
    state: dict[str, Any], rank: int, world_size: int, device: torch.device
) -> tuple[dict[str, Any], list[str]]:
    """`_entry_for_rank` for the older layout: rank 0's generators, with `cuda` a list of every GPU's generator
    as rank 0's process saw them (`get_rng_state_all`), of which only rank 0's own device's is its own."""
    reasons = []
    own = {key: state[key] for key in ("torch", "numpy", "python")}
    if world_size > 1:
        reasons.append(
            "the checkpoint holds rank 0's generators only (older layout), so the other ranks start "
            "from rank 0's CPU generators and keep their CUDA generators' seeds"
        )
    if "cuda" in state and device.type == "cuda":
        index = device.index or 0
        if index < len(state["cuda"]):
            if rank == 0:
                own["cuda"] = state["cuda"][index]
        else:
            reasons.append(f"it holds no CUDA generator for {device}, so that one keeps its seed")
    elif "cuda" in state:
        reasons.append("it was written on a GPU and this run is on the CPU, so the CUDA generator is not restored")
    elif device.type == "cuda":
        reasons.append("it was written without a GPU, so the CUDA generator keeps its seed")
    return own, reasons
