"""GPU: a Falcon-7B-shaped QLoRA at sequence lengths 512 and 2048 beside TRL's SFTTrainer, and Falcon-40B's memory
per layer. Random weights (`--model.random_init true`, no Hub), written once and loaded through the real 4-bit loader.

Both sides run configs/falcon-7b-qlora.yaml's settings (nf4 + double quantization, bf16, LoRA r 64 on
every projection, gradient checkpointing, AdamW) on the same pre-tokenized rows, each exactly `L`
tokens long (so no padding on either side), `tokens_per_step` tokens per step (batch = tokens_per_step / L).

**MFU** = achieved model FLOPs/s / the GPU's dense bf16 peak. Model FLOPs per token:
    4 * N_base + 6 * N_lora + 12 * n_layers * d_model * L
- 4 * N_base: the frozen base's matmuls (N_base = every Linear weight, lm_head included) run forward (2N)
  and backward for the input gradient only (2N); no weight gradient is computed for them;
- 6 * N_lora: LoRA weights train (forward, input and weight gradients);
- 12 * n_layers * d_model * L: attention scores and values (QK^T, AV), forward 4 and backward 8, not halved
  for causality.
The recomputation from activation checkpointing (one more forward, about 2 * N_base + 4 * n_layers * d_model * L
per token) is NOT counted: MFU counts the model's FLOPs, not the hardware's. 4-bit dequantization is not counted.

**Falcon-40B per layer**: `fit` on the 40B config with 1 and then 2 decoder layers; the difference in peak
memory is one layer's cost, `extrapolated` to its 60 layers and set beside `plan`'s figure.

    python benchmarks/gpu.py [--quick] [--only 7b|40b]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, alternate, median, table
from peer import as_flags
from shapes import falcon_shape

CONFIG_7B = str(REPO / "configs" / "falcon-7b-qlora.yaml")
CONFIG_40B = str(REPO / "configs" / "falcon-40b-qlora.yaml")
# Dense bf16 peak FLOPs/s by device name (NVIDIA data sheets, without sparsity).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def long_rows(path: Path, rows: int) -> Path:
    """Rows whose response runs past 2048 tokens of any tokenizer, so every row is cut to exactly `max_length`."""
    data = (REPO / "lightning_falcon/assets/data/midjourney.jsonl").read_text().splitlines()
    story = " ".join([json.loads(line)["response"] for line in data] * 3)
    path.write_text("".join(json.dumps({"prompt": f"mj prompt {i}", "response": story}) + "\n" for i in range(rows)))
    return path


def worker_args(steps: int, warmup: int, config: str, overrides: dict) -> list[str]:
    """This script's `--worker` arguments: `fit` or TRL on `config` with dotted `overrides`."""
    return ["--steps", str(steps), "--warmup", str(warmup), "--config", config, "--overrides", json.dumps(overrides)]


def model_flops_per_token(config_path: str, lora_r: int, length: int) -> float:
    """4 * N_base + 6 * N_lora + 12 * n_layers * d_model * L, from the architecture alone (meta device)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_falcon.assets import resolve
    from lightning_falcon.model.lora import FALCON_TARGET_MODULES

    config = AutoConfig.from_pretrained(resolve(config_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    base = sum(m.in_features * m.out_features for _, m in linears)
    lora = sum(
        lora_r * (m.in_features + m.out_features) for n, m in linears if n.rsplit(".", 1)[-1] in FALCON_TARGET_MODULES
    )
    return 4 * base + 6 * lora + 12 * config.num_hidden_layers * config.hidden_size * length


def seven_b(quick: bool, tokens_per_step: int) -> list[list]:
    steps, warmup = (8, 3) if quick else (30, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = long_rows(Path(tmp) / "long.jsonl", 400)
        for length in (512, 2048):
            overrides = {
                "model.random_init": True,
                "model.model_name_or_path": "asset:falcon-7b",
                "data.tokenizer": "asset:tiny-falcon",
                "data.dataset": str(data),
                "data.val_fraction": 0.01,
                "data.max_length": length,
                "data.batch_size": max(tokens_per_step // length, 1),
                "data.batching": "padded",
            }
            common = worker_args(steps, warmup, CONFIG_7B, overrides)
            results = alternate(
                {"fit": ["--worker", "fit", *common], "trl": ["--worker", "trl", *common]}, Path(__file__), 1
            )
            flops = model_flops_per_token("asset:falcon-7b", 64, length)
            peak = peak_flops(results["fit"][0].get("device", ""))
            for side in ("fit", "trl"):
                tps = median(results[side], "tokens_per_sec")
                mfu = f"{tps * flops / peak:.3f}" if peak else "n/a (unknown GPU peak)"
                rows.append(
                    [
                        length,
                        side,
                        overrides["data.batch_size"],
                        f"{tps:,.0f}",
                        mfu,
                        f"{median(results[side], 'peak_allocated_gib'):.2f}",
                        f"{median(results[side], 'peak_reserved_gib'):.2f}",
                    ]
                )
    return rows


def forty_b(quick: bool) -> list[list]:
    steps, warmup = (4, 1) if quick else (8, 3)
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = long_rows(Path(tmp) / "long.jsonl", 50)
        for layers in (1, 2):
            shape = falcon_shape("40b", layers, Path(tmp))
            overrides = {
                "model.random_init": True,
                "model.model_name_or_path": str(shape),
                "data.tokenizer": "asset:tiny-falcon",
                "data.dataset": str(data),
                "data.val_fraction": 0.05,
                "data.batching": "padded",
                "trainer.devices": 1,
                "trainer.num_nodes": 1,
                "trainer.strategy": "auto",
            }
            common = worker_args(steps, warmup, CONFIG_40B, overrides)
            peaks[layers] = alternate({"fit": ["--worker", "fit", *common]}, Path(__file__), 1)["fit"][0]
    per_layer = peaks[2]["peak_allocated_gib"] - peaks[1]["peak_allocated_gib"]
    rest = peaks[1]["peak_allocated_gib"] - per_layer
    return [
        ["1 layer, peak allocated (GiB)", f"{peaks[1]['peak_allocated_gib']:.2f}"],
        ["2 layers, peak allocated (GiB)", f"{peaks[2]['peak_allocated_gib']:.2f}"],
        ["per layer (GiB)", f"{per_layer:.3f}"],
        ["extrapolated to 60 layers on one GPU, no sharding (GiB)", f"{rest + 60 * per_layer:.1f}"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["7b", "40b"])
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--worker", choices=["fit", "trl"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--config", default=CONFIG_7B)
    parser.add_argument("--overrides", default="{}")
    args = parser.parse_args()
    if args.worker:
        from overhead import fit_worker
        from peer import trl_worker

        overrides = json.loads(args.overrides)
        if args.worker == "fit":
            return fit_worker(args.steps, args.warmup, as_flags(overrides), args.config)
        return trl_worker(args.steps, args.warmup, args.config, overrides)
    if args.only in (None, "7b"):
        print(f"## Falcon-7B shape, QLoRA ({args.tokens_per_step} tokens per step)\n")
        print(
            table(
                ["seq len", "side", "batch", "tokens/s", "MFU", "peak allocated GiB", "peak reserved GiB"],
                seven_b(args.quick, args.tokens_per_step),
            )
        )
    if args.only in (None, "40b"):
        print("\n## Falcon-40B shape: memory per decoder layer (one GPU, QLoRA, configs/falcon-40b-qlora.yaml)\n")
        print(table(["measure", "value"], forty_b(args.quick)))


if __name__ == "__main__":
    sys.exit(main())
