"""The scale tier (`-m scale`): each family at its real width, heads and vocabulary, with few layers.

What the narrow models of the fast tier cannot show: the real module names and shapes (Falcon's multi-query
attention against grouped KV heads and `new_decoder_architecture`, Falcon2-11B's untied output layer, Falcon3's
256-wide heads, Falcon-H1's Mamba-2 mixer beside its attention), the real vocabularies (65,024 to 131,072
tokens), the LoRA targets at r 64, what checkpoints hold, ZeRO-3 sharding of a full-width 40B and 180B layer over
2 processes, a Falcon-H1 layer training through transformers' PyTorch Mamba-2 path, and the planner's weight
bytes against a real load, to the byte. Random weights; the checkpoints are built once per session and shared.
The whole 7B and several 40B layers run in `benchmarks/scale.py`.
"""

import re
import sys
from dataclasses import dataclass, field

import pytest
import torch
from helpers import REPO
from processes import run_process
from test_distributed import CPU_DEEPSPEED
from torch import nn

sys.path.insert(0, str(REPO / "benchmarks"))
from shapes import fit_arguments, held_bytes, shape

from lightning_falcon.architectures import architecture
from lightning_falcon.model.lora import apply_lora, parameter_report
from lightning_falcon.model.memory import Setup, count_model, plan
from lightning_falcon.model.quantization import load_causal_lm, quantized_layers
from lightning_falcon.model.random_weights import random_checkpoint

pytestmark = pytest.mark.scale


@dataclass(frozen=True)
class Expected:
    """What a shape loads as: its width and vocabulary, and each decoder block's linear layers and norms."""

    hidden: int
    vocab: int
    tied: bool  # the output layer is the input embedding, stored once
    blocks: str  # where the decoder blocks sit
    quantized: dict[str, tuple[int, int]]  # every 4-bit linear layer of a block, by path: (in, out)
    norms: tuple[str, ...]
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)  # linear layers of a block left unquantized
    config: dict = field(default_factory=dict)  # config.json values the shape must keep


def falcon(hidden: int, qkv: int, mlp: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attention.query_key_value": (hidden, qkv),
        "self_attention.dense": (hidden, hidden),
        "mlp.dense_h_to_4h": (hidden, mlp),
        "mlp.dense_4h_to_h": (mlp, hidden),
    }


def llama(hidden: int, queries: int, keys: int, mlp: int, mlp_name: str = "mlp") -> dict[str, tuple[int, int]]:
    """A Llama-style block: q/k/v/o (queries and keys: heads x head_dim) and a gated MLP."""
    return {
        "self_attn.q_proj": (hidden, queries),
        "self_attn.k_proj": (hidden, keys),
        "self_attn.v_proj": (hidden, keys),
        "self_attn.o_proj": (queries, hidden),
        f"{mlp_name}.gate_proj": (hidden, mlp),
        f"{mlp_name}.up_proj": (hidden, mlp),
        f"{mlp_name}.down_proj": (mlp, hidden),
    }


# (shipped config, layers) -> what it must load as
SHAPES = {
    # multi-query: one K and one V head beside 71 queries
    ("falcon-7b", 2): Expected(4544, 65_024, True, "transformer.h", falcon(4544, 4544 + 2 * 64, 18176),
                               ("input_layernorm",), config={"new_decoder_architecture": False}),
    # 8 KV groups for 128 queries
    ("falcon-40b", 1): Expected(8192, 65_024, True, "transformer.h", falcon(8192, (128 + 2 * 8) * 64, 32768),
                                ("ln_attn", "ln_mlp"), config={"new_decoder_architecture": True}),
    # 8 KV groups for 232 queries, 14,848 wide: one layer is 2.2 billion weights
    ("falcon-180b", 1): Expected(14848, 65_024, True, "transformer.h", falcon(14848, (232 + 2 * 8) * 64, 59392),
                                 ("ln_attn", "ln_mlp"), config={"new_decoder_architecture": True}),
    # 128-wide heads, one norm before attention and MLP, and an output layer of its own
    ("falcon-11b", 2): Expected(4096, 65_024, False, "transformer.h", falcon(4096, (32 + 2 * 8) * 128, 16384),
                                ("input_layernorm",), config={"num_ln_in_parallel_attn": 1}),
    # LlamaForCausalLM: 12 query heads and 4 KV heads of 256
    ("falcon3-7b", 2): Expected(3072, 131_072, False, "model.layers", llama(3072, 12 * 256, 4 * 256, 23040),
                                ("input_layernorm", "post_attention_layernorm")),
    # attention (12 x 128: not the hidden width) beside a Mamba-2 mixer, whose in_proj makes the gate, the
    # convolution's x, B and C and one step size per head; its out_proj stays whole for the fused kernel
    ("falcon-h1-7b", 1): Expected(
        3072, 130_049, False, "model.layers",
        {**llama(3072, 12 * 128, 2 * 128, 12288, "feed_forward"), "mamba.in_proj": (3072, 2 * 3072 + 2 * 256 + 24)},
        ("input_layernorm", "pre_ff_layernorm"), kept={"mamba.out_proj": (3072, 3072)},
    ),
}  # fmt: skip


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """(shipped config, layers) -> (the shape's config directory, its random checkpoint), each built once."""
    root = tmp_path_factory.mktemp("shapes")
    built = {}

    def get(asset: str, layers: int):
        if (asset, layers) not in built:
            config = shape(asset, layers, root)
            built[asset, layers] = config, random_checkpoint(str(config), root / "random")
        return built[asset, layers]

    get.random_dir = root / "random"
    return get


@pytest.mark.parametrize("asset,layers", list(SHAPES), ids=[f"{a}-{n}" for a, n in SHAPES])
def test_real_width_loads_every_projection_4bit_and_the_planner_counts_its_bytes_exactly(shapes, asset, layers):
    expected = SHAPES[asset, layers]
    _, checkpoint = shapes(asset, layers)
    base = load_causal_lm(str(checkpoint), "nf4", True, torch.float32, torch.device("cpu"))
    family = architecture(base.config)
    assert {key: getattr(base.config, key) for key in expected.config} == expected.config
    embeddings, output = base.get_input_embeddings(), base.get_output_embeddings()
    assert embeddings.weight.shape == output.weight.shape == (expected.vocab, expected.hidden)
    assert (output.weight is embeddings.weight) is expected.tied  # tied: stored once
    assert type(output) is nn.Linear  # the output layer is never 4-bit
    block = base.get_submodule(expected.blocks)[0]
    assert all(hasattr(block, n) for n in expected.norms)
    quantized = quantized_layers(base)
    assert sorted(quantized) == sorted(f"{expected.blocks}.{i}.{n}" for i in range(layers) for n in expected.quantized)
    for name, layer in quantized.items():
        assert (layer.in_features, layer.out_features) == expected.quantized[name.split(".", 3)[3]], name
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
    for path, (n_in, n_out) in expected.kept.items():
        layer = block.get_submodule(path)
        assert type(layer) is nn.Linear and (layer.in_features, layer.out_features) == (n_in, n_out), path

    # the family's default targets are exactly its quantized layers (the kept ones are not LoRA targets)
    assert {path.rsplit(".", 1)[-1] for path in expected.quantized} == set(family.lora_targets)
    model = apply_lora(base, 64, 16, 0.1, family.lora_targets, gradient_checkpointing=True)
    lora = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * len(expected.quantized) * layers
    prefix = f"base_model.model.{expected.blocks}.0"
    for path, (n_in, n_out) in expected.quantized.items():
        assert lora[f"{prefix}.{path}.lora_A.default.weight"] == (64, n_in)
        assert lora[f"{prefix}.{path}.lora_B.default.weight"] == (n_out, 64)

    count = count_model(base.config, family.lora_targets, 64)
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


def run_fit(args: list[str], root, env: dict | None = None, timeout: float | None = None):
    import os

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    limit = {"timeout": timeout} if timeout else {}
    proc = run_process([sys.executable, "-m", "lightning_falcon", *args], cwd=root, env=environment, **limit)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_falcon_7b_real_width_trains_through_its_shipped_config_checkpoints_lora_and_resumes(shapes, tmp_path):
    config_dir, _ = shapes("falcon-7b", 2)
    config = str(REPO / "configs" / "falcon-7b-qlora.yaml")
    every = ("--checkpoint.every_n_train_steps", "2")
    run_fit(fit_arguments(config, config_dir, shapes.random_dir, tmp_path, 64, 2, *every), tmp_path)
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

    args = fit_arguments(config, config_dir, shapes.random_dir, tmp_path, 64, 3, "--ckpt_path", "last")
    out = run_fit(args, tmp_path)
    assert "step 2 of 3" in out and (tmp_path / "runs" / "falcon-7b-midjourney" / "version_1" / "adapter").is_dir()


def zero3_layer_run(shapes, tmp_path, asset: str, config_name: str, strategy: str, max_length: int, *extra: str) -> str:
    """One full-width layer of `asset` trained one step by `configs/config_name` under ZeRO-3 on 2 CPU processes;
    checks each rank holds half the 4-bit storage and the adapter and checkpoint hold only LoRA. The fit's output."""
    config_dir, _ = shapes(asset, 1)
    config = str(REPO / "configs" / config_name)
    overlay = ["--config", str(REPO / "configs" / "strategy" / "deepspeed-zero3.yaml")]
    two = ["--trainer.strategy.class_path", strategy, "--trainer.devices", "2"]
    # No validation before training: under ZeRO-3 each forward gathers the whole model over gloo, and the
    # sanity check's generated samples take minutes here (the tiny ZeRO-3 runs of the slow tier cover them).
    two += ["--checkpoint.every_n_train_steps", "1", "--trainer.num_sanity_val_steps", "0"]
    args = fit_arguments(config, config_dir, shapes.random_dir, tmp_path, max_length, 1, *overlay, *two, *extra)
    out = run_fit(args, tmp_path, CPU_DEEPSPEED, timeout=900)
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
    return out


def test_a_full_width_falcon_40b_layer_shards_under_zero3_on_two_processes(shapes, tmp_path):
    zero3_layer_run(shapes, tmp_path, "falcon-40b", "falcon-40b-qlora.yaml", "cpu_deepspeed.CPUDeepSpeedStrategy", 32)


def test_a_full_width_falcon_180b_layer_shards_under_zero3_on_two_processes(shapes, tmp_path):
    # Its 14,848-wide layer: 2.2 billion weights. In bf16, as on GPUs, and with the frozen weights left in bf16, so
    # that two ranks dequantizing its MLP at once fit this machine (fp32 would need 12 GiB a rank). 64 tokens: its
    # base-model template (`instruction`) leaves no reply token within 32.
    bf16 = ["--trainer.precision", "bf16-mixed", "--model.compute_dtype", "bf16", "--model.upcast_frozen", "false"]
    strategy = "cpu_deepspeed.OneLoadAtATime"
    out = zero3_layer_run(shapes, tmp_path, "falcon-180b", "falcon-180b-qlora.yaml", strategy, 64, *bf16)
    (full,) = {int(n) for n in re.findall(r"\[shards\] rank \d: 4-bit storage \d+ of (\d+) elements", out)}
    weights = sum(i * o for i, o in SHAPES["falcon-180b", 1].quantized.values())
    assert full == weights // 4  # 4 packed weights (2 bytes) per bf16 storage element


def test_a_falcon_h1_layer_trains_its_mamba_in_proj_on_cpu_through_its_shipped_config(shapes, tmp_path):
    """transformers' PyTorch Mamba-2 path (no mamba_ssm here): LoRA on in_proj gets a gradient and moves."""
    config_dir, _ = shapes("falcon-h1-7b", 1)
    config = str(REPO / "configs" / "falcon-h1-7b-qlora.yaml")
    run_fit(fit_arguments(config, config_dir, shapes.random_dir, tmp_path, 32, 2), tmp_path)
    from safetensors.torch import load_file

    (adapter,) = tmp_path.rglob("adapter_model.safetensors")
    weights = load_file(adapter)
    in_proj = {k.rsplit(".", 2)[-2]: t for k, t in weights.items() if ".mamba.in_proj." in k}
    assert in_proj["lora_A"].shape == (64, 3072) and in_proj["lora_B"].shape == (2 * 3072 + 2 * 256 + 24, 64)
    assert in_proj["lora_B"].abs().sum() > 0  # B starts at 0: a gradient reached it through the Mamba-2 scan
    assert not any("out_proj" in k or "conv1d" in k for k in weights)  # the fused kernel would bypass these
    assert len(weights) == 2 * 8  # q, k, v, o, in_proj, gate, up, down


def test_a_falcon_7b_shaped_gguf_export_loads_and_generates_in_llama_cpp(shapes, tmp_path):
    """The 7B trap: multi-query attention under a config that says 71 KV heads (tests/test_gguf.py)."""
    import llama_cpp_build

    from lightning_falcon.export.run import export

    config_dir, _ = shapes("falcon-7b", 2)
    config = str(REPO / "configs" / "falcon-7b-qlora.yaml")
    run_fit(fit_arguments(config, config_dir, shapes.random_dir, tmp_path, 64, 1), tmp_path)
    adapter = tmp_path / "runs" / "falcon-7b-midjourney" / "version_0" / "adapter"
    out = export(str(adapter), str(tmp_path / "gguf"), format="gguf", gguf_type="q8_0")
    (gguf_file,) = out.glob("*.gguf")
    got = llama_cpp_build.run({"model": str(gguf_file), "prompts": [[5, 6, 7, 8, 9]], "new_tokens": 8})
    vocab = SHAPES["falcon-7b", 2].vocab
    assert got["n_vocab"] == vocab and got["metadata"]["falcon.attention.head_count_kv"] == "1"
    assert got["metadata"]["falcon.embedding_length"] == "4544" and got["metadata"]["falcon.block_count"] == "2"
    (continuation,) = got["continuations"]
    assert 0 < len(continuation) <= 8 and all(0 <= t < vocab for t in continuation)


def test_one_dpo_step_at_falcon_7b_width_starts_at_ln_2_with_zero_rewards_and_saves_the_adapter(shapes, tmp_path):
    """DPO through the shipped 7B config (r 64 on the four projections, nf4, gradient checkpointing) on real-width
    pairs: one forward of the chosen and rejected sequences and one of the reference (the base, the adapter off).
    A fresh adapter's B is 0, so the policy is the reference: every pair's loss is -log sigmoid(0) = ln 2 and
    every reward 0 at step 0."""
    import math

    from helpers import scalars

    config_dir, _ = shapes("falcon-7b", 2)
    config = str(REPO / "configs" / "falcon-7b-qlora.yaml")
    pairs = ["--data.dataset.dataset", "asset:data/midjourney-preferences.jsonl", "--data.dataset.format", "preference"]
    pairs += ["--data.dataset.val_dataset", "asset:data/midjourney-preferences-val.jsonl", "--data.max_samples", "8"]
    dpo = ["--model.objective", "dpo", "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0"]
    out = run_fit(fit_arguments(config, config_dir, shapes.random_dir, tmp_path, 64, 1, *pairs, *dpo), tmp_path)
    run = tmp_path / "runs" / "falcon-7b-midjourney" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1, out[-3000:]
    logged = scalars(run)
    ((step, loss),) = logged["train/loss"]
    assert step == 0 and math.isfinite(loss) and loss == pytest.approx(math.log(2), abs=1e-4)
    for name in ("chosen", "rejected", "margins"):
        assert logged[f"train/rewards/{name}"] == [(0, 0.0)], name
    assert all(value < 0 for _, value in logged["train/logps/chosen"] + logged["train/logps/rejected"])
    from safetensors.torch import load_file

    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 16 and all(".lora_A." in k or ".lora_B." in k for k in weights)  # no reference copy
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # the step moved B off 0
