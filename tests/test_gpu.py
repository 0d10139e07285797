"""CUDA-only checks (skipped without a GPU): the 4-bit load lands on the GPU in bf16, and a fit runs there."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import MIDJOURNEY, TINY, scalars

from lightning_falcon import FalconQLoRA, PromptDataModule
from lightning_falcon.model.quantization import quantized_layers, resolve_compute_dtype

pytestmark = pytest.mark.gpu


def test_auto_compute_dtype_on_cuda():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_compute_dtype("auto", torch.device("cuda")) is expected


def test_fit_on_gpu_with_paged_8bit_adamw_logs_peak_memory(tmp_path):
    model = FalconQLoRA(model_name_or_path=TINY, optimizer="paged_adamw_8bit", gradient_checkpointing=True)
    data = PromptDataModule(dataset=MIDJOURNEY, tokenizer=TINY, max_length=128, batch_size=8, cache_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=10,
        limit_val_batches=2,
        val_check_interval=5,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(model, data)
    layers = quantized_layers(model.model)
    assert layers and all(m.weight.device.type == "cuda" for m in layers.values())
    # written straight to the logger (callbacks.log_to_loggers), not through self.log
    peaks = scalars(Path(trainer.log_dir))["train/peak_mem_gib"]
    assert len(peaks) == 2 and all(v > 0 for _, v in peaks)  # steps 5 and 10 of 10
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_on_one_gpu_saves_a_full_adapter_and_resumes(tmp_path, overlay):
    """The shipped strategy, unmodified, on CUDA at world size 1 (the CPU tests bypass Lightning's CUDA gate)."""
    from conftest import REPO, cli
    from safetensors.torch import load_file

    gpu = ["--config", str(REPO / f"configs/strategy/{overlay}.yaml"), "--trainer.accelerator", "gpu"]
    gpu += ["--trainer.devices", "1", "--trainer.precision", "bf16-mixed", "--checkpoint.every_n_train_steps", "10"]
    cli(tmp_path, "fit", *gpu, "--trainer.max_steps", "20")
    (adapter,) = tmp_path.rglob("adapter_model.safetensors")
    assert all(t.numel() > 0 for t in load_file(adapter).values())
    proc = cli(tmp_path, "fit", *gpu, "--trainer.max_steps", "30", "--ckpt_path", "last")
    assert "Restored all states" in proc.stdout + proc.stderr


def test_each_ddp_rank_would_load_onto_its_own_gpu():
    """The quantized load goes to the strategy's root device (cuda:LOCAL_RANK), never cuda:0 for everyone."""
    from unittest import mock

    from lightning.pytorch.strategies import SingleDeviceStrategy

    model = FalconQLoRA(model_name_or_path=TINY)
    trainer = mock.Mock()
    trainer.strategy = SingleDeviceStrategy(device=torch.device("cuda", torch.cuda.device_count() - 1))
    model.trainer = trainer
    model.configure_model()
    layers = quantized_layers(model.model)
    assert {m.weight.device for m in layers.values()} == {trainer.strategy.root_device}
