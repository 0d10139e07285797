"""The optimizer step's policy: AdamW (fused where it can be) or 8-bit AdamW, the learning-rate schedule, clipping by
the norm already computed, and the stop on a NaN or inf loss or gradient before the weights change.

`FalconQLoRA`'s hooks call these; nothing here holds a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from lightning_falcon.model.quantization import paged_adamw_8bit
from lightning_falcon.upstream import last_saved_step

Optimizer = Literal["adamw", "paged_adamw_8bit"]
Schedule = Literal["cosine", "constant"]

# The name Lightning's LearningRateMonitor logs the schedule's learning rate under (a TensorBoard tag).
LR_TAG = "train/lr"


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or inf; the CLI prints it as one line and exits 1."""


def optimizer(
    params: list[torch.nn.Parameter],
    name: Optimizer,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool,
) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights: torch's (its fused kernel when `fused`) or bitsandbytes' paged 8-bit one."""
    kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas)}
    if name == "paged_adamw_8bit":
        return paged_adamw_8bit(params, **kwargs)
    # fused: one kernel for all the LoRA tensors, the same update
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def lr_factor(warmup_steps: int, total_steps: int, schedule: Schedule, min_ratio: float) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each optimizer step: transformers' linear warmup, then its cosine
    decay to `min_ratio` or constant.

    The warmup is transformers' one step ahead, so that the first step trains at lr / warmup_steps rather than at 0,
    and a step past `total_steps` keeps the last rate (transformers' cosine would rise again).
    """
    throwaway = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only its multiplier is read
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(throwaway, warmup_steps)
    else:
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            throwaway, warmup_steps, total_steps, min_lr_rate=min_ratio
        )
    factor = scheduler.lr_lambdas[0]
    return lambda step: factor(step + 1 if step < warmup_steps else min(step, total_steps))


def lr_scheduler(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> dict:
    """Lightning's scheduler config: stepped every optimizer step, its rate logged as `train/lr`."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step", "name": LR_TAG}


def clips_by_norm_itself(trainer) -> bool:
    """Whether the module clips, rather than Lightning: by norm, where every rank holds whole, plain gradients (one
    device, or DDP after its all-reduce)."""
    plain = type(trainer.strategy) in (SingleDeviceStrategy, DDPStrategy)
    return plain and trainer.gradient_clip_algorithm in (None, "norm")


def fused_adamw_fits(trainer) -> bool:
    """Whether torch's fused AdamW can run under `trainer`'s precision and clipping.

    A fused step unscales fp16 gradients itself, so Lightning skips unscaling them before the step: the
    NaN guard and clipping would then see scaled gradients (fp16 AMP, a GradScaler). And Lightning's
    mixed precision refuses to clip for an optimizer that unscales itself (amp.py), so there the clipping
    must be the module's own.
    """
    precision = trainer.precision_plugin
    if isinstance(precision, MixedPrecision):
        if precision.scaler is not None:
            return False
        if trainer.gradient_clip_val and not clips_by_norm_itself(trainer):
            return False
    return True


class StepGuard:
    """What one optimizer step checks: the summed loss of its accumulation window and the gradient norm.

    The module adds each micro-batch's loss (`add_loss`); before the optimizer step `check` computes the norm of the
    LoRA gradients once, stops every rank if a value is not finite, and keeps the norm for clipping and logging.
    """

    def __init__(self) -> None:
        self.grad_norm: torch.Tensor | None = None  # this step's, from `check`
        self._window_loss: torch.Tensor | None = None  # the losses since the last optimizer step, on the device

    def reset(self) -> None:
        """Forget a window that a stopped fit left open."""
        self._window_loss = None

    def add_loss(self, loss: torch.Tensor) -> None:
        # summed on the device: read once a step, with the gradient norm, and never between forward and backward
        detached = loss.detach()
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached

    def check(self, trainer, trainable: list[torch.nn.Parameter]) -> torch.Tensor | None:
        """The gradient norm of `trainable` (None under DeepSpeed, whose engine holds the gradients), after stopping
        every rank if it or the window's loss is not finite."""
        grads = [p.grad.detach() for p in trainable if p.grad is not None]
        checked = {"loss": self._window_loss} if self._window_loss is not None else {}
        self.grad_norm, self._window_loss = None, None
        if grads:
            # A finite loss can still give inf gradients (fp16 overflow): stop before they reach the weights.
            checked["gradient norm"] = self.grad_norm = torch.nn.utils.get_total_norm(grads)  # one foreach pass
        stop_if_not_finite(trainer, checked)
        return self.grad_norm

    def clip(self, trainable: list[torch.nn.Parameter], max_norm: float) -> bool:
        """Clip by the norm `check` computed, the arithmetic of torch's `clip_grad_norm_` without its second pass.
        False when there is no such norm (the caller keeps Lightning's clipping)."""
        if self.grad_norm is None:
            return False
        torch.nn.utils.clip_grads_with_norm_(trainable, max_norm, self.grad_norm)
        return True


def stop_if_not_finite(trainer, checked: dict[str, torch.Tensor]) -> None:
    """Stop every rank together when a value of `checked` (name: scalar) is NaN or inf on any of them, before the
    weights change. One host read, after one all-reduce where there are several ranks.

    Nothing is saved after it: the last checkpoint on disk is the last good one.
    """
    if not checked:
        return
    values = torch.stack([v.detach().float() for v in checked.values()])
    bad = (~torch.isfinite(values)).any().float()
    if trainer.world_size > 1:  # one rank alone raising would leave the others waiting forever
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
    if not bad.item():
        return
    here = [name for name, ok in zip(checked, torch.isfinite(values).tolist(), strict=True) if not ok]
    what = here[0] if here else " or ".join(checked)
    value = f"this rank: {checked[what].float().item()}" if here else "finite on this rank, not on another"
    step, callback = trainer.global_step, trainer.checkpoint_callback
    saved = last_saved_step(callback) if callback else -1
    if not callback or not callback.last_model_path:
        where = "No checkpoint was saved yet"
    elif saved == step:  # the weights just saved are the ones that gave this value
        where = f"The checkpoint of step {step} holds the weights that gave it: resume from an earlier one"
    else:
        where = f"Last good checkpoint: {callback.last_model_path} (step {saved})"
    raise NonFiniteLoss(
        f"{what} is not finite ({value}) at step {step} "
        f"(epoch {trainer.current_epoch}); stopped before the weights changed, nothing saved. {where}. "
        "Fix: lower --model.learning_rate, use bf16 rather than fp16, or check the data near this step"
    )
