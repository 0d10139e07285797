"""What a training step checks and counts on the device, read back once a step or only where it is needed.

The NaN/inf guard reads the loss and the gradient norm together before the optimizer step, and the token
count is read back only on logged steps and checkpoints: these tests hold them to what a user relies on.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_falcon import FalconQLoRA, PromptDataModule
from lightning_falcon.model.module import NonFiniteLoss
from lightning_falcon.training.throughput import TokenThroughput


def tiny(tmp_path, **trainer_args):
    L.seed_everything(0)
    module = FalconQLoRA("asset:tiny-falcon", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3)
    data = PromptDataModule(
        "asset:data/midjourney.jsonl", tokenizer="asset:tiny-falcon", max_length=128, batch_size=8,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, **trainer_args,
    )  # fmt: skip
    return module, data, trainer


class Poison(Callback):
    """At optimizer step `step` (micro-batch `micro_batch` of its window), make the loss NaN or one LoRA
    gradient inf; keep the trainable weights as they were just before that step's optimizer update."""

    def __init__(self, step: int, what: str, micro_batch: int = 0) -> None:
        self.step, self.what, self.micro_batch = step, what, micro_batch
        self.before_update: dict[str, torch.Tensor] = {}

    def _here(self, trainer, batch_idx: int) -> bool:
        accumulate = trainer.accumulate_grad_batches
        return trainer.global_step == self.step and batch_idx % accumulate == self.micro_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.what == "loss" and self._here(trainer, batch_idx):
            real = type(pl_module).batch_loss
            pl_module.batch_loss = lambda b: real(pl_module, b) * float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.__dict__.pop("batch_loss", None)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.what == "gradient" and trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # runs before the module's
        self.before_update = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "what, accumulate, micro_batch, message",
    [
        ("gradient", 1, 0, "gradient norm is not finite (this rank: inf) at step 1 "),
        ("loss", 1, 0, "loss is not finite (this rank: nan) at step 1 "),
        ("loss", 2, 0, "loss is not finite (this rank: nan) at step 1 "),  # first micro-batch of the window
    ],
    ids=["inf-gradient", "nan-loss", "nan-loss-inside-accumulation-window"],
)
def test_a_non_finite_value_stops_the_run_before_the_weights_change(tmp_path, what, accumulate, micro_batch, message):
    module, data, trainer = tiny(tmp_path, max_steps=3, accumulate_grad_batches=accumulate, callbacks=[])
    poison = Poison(1, what, micro_batch)
    trainer.callbacks.append(poison)
    with pytest.raises(NonFiniteLoss) as raised:
        trainer.fit(module, datamodule=data)
    assert message in str(raised.value) and "stopped before the weights changed" in str(raised.value)
    assert trainer.global_step == 1
    now = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert poison.before_update and all(torch.equal(now[n], w) for n, w in poison.before_update.items())
    assert all(torch.isfinite(w).all() for w in now.values())


class CountTokens(Callback):
    def __init__(self) -> None:
        self.after_step: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        previous = self.after_step[-1] if self.after_step else 0
        self.after_step.append(previous + int(batch["attention_mask"].sum()))


def test_the_checkpointed_token_count_is_exact_at_a_step_that_logs_nothing(tmp_path):
    # Logged at steps 4 and 8 only; checkpoints after steps 3 and 6, where the device count is unread.
    throughput, counted = TokenThroughput(), CountTokens()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    module, data, trainer = tiny(
        tmp_path, max_steps=6, log_every_n_steps=4, callbacks=[throughput, counted, checkpoints]
    )
    trainer.fit(module, datamodule=data)
    for step in (3, 6):
        state = torch.load(tmp_path / "ckpt" / f"epoch=0-step={step}.ckpt", weights_only=True)
        assert state["callbacks"]["TokenThroughput"] == {"tokens": counted.after_step[step - 1]}, step
    assert counted.after_step[2] > 0


def test_a_checkpoint_between_logged_steps_keeps_its_tokens_in_the_logged_rate(monkeypatch):
    from types import SimpleNamespace

    from lightning_falcon.training import throughput

    clock = iter(range(100))  # one second a call of perf_counter
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: float(next(clock)))
    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.setdefault(name, value), device=torch.device("cpu"))
    monkeypatch.setattr(throughput, "log_to_loggers", lambda trainer, metrics: None)
    meter = throughput.TokenThroughput()
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    meter.setup(trainer, module, "fit")
    batch = {"attention_mask": torch.ones(1, 10, dtype=torch.long)}  # 10 tokens a step
    for step in range(4):  # logged at the 4th step; a checkpoint reads the count after the 3rd
        monkeypatch.setattr(throughput, "logging_step", lambda t, step=step: step == 3)
        meter.on_train_batch_start(trainer, module, batch, step)
        meter.on_train_batch_end(trainer, module, None, batch, step)
        if step == 2:
            assert meter.state_dict() == {"tokens": 30}
    # 40 tokens from the first step's start (t=0) to the logged step's end (t=1): the checkpoint lost none
    assert logged["train/tokens_per_sec"] == 40.0 and meter.tokens == 40
