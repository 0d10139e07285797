"""CUDA-only checks (skipped without a GPU): the 4-bit load lands on the GPU, a user's fit runs there with the
shipped GPU settings, checkpoints, and resumes exactly, and the shipped DeepSpeed overlays run on CUDA.

`benchmarks/gpu-device.sh` runs these (`pytest -m gpu`) on a lent GPU.
"""

from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, cli, scalars

from lightning_falcon import FalconQLoRA
from lightning_falcon.errors import ConfigError
from lightning_falcon.model.quantization import check_bf16_is_native, quantized_layers, resolve_compute_dtype

pytestmark = pytest.mark.gpu

# configs/falcon-7b-qlora.yaml's GPU settings, on the tiny model: bf16, paged 8-bit AdamW, gradient checkpointing,
# dropout (so resume needs the CUDA generator back). LoRA r 256: bitsandbytes pages only a state of 100,000
# elements or more, and at r 256 the adapters of dense_h_to_4h and dense_4h_to_h have 131,072 each.
GPU_FIT = [
    "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
    "--model.compute_dtype", "bf16", "--model.optimizer", "paged_adamw_8bit", "--model.gradient_checkpointing", "true",
    "--model.lora_r", "256", "--model.lora_alpha", "512",
    "--model.lora_dropout", "0.1", "--trainer.max_steps", "10", "--trainer.val_check_interval", "5",
    "--trainer.log_every_n_steps", "5", "--checkpoint.every_n_train_steps", "5", "--generation.samples", "[]",
]  # fmt: skip


def test_auto_compute_dtype_is_bf16_only_where_this_ranks_gpu_has_it():
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not necessarily GPU 0
    native = torch.cuda.get_device_capability(device) >= (8, 0)
    assert resolve_compute_dtype("auto", device) is (torch.bfloat16 if native else torch.float16)
    if native:
        check_bf16_is_native(torch.bfloat16, "bf16-mixed", device)  # does not raise
    else:
        with pytest.raises(ConfigError, match="native bf16"):
            check_bf16_is_native(torch.bfloat16, "bf16-mixed", device)


def test_paged_8bit_adamw_pages_its_state_and_resumes_it_to_the_bit(tmp_path):
    """The shipped optimizer on CUDA: a state large enough is paged, and saved and loaded as a checkpoint holds
    it (`weights_only`), it continues exactly where the uninterrupted optimizer goes."""
    from lightning_falcon.model.quantization import paged_adamw_8bit

    def step(optimizer, weight, seed: int) -> None:
        weight.grad = torch.randn(weight.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        optimizer.step()

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(512, 256, device="cuda"))  # 131,072 elements: paged
    optimizer = paged_adamw_8bit([weight], lr=1e-3)
    for seed in range(3):
        step(optimizer, weight, seed)
    assert getattr(optimizer.state[weight]["state1"], "is_paged", False)
    torch.save({"weight": weight.detach().clone(), "optimizer": optimizer.state_dict()}, tmp_path / "saved.pt")
    for seed in range(3, 6):
        step(optimizer, weight, seed)

    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    resumed = torch.nn.Parameter(saved["weight"].cuda())
    again = paged_adamw_8bit([resumed], lr=1e-3)
    again.load_state_dict(saved["optimizer"])
    for seed in range(3, 6):
        step(again, resumed, seed)
    assert torch.equal(resumed, weight)


def test_fit_on_gpu_with_paged_8bit_adamw_logs_peak_memory_and_resumes_exactly(tmp_path):
    """A user's fit (the CLI, with its callbacks), then a resume from its step-5 checkpoint that must end on the
    same adapter, to the bit: the optimizer's state (paged where bitsandbytes pages) and the CUDA generator both
    come back."""
    proc = cli(tmp_path, "fit", *GPU_FIT)
    assert "[model] quantized linear layers: 8" in proc.stdout + proc.stderr
    run = tmp_path / "runs" / "tiny" / "version_0"
    logged = scalars(run)
    peaks = logged["train/peak_mem_gib"]
    assert len(peaks) == 2 and all(v > 0 for _, v in peaks), peaks  # steps 5 and 10 of 10
    assert all(torch.isfinite(torch.tensor(v)) for _, v in logged["val/loss"])
    step5 = run / "checkpoints" / "step=5.ckpt"
    state = torch.load(step5, weights_only=True)
    assert state["optimizer_states"][0]["state"], "the paged optimizer saved no state"

    proc = cli(tmp_path, "fit", *GPU_FIT, "--ckpt_path", str(step5))
    assert "Restored all states" in proc.stdout + proc.stderr
    runs = tmp_path / "runs" / "tiny"
    worst = largest_difference(runs / "version_0", runs / "version_1")
    if worst != 0.0:  # resume, or kernels that differ run to run (atomics)? A second uninterrupted run tells.
        cli(tmp_path, "fit", *GPU_FIT)
        again = largest_difference(runs / "version_0", runs / "version_2")
        pytest.fail(f"largest difference of a LoRA weight: resumed {worst:.3e}, a second uninterrupted run {again:.3e}")


def largest_difference(run: Path, other: Path) -> float:
    """The largest difference between two runs' adapters' LoRA weights."""
    from safetensors.torch import load_file

    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(other / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


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


@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_on_one_gpu_saves_a_full_adapter_and_resumes(tmp_path, overlay):
    """The shipped strategy, unmodified, on CUDA at world size 1 (the CPU tests bypass Lightning's CUDA gate),
    in bf16 with the GPU configs' optimizer and gradient checkpointing."""
    from safetensors.torch import load_file

    gpu = ["--config", str(REPO / f"configs/strategy/{overlay}.yaml"), "--trainer.accelerator", "gpu"]
    gpu += ["--trainer.devices", "1", "--trainer.precision", "bf16-mixed", "--checkpoint.every_n_train_steps", "10"]
    gpu += ["--model.optimizer", "paged_adamw_8bit", "--model.gradient_checkpointing", "true"]
    cli(tmp_path, "fit", *gpu, "--trainer.max_steps", "20")
    (adapter,) = tmp_path.rglob("adapter_model.safetensors")
    assert all(t.numel() > 0 for t in load_file(adapter).values())
    proc = cli(tmp_path, "fit", *gpu, "--trainer.max_steps", "30", "--ckpt_path", "last")
    assert "Restored all states" in proc.stdout + proc.stderr
