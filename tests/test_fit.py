"""The fast tier's end-to-end check: the tiny default trained through the CLI in this process, with what it writes."""

import sys
from pathlib import Path

import torch
from helpers import adapter_changes_the_model, fit_in_process, sample_texts, scalars

from lightning_falcon.files import umask


def test_fit_writes_config_scalars_lora_only_checkpoints_and_an_adapter(quick_fit):
    run = quick_fit
    assert (run / "config.yaml").is_file()
    s = scalars(run)
    assert [step for step, _ in s["train/loss"]] == list(range(10))
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens"):
        assert len(s[tag]) == 10, tag
    assert [step for step, _ in s["val/loss"]] == [4, 9] and "val/perplexity" in s
    assert s["model/quantized_layers"] == [(0, 8.0)]  # the 4-bit base: every targeted layer quantized
    assert len(sample_texts(run)) == 3  # the sanity check's samples, then each validation's

    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=10.ckpt", "step=5.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert state["global_step"] == 10
    assert state["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in state["state_dict"])
    adapter_changes_the_model(run / "adapter")


def test_the_adapter_carries_the_chat_template_the_run_rendered_with(quick_fit, chat_fit, tokenizer):
    from transformers import AutoTokenizer

    from lightning_falcon.data.chat_templates import NAMED

    # the tiny config renders through `instruction`, not the tokenizer's own: its adapter carries `instruction`
    assert tokenizer.chat_template != NAMED["instruction"]
    assert AutoTokenizer.from_pretrained(quick_fit / "adapter").chat_template == NAMED["instruction"]
    assert AutoTokenizer.from_pretrained(chat_fit / "adapter").chat_template == tokenizer.chat_template


def test_a_turns_run_carries_no_chat_template(tmp_path):
    """It was trained on its turn markers, not on the tokenizer's own template, which a server would apply."""
    from helpers import GUANACO
    from transformers import AutoTokenizer

    run = fit_in_process(
        tmp_path, "--data.dataset.dataset", GUANACO, "--data.dataset.format", "turns", "--data.max_length", "256",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--generation.max_new_tokens", "4",
    )  # fmt: skip
    assert AutoTokenizer.from_pretrained(run / "adapter").chat_template is None
    assert not (run / "adapter" / "chat_template.jinja").exists()


def test_everything_a_fit_writes_is_as_readable_as_the_umask_allows(quick_fit):
    mask = umask()
    modes = {p.relative_to(quick_fit): p.stat().st_mode & 0o777 for p in quick_fit.rglob("*")}
    assert (Path("adapter") / "adapter_model.safetensors") in modes  # safetensors alone would write it 0600
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o777 if (quick_fit / p).is_dir() else 0o666) & ~mask}
    assert not wrong, wrong


def test_a_distributed_fit_leaves_no_process_group_behind(tmp_path):
    # Left alive, gloo's threads can abort the process at exit, and Slurm marks the finished job FAILED.
    import torch.distributed as dist

    fit_in_process(
        tmp_path, "--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "0", "--generation.samples", "[]",
    )  # fmt: skip
    assert (tmp_path / "runs" / "tiny" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()
    assert not dist.is_initialized()


def test_the_module_trains_under_a_plain_trainer_with_no_product_callbacks(tmp_path):
    """A library user's `Trainer(callbacks=[])`: the module alone learns, and saves LoRA-only checkpoints."""
    import lightning as L

    from lightning_falcon import FalconQLoRA, PromptDataModule
    from lightning_falcon.training.callbacks import default_callbacks

    L.seed_everything(0)
    module = FalconQLoRA(
        "asset:tiny-falcon", lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=5e-3, warmup_steps=5
    )
    data = PromptDataModule(
        "asset:data/midjourney.jsonl", tokenizer="asset:tiny-falcon", max_length=128, batch_size=8,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    quiet = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}

    def val_loss() -> float:
        return L.Trainer(**quiet).validate(module, datamodule=data, verbose=False)[0]["val/loss"]

    trainer = L.Trainer(
        **quiet, max_steps=20, callbacks=[], default_root_dir=tmp_path, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    before = val_loss()
    trainer.fit(module, datamodule=data)
    after = val_loss()
    assert after < before - 1.0, (before, after)  # 20 steps take a random-init toy well down

    product = tuple(type(c) for c in default_callbacks())
    assert not [c for c in trainer.callbacks if isinstance(c, product)]
    assert not (tmp_path / "adapter").exists()  # SaveAdapter is the CLI's, not the module's
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()  # Lightning's own ModelCheckpoint
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)


def test_the_cli_installs_every_product_callback_beside_the_users_own(tmp_path):
    from helpers import restored_process_state, tiny_arguments
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lightning_falcon import FalconQLoRA, PromptDataModule
    from lightning_falcon.commands.cli import FalconCLI
    from lightning_falcon.training.callbacks import default_callbacks

    args = [
        *tiny_arguments(tmp_path, "fit")[1:],
        "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
    ]
    with restored_process_state():
        cli = FalconCLI(FalconQLoRA, PromptDataModule, args=args, run=False)
    installed = [type(c) for c in cli.trainer.callbacks]
    assert all(type(c) in installed for c in default_callbacks()), installed
    assert LearningRateMonitor in installed
    assert cli.model.configure_callbacks() == []  # nothing of the module's replaces the trainer's


def test_the_cli_shows_the_products_bar_unless_the_config_picks_its_own_or_none(tmp_path, monkeypatch):
    from helpers import restored_process_state, tiny_arguments
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_falcon import FalconQLoRA, PromptDataModule
    from lightning_falcon.commands.cli import FalconCLI
    from lightning_falcon.training.progress import ProgressBar, ProgressLines

    def bar(*args: str):
        with restored_process_state():
            cli = FalconCLI(FalconQLoRA, PromptDataModule, args=tiny_arguments(tmp_path, "fit", *args)[1:], run=False)
        return cli.trainer.progress_bar_callback

    assert type(bar()) is ProgressLines  # pytest's stdout is not a terminal: a Slurm log's case
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert type(bar()) is ProgressBar and bar().refresh_rate == 4
    assert bar("--trainer.enable_progress_bar", "false") is None
    assert type(bar("--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")) is TQDMProgressBar


def test_off_a_terminal_progress_is_a_line_at_each_tenth_and_after_each_validation(tmp_path, capsys):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        fit_in_process(
            tmp_path, "--trainer.enable_progress_bar", "true", "--trainer.max_steps", "20",
            "--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "20",
            "--trainer.log_every_n_steps", "1", "--generation.samples", "[]",
        )  # fmt: skip
    finally:
        logger.removeHandler(handler)
    lines = [r for r in records if r.startswith(("[fit] step", "[val]"))]
    steps = [int(r.split()[2].split("/")[0]) for r in lines if r.startswith("[fit] step")]
    assert steps == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # the first, each tenth of 20 steps, once each
    assert lines[1].startswith("[fit] step 2/20 (10%) · train/loss ") and " elapsed, " in lines[1]
    assert lines[-1].startswith("[val] step 20 · val/loss ")
    assert "Epoch" not in capsys.readouterr().out  # no bar drawn


def test_the_bar_updates_at_most_refresh_rate_times_a_second_and_always_on_the_last_batch(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    from lightning_falcon.training import progress

    drawn = []
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda self, t, m, o, b, i: drawn.append(i))
    clock = iter([0.0, 0.1, 0.2, 0.26, 0.3, 5.0, 5.1])  # seconds at each of seven steps' ends
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.ProgressBar(refresh_rate=4)  # at most one update every 0.25 s
    for i in range(7):
        trainer = SimpleNamespace(num_training_batches=7, max_steps=100, global_step=i + 1)
        bar.on_train_batch_end(trainer, None, None, None, i)
    assert drawn == [0, 3, 5, 6]  # 6: the epoch's last batch, 0.1 s after the one before
    drawn.clear()
    clock = iter([10.0, 10.1])
    for step in (99, 100):  # the run's last step, mid-epoch
        bar.on_train_batch_end(
            SimpleNamespace(num_training_batches=7, max_steps=100, global_step=step), None, None, None, 2
        )
    assert drawn == [2, 2]
