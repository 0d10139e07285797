"""`model.precompute_reference`: the reference's log-probabilities of every pair, computed once before training.

DPO and IPO compare the policy against a reference (the base, or the adapter fit started from), which is one
more forward of every batch, without gradients. With `model.precompute_reference` that forward runs once per
pair before the first step, over the training and held-out pairs in order, and the results are cached beside the
tokenized data, keyed by the tokenized data's own keys and by what the reference is (the base's files, how it
was quantized, the precision, the adapter's weights): a later run or a resume reads them instead. Every rank
computes every pair (under ZeRO-3 every rank must take part in each forward), and rank 0 writes the file. The
datamodule looks each batch's values up by its pairs' numbers, so loaders made before this read them too. They are
this fit's alone: the datamodule forgets them when the fit ends or fails, and a fit without them starts by forgetting
any it holds, so a later fit, validate or test of another model on the same datamodule runs its own reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_falcon.files import atomic_write, load_weights_only
from lightning_falcon.model.preference import REFERENCED
from lightning_falcon.upstream import attn_implementation


class ReferenceLogps(Callback):
    """Before fit's first step, hand the datamodule the reference's log-probabilities of every pair (computed or
    read from the cache), so that no batch runs the reference forward; take them back when the fit ends."""

    def on_fit_start(self, trainer, pl_module) -> None:
        hp = pl_module.hparams
        if not (hp.objective in REFERENCED and hp.precompute_reference):
            _forget(trainer)
            return
        datamodule = trainer.datamodule
        path = cache_file(trainer, datamodule, pl_module)
        # every rank or none computes: under ZeRO-3 each forward needs them all (a node-local cache may differ)
        if trainer.strategy.reduce_boolean_decision(path.is_file(), all=True):
            values = load_weights_only(path)
            rank_zero_info(f"[reference] log-probabilities of every pair read from {path}")
        else:
            # as the training step runs the reference: under the precision plugin's autocast
            with trainer.precision_plugin.forward_context():
                values = torch.cat([_compute(pl_module, datamodule, part) for part in datamodule.pair_parts()])
            if trainer.is_global_zero:
                atomic_write(path, lambda f: torch.save(values, f))
            rank_zero_info(f"[reference] log-probabilities of {len(values)} pairs computed once, cached in {path}")
        datamodule.with_reference(values)

    def on_fit_end(self, trainer, pl_module) -> None:
        _forget(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        _forget(trainer)


def _forget(trainer) -> None:
    """No batch of the trainer's datamodule carries reference log-probabilities from now on: they were computed for
    one fit's model and reference, and would otherwise be trusted by whatever runs on the datamodule next."""
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "with_reference"):  # a library user's own datamodule has none
        datamodule.with_reference(None)


def _compute(pl_module, datamodule, rows) -> torch.Tensor:
    """The reference's summed answer log-probabilities of each pair of `rows`, in order: (pairs, 2), chosen first."""
    loader = DataLoader(
        rows,
        batch_size=datamodule.hparams.batch_size,
        collate_fn=datamodule.collate,
        generator=torch.Generator(),  # its own: a loader without one draws its seed from the global generator
    )
    values = []
    for batch in loader:
        batch = {k: v.to(pl_module.device) for k, v in batch.items() if k != "reference_logps"}
        chosen, rejected = pl_module.reference_logps(batch).float().cpu().chunk(2)
        values.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(values)


def _hub_snapshot(base: str) -> str | None:
    """The cached snapshot (its path names the commit) a Hub model loaded from; None for a local directory."""
    if Path(base).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(base, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def cache_file(trainer, datamodule, pl_module) -> Path:
    """Where the reference's log-probabilities of this run's pairs are cached: keyed by the tokenized data's keys
    and by everything the reference's outputs depend on."""
    hp = pl_module.hparams
    digest = hashlib.sha256()
    config = pl_module.model.config
    reference = {
        "layout": 2,  # raise when what the file holds changes
        "data": [path.name for path in datamodule.cache_paths.values()],
        "batch_size": datamodule.hparams.batch_size,  # the padding of each batch
        "base": str(pl_module.base_path),
        "snapshot": _hub_snapshot(str(pl_module.base_path)),
        "quantization": [hp.quantization, hp.double_quant, str(pl_module.compute_dtype), hp.upcast_frozen],
        "precision": str(trainer.precision),
        "attention": [attn_implementation(config), hp.fused_attention],
        "loss_chunk_size": hp.loss_chunk_size,
    }
    digest.update(json.dumps(reference, sort_keys=True).encode())
    base = Path(pl_module.base_path)
    if base.is_dir():  # its weight files' sizes and times: a rewritten checkpoint gets a new key
        for file in sorted(base.glob("*.safetensors")):
            digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    adapter = Path(hp.adapter).expanduser() if hp.adapter else None
    if adapter is not None:
        for file in sorted(adapter.glob("*") if adapter.is_dir() else [adapter]):
            if file.is_file():
                with open(file, "rb") as f:
                    digest.update(hashlib.file_digest(f, "sha256").digest())
    return Path(datamodule.hparams.cache_dir).expanduser() / "reference" / f"{digest.hexdigest()[:20]}.pt"
