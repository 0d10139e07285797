"""The scale tier (`-m scale`): Falcon-7B and Falcon-40B at their real width, heads and vocabulary, with few layers.

What the 2-layer, 128-wide toy cannot show: the real module names and shapes (multi-query attention
against grouped KV heads and `new_decoder_architecture`), the 65,024-token vocabulary, the LoRA targets
at r 64, what checkpoints hold, ZeRO-3 sharding of a full-width 40B layer over 2 processes, and the
planner's weight bytes against a real load, to the byte. Random weights; the checkpoints are built once
per session and shared. The whole 7B and several 40B layers run in `benchmarks/scale.py`.
"""

import re
import sys

import pytest
import torch
from helpers import REPO
from processes import run_process
from test_distributed import CPU_DEEPSPEED

sys.path.insert(0, str(REPO / "benchmarks"))
from shapes import falcon_shape, fit_arguments, held_bytes

from lightning_falcon.architectures import FALCON
from lightning_falcon.model.lora import apply_lora, parameter_report
from lightning_falcon.model.memory import Setup, count_model, plan
from lightning_falcon.model.quantization import load_causal_lm, quantized_layers
from lightning_falcon.model.random_weights import random_checkpoint

pytestmark = pytest.mark.scale
VOCAB = 65_024
# (size, layers): hidden, query_key_value's outputs, MLP width, new_decoder_architecture, layer norm names
SHAPES = {
    ("7b", 2): (4544, 4544 + 2 * 64, 18176, False, ["input_layernorm"]),  # multi-query: one K and one V head
    ("40b", 1): (8192, (128 + 2 * 8) * 64, 32768, True, ["ln_attn", "ln_mlp"]),  # 8 KV heads for 128 queries
}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """(size, layers) -> (the shape's config directory, its random checkpoint), each built once."""
    root = tmp_path_factory.mktemp("shapes")
    built = {}

    def get(size: str, layers: int):
        if (size, layers) not in built:
            shape = falcon_shape(size, layers, root)
            built[size, layers] = shape, random_checkpoint(str(shape), root / "random")
        return built[size, layers]

    get.random_dir = root / "random"
    return get


@pytest.mark.parametrize("size,layers", list(SHAPES))
def test_real_width_loads_every_projection_4bit_and_the_planner_counts_its_bytes_exactly(shapes, size, layers):
    hidden, qkv, mlp, new_arch, norms = SHAPES[size, layers]
    _, checkpoint = shapes(size, layers)
    base = load_causal_lm(str(checkpoint), "nf4", True, torch.float32, torch.device("cpu"))
    assert base.config.new_decoder_architecture is new_arch
    assert base.get_input_embeddings().weight.shape == (VOCAB, hidden)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # tied, so stored once
    block = base.transformer.h[0]
    assert all(hasattr(block, n) for n in norms)
    expected = {
        "self_attention.query_key_value": (hidden, qkv),
        "self_attention.dense": (hidden, hidden),
        "mlp.dense_h_to_4h": (hidden, mlp),
        "mlp.dense_4h_to_h": (mlp, hidden),
    }
    quantized = quantized_layers(base)
    assert sorted(quantized) == sorted(f"transformer.h.{i}.{n}" for i in range(layers) for n in expected)
    for name, layer in quantized.items():
        assert (layer.in_features, layer.out_features) == expected[name.split(".", 3)[3]], name
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant

    model = apply_lora(base, 64, 16, 0.1, FALCON.lora_targets, gradient_checkpointing=True)
    lora = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * 4 * layers
    for name, (n_in, n_out) in expected.items():
        assert lora[f"base_model.model.transformer.h.0.{name}.lora_A.default.weight"] == (64, n_in)
        assert lora[f"base_model.model.transformer.h.0.{name}.lora_B.default.weight"] == (n_out, 64)

    count = count_model(base.config, FALCON.lora_targets, 64)
    rows = plan(count, Setup(compute_bytes=4, mixed_16bit=False), "single").rows
    held = held_bytes(model)
    assert held == {
        "quantized": rows["quantized base weights"],
        "constants": rows["quantization constants"],
        "unquantized": rows["unquantized parameters"],
        "lora": rows["LoRA parameters"],
    }
    # The fit's "memory footprint" line: every byte held, the quantization constants included
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert parameter_report(model, quantized).footprint_bytes == sum(held.values()) + buffers


def run_fit(args: list[str], root, env: dict | None = None):
    import os

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = run_process([sys.executable, "-m", "lightning_falcon", *args], cwd=root, env=environment)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_falcon_7b_real_width_trains_through_its_shipped_config_checkpoints_lora_and_resumes(shapes, tmp_path):
    shape, _ = shapes("7b", 2)
    config = str(REPO / "configs" / "falcon-7b-qlora.yaml")
    every = ("--checkpoint.every_n_train_steps", "2")
    run_fit(fit_arguments(config, shape, shapes.random_dir, tmp_path, 64, 2, *every), tmp_path)
    run = tmp_path / "runs" / "falcon-7b-midjourney" / "version_0"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    weights = state["state_dict"]
    # Only the 16 LoRA tensors (2 layers x 4 projections x A, B): no 4-bit weight, constant or embedding
    assert len(weights) == 16 and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert weights["model.base_model.model.transformer.h.1.mlp.dense_h_to_4h.lora_B.default.weight"].shape == (
        18176,
        64,
    )
    (optimizer,) = state["optimizer_states"]
    assert len(optimizer["state"]) == 16 and all(
        s["exp_avg"].dtype == torch.float32 for s in optimizer["state"].values()
    )
    lora_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    assert (run / "checkpoints" / "last.ckpt").stat().st_size < 3.1 * lora_bytes  # weights + 2 Adam moments

    out = run_fit(fit_arguments(config, shape, shapes.random_dir, tmp_path, 64, 3, "--ckpt_path", "last"), tmp_path)
    assert "step 2 of 3" in out and (tmp_path / "runs" / "falcon-7b-midjourney" / "version_1" / "adapter").is_dir()


def test_a_full_width_falcon_40b_layer_shards_under_zero3_on_two_processes(shapes, tmp_path):
    shape, _ = shapes("40b", 1)
    config = str(REPO / "configs" / "falcon-40b-qlora.yaml")
    overlay = ["--config", str(REPO / "configs" / "strategy" / "deepspeed-zero3.yaml")]
    strategy = ["--trainer.strategy.class_path", "cpu_deepspeed.CPUDeepSpeedStrategy", "--trainer.devices", "2"]
    # No validation before training: under ZeRO-3 each forward gathers the whole model over gloo, and the
    # sanity check's generated samples take minutes here (the tiny ZeRO-3 runs of the slow tier cover them).
    strategy += ["--checkpoint.every_n_train_steps", "1", "--trainer.num_sanity_val_steps", "0"]
    out = run_fit(
        fit_arguments(config, shape, shapes.random_dir, tmp_path, 32, 1, *overlay, *strategy), tmp_path, CPU_DEEPSPEED
    )
    shards = re.findall(r"\[shards\] rank (\d): 4-bit storage (\d+) of (\d+) elements", out)
    assert len(shards) == 2, out[-3000:]
    full = int(shards[0][2])
    assert all(int(local) == full // 2 for _, local, _ in shards)  # each rank holds half
    assert "[adapter] LoRA weights identical on all 2 ranks" in out
    from safetensors.torch import load_file

    (adapter,) = tmp_path.rglob("adapter_model.safetensors")
    weights = load_file(adapter)
    assert len(weights) == 8 and all(t.numel() > 0 for t in weights.values())  # all 4 projections, gathered whole
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # B starts at 0: it trained
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    for shard in last.glob("checkpoint/*model_states.pt"):
        module = torch.load(shard, map_location="cpu", weights_only=False)["module"]
        assert module and all(".lora_A." in k or ".lora_B." in k for k in module), shard


def test_a_falcon_7b_shaped_gguf_export_loads_and_generates_in_llama_cpp(shapes, tmp_path):
    """The 7B trap: multi-query attention under a config that says 71 KV heads (tests/test_gguf.py)."""
    import llama_cpp_build

    from lightning_falcon.export.run import export

    shape, _ = shapes("7b", 2)
    config = str(REPO / "configs" / "falcon-7b-qlora.yaml")
    run_fit(fit_arguments(config, shape, shapes.random_dir, tmp_path, 64, 1), tmp_path)
    adapter = tmp_path / "runs" / "falcon-7b-midjourney" / "version_0" / "adapter"
    out = export(str(adapter), str(tmp_path / "gguf"), format="gguf", gguf_type="q8_0")
    (gguf_file,) = out.glob("*.gguf")
    got = llama_cpp_build.run({"model": str(gguf_file), "prompts": [[5, 6, 7, 8, 9]], "new_tokens": 8})
    assert got["n_vocab"] == VOCAB and got["metadata"]["falcon.attention.head_count_kv"] == "1"
    assert got["metadata"]["falcon.embedding_length"] == "4544" and got["metadata"]["falcon.block_count"] == "2"
    (continuation,) = got["continuations"]
    assert 0 < len(continuation) <= 8 and all(0 <= t < VOCAB for t in continuation)
