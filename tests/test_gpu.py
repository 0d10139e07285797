"""CUDA-only checks (skipped without a GPU): the 4-bit load lands on the GPU in bf16, and a fit runs there."""

import lightning as L
import pytest
import torch
from conftest import MIDJOURNEY, TINY

from lightning_falcon import FalconQLoRA, PromptDataModule
from lightning_falcon.quantization import quantized_layers, resolve_compute_dtype

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
    )
    trainer.fit(model, data)
    layers = quantized_layers(model.model)
    assert layers and all(m.weight.device.type == "cuda" for m in layers.values())
    assert trainer.callback_metrics["train/peak_mem_gib"] > 0
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
