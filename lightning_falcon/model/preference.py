"""Preference objectives on pairs of answers: DPO (with conservative DPO's label smoothing), IPO and ORPO.

A batch of pairs is one batch of sequences, every chosen answer first, then every rejected one in the same order,
so both go through one forward. Each sequence's log-probability is the sum over its answer's tokens (the labels
that are not -100), computed from the final hidden states of those positions alone, a chunk of them at a time, as
the chunked cross-entropy does (`loss.py`): the whole vocabulary's logits never exist at once.

- DPO (Rafailov et al. 2023): -(1 - e) log s(b D) - e log s(-b D), with D the policy's log-ratio of chosen over
  rejected minus the reference's, and e the assumed rate of flipped labels (conservative DPO; 0: plain DPO).
- IPO (Azar et al. 2023): (D' - 1 / 2b)^2, D' the same difference of per-token (length-averaged) log-ratios,
  as TRL computes it.
- ORPO (Hong et al. 2024): the chosen answers' mean token NLL minus b times the mean log-sigmoid of the log
  odds ratio of the two answers' per-token mean log-probabilities. No reference.

The implicit rewards are b times the log-ratio against the reference (DPO, IPO) or b times the per-token mean
log-probability (ORPO), as TRL reports them. Whatever the objective, `preference/accuracy` is the share of pairs
whose chosen answer the model itself gives the higher summed log-probability, and `preference/margin` the mean
difference (nats): no reference is involved, so base and tuned models compare directly (`evaluate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_falcon.data.prompts import IGNORE_INDEX

Objective = Literal["sft", "dpo", "ipo", "orpo"]
# the objectives that train on pairs, and those of them that compare against a reference model
PAIRED = ("dpo", "ipo", "orpo")
REFERENCED = ("dpo", "ipo")
# what is logged for a batch of pairs, under train/ and val/
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "preference/accuracy",
    "preference/margin",
)


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each position's fp32 log-probability of its target (0 where the target is ignored)."""
    return -F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def sequence_logps(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int | None, chunks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its labels, and how many labels it has.

    Args:
        hidden: (batch, sequence, hidden size), the decoder's output before the output layer.
        head: The output layer (the module: under ZeRO-3 calling it gathers its weight).
        labels: (batch, sequence) token ids, -100 where nothing is scored; position t predicts labels[t + 1].
        chunk_size: Positions per chunk of the output layer; None: all at once.
        chunks: Call the output layer at least this many times, the last ones on no position: under ZeRO-3 each call
            gathers its weight, a collective, so every rank must make as many as the rank with the most answers.
    """
    batch, length = labels.shape
    targets = labels[:, 1:].reshape(-1)
    # Only the answers' positions go through the output layer: the requests and the padding score nothing, and at
    # Falcon's 65,024-token vocabulary the output layer is most of what a position costs there.
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    targets = targets[scored]
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[scored]
    rows = torch.arange(batch, device=labels.device).repeat_interleave(length - 1)[scored]
    chunk = chunk_size or max(targets.numel(), 1)
    # Summed in fp64, so that many chunks round no worse than one sum over the whole logits does.
    total = hidden.new_zeros(batch, dtype=torch.float64)
    for start in range(0, max(math.ceil(targets.numel() / chunk), chunks) * chunk, chunk):
        h, t = states[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            logps = checkpoint(_chunk_logps, head, h, t, use_reentrant=False)
        else:
            logps = _chunk_logps(head, h, t)
        total = total.index_add(0, rows[start : start + chunk], logps.double())
    return total.float(), (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    # Each branch gets only inputs from its own side: torch.where differentiates both, and log1p(-exp(x)) is -inf
    # where exp(x) rounds to 1 (x in (-6e-8, 0) in fp32), which would make the selected branch's gradient NaN.
    split = -math.log(2)
    far, near = x.clamp(max=split), x.clamp(min=split)
    return torch.where(x < split, torch.log1p(-torch.exp(far)), torch.log(-torch.expm1(near)))


@dataclass
class PairLoss:
    """A batch of pairs' loss and what is logged of it (each metric a tensor over the pairs, detached)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    margin: torch.Tensor  # each pair's summed log-probability of the chosen answer minus the rejected one's

    def metrics(self) -> dict[str, torch.Tensor]:
        """`METRICS`, each over the pairs of the batch."""
        return {
            "rewards/chosen": self.chosen_rewards,
            "rewards/rejected": self.rejected_rewards,
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float(),
            "rewards/margins": self.chosen_rewards - self.rejected_rewards,
            "logps/chosen": self.chosen_logps,
            "logps/rejected": self.rejected_logps,
            "preference/accuracy": (self.margin > 0).float(),
            "preference/margin": self.margin,
        }


def pair_loss(
    objective: str,
    logps: torch.Tensor,
    counts: torch.Tensor,
    reference: torch.Tensor | None,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """The loss of a batch of pairs.

    Args:
        objective: `dpo`, `ipo` or `orpo`.
        logps: (2 * pairs,) each sequence's summed answer log-probability, the chosen answers first.
        counts: (2 * pairs,) each sequence's answer tokens.
        reference: (2 * pairs,) the reference model's `logps` (DPO and IPO), or None (ORPO).
        beta: DPO's and IPO's regularization against the reference; ORPO's weight of the odds-ratio term.
        label_smoothing: Conservative DPO's assumed rate of flipped preferences (DPO only).
    """
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    margin = (chosen - rejected).detach()
    if objective == "orpo":
        mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
        log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
        nll = -chosen.sum() / n_chosen.sum()
        loss = nll - beta * F.logsigmoid(log_odds).mean()
        mean_chosen, mean_rejected = mean_chosen.detach(), mean_rejected.detach()
        return PairLoss(loss, beta * mean_chosen, beta * mean_rejected, mean_chosen, mean_rejected, margin)
    if reference is None:
        raise ValueError(f"objective {objective!r} needs the reference model's log-probabilities")
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if objective == "dpo":
        delta = chosen_ratio - rejected_ratio
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif objective == "ipo":
        delta = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference objective {objective!r}")
    return PairLoss(
        losses.mean(),
        beta * chosen_ratio.detach(),
        beta * rejected_ratio.detach(),
        chosen.detach(),
        rejected.detach(),
        margin,
    )
