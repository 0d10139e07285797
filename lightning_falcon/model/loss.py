"""Next-token cross-entropy that never holds the whole vocabulary's logits.

A causal LM's loss needs logits at every position: for Falcon's 65,024-token vocabulary one 2,048-token
sequence is 133M logits, 533 MB once the loss upcasts them to fp32, and as much again for their gradient.
Here the final hidden states go through the output layer a chunk of positions at a time; each chunk's
cross-entropy is taken in fp32 and its logits are dropped at once. Backward recomputes one chunk's logits
at a time (activation checkpointing of the chunk), so the peak is one chunk's logits, not the batch's.
The recompute is one extra output-layer matmul per token, a few percent of a step.

The result is the transformers loss (`ForCausalLMLoss`): labels shifted by one, -100 ignored, the mean
over the trained tokens of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_falcon.data.prompts import IGNORE_INDEX


class ScaledOutput(nn.Module):
    """An output layer whose logits the model multiplies by a constant (Falcon-H1's μP `lm_head_multiplier`)."""

    def __init__(self, head: nn.Module, scale: float) -> None:
        super().__init__()
        self.head, self.scale = head, scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) * self.scale


def output_layer(causal_lm: nn.Module, logit_scale: str | None) -> nn.Module:
    """The module that turns the decoder's final hidden states into the model's own logits: the output
    embedding, scaled by the config attribute `logit_scale` where the family has one (`Architecture.logit_scale`)."""
    head = causal_lm.get_output_embeddings()
    if logit_scale is None:
        return head
    return ScaledOutput(head, getattr(causal_lm.config, logit_scale))


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of one chunk of positions."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int, chunks: int = 1
) -> torch.Tensor:
    """Mean next-token cross-entropy of `labels` given final `hidden` states, `chunk_size` positions at a time.

    Args:
        hidden: (batch, sequence, hidden size), the decoder's output before the output layer.
        head: The output layer (the module, not its weight: under ZeRO-3 calling it gathers its weight).
        labels: (batch, sequence) token ids, -100 where nothing trains; position t predicts labels[t + 1].
        chunk_size: Positions per chunk.
        chunks: Call the output layer at least this many times, the last ones on no position: under ZeRO-3 each
            call gathers its weight, so every rank calls it as often as the rank with the widest batch.
    """
    targets = labels[:, 1:].reshape(-1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    # The count stays on the device: no host sync per step.
    count = (targets != IGNORE_INDEX).sum()
    # Summed in fp64, so that many chunks round no worse than one mean over the whole logits does.
    total = hidden.new_zeros((), dtype=torch.float64)
    for start in range(0, max(math.ceil(targets.numel() / chunk_size), chunks) * chunk_size, chunk_size):
        h, t = states[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False).double()
        else:
            total = total + _chunk_loss(head, h, t).double()
    return (total / count).float()
