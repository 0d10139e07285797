"""GPU: a Falcon-7B-shaped QLoRA at sequence lengths 512 and 2048 beside TRL's SFTTrainer, and Falcon-40B's memory
per layer. Random weights (`--model.random_init true`, no Hub), written once and loaded through the real 4-bit loader.

The 7B shape is falcon-7b's config.json (real width, multi-query attention, real vocabulary) with 4 decoder layers:
every per-token figure of the 32-layer model but the layer count, and a few seconds to build instead of minutes.

Both sides run configs/falcon-7b-qlora.yaml's settings (nf4 + double quantization, bf16, LoRA r 64 on every
projection, gradient checkpointing, paged 8-bit AdamW, 4 micro-batches per optimizer step) on the same
pre-tokenized rows, each exactly `L` tokens long (so no padding on either side), `tokens_per_batch` tokens per
micro-batch (batch = tokens_per_batch / L). TRL is handed the same optimizer and accumulation; without `trl`
its side is skipped with a line saying so.

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
memory is one layer's cost, extrapolated to its 60 layers and set beside `plan`'s estimate for one GPU.

Each table prints as soon as its section ends, each worker's figures as soon as it ends, and everything
also goes to `--json`.

    python benchmarks/gpu.py [--only 7b|40b] [--json runs/gpu-benchmark.json]
    python benchmarks/gpu.py --dry-run     # CPU, every step but CUDA: tiny shapes, fp32, a few steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

from common import REPO, device_line, run_worker, table, versions
from peer import as_flags
from shapes import falcon_shape

CONFIG_7B = str(REPO / "configs" / "falcon-7b-qlora.yaml")
CONFIG_40B = str(REPO / "configs" / "falcon-40b-qlora.yaml")
# Dense bf16 peak FLOPs/s by device name (NVIDIA data sheets, without sparsity).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


class Run:
    """What differs between the GPU run and its CPU dry run: the shapes' width, the lengths, the step counts and
    the settings a CPU needs (fp32: bitsandbytes' bf16 4-bit path on CPU is far slower)."""

    def __init__(self, dry_run: bool, steps: int | None, warmup: int | None) -> None:
        self.dry_run = dry_run
        self.lengths = (64, 128) if dry_run else (512, 2048)
        self.tokens_per_batch = 256 if dry_run else 2048
        # with the 1% held out (rounded up), 40 and 200 training rows: whole micro-batches at every length
        self.rows = 41 if dry_run else 203
        self.steps = steps or (3 if dry_run else 10)
        self.warmup = warmup if warmup is not None else (1 if dry_run else 3)
        self.layers_7b = 2 if dry_run else 4

    def overrides(self, shape: Path, data: Path, root: Path, val_fraction: float, **data_settings) -> dict:
        """A worker's dotted overrides: random weights of `shape`, the rows in `data` padded (each is cut to exactly
        the length, so nothing pads) with `val_fraction` held out, one device of this machine, caches under `root`,
        and `data_settings`."""
        machine = {"trainer.devices": 1}
        if self.dry_run:
            machine.update(
                {"trainer.accelerator": "cpu", "trainer.precision": "32-true", "model.compute_dtype": "fp32"}
            )
        return {
            **machine,
            "model.random_init": True,
            "model.random_init_dir": str(root / "random"),
            "model.model_name_or_path": str(shape),
            "data.tokenizer": "asset:tiny-falcon",
            "data.dataset": {"dataset": str(data), "val_fraction": val_fraction},
            "data.cache_dir": str(root / "cache"),
            "data.batching": "padded",
            **{f"data.{key}": value for key, value in data_settings.items()},
        }

    def shape(self, size: str, layers: int, root: Path) -> Path:
        """falcon-`size` with `layers` decoder layers (`shapes.falcon_shape`). The dry run shrinks the width (hidden
        128, 4 heads, KV heads kept below them) and the vocabulary to the tiny tokenizer's, keeping the
        architecture (multi-query 7B, grouped-query 40B)."""
        if not self.dry_run:
            return falcon_shape(size, layers, root)
        grouped = {"num_kv_heads": 2} if size == "40b" else {}
        return falcon_shape(
            size, layers, root, "-dry", hidden_size=128, num_attention_heads=4, vocab_size=1024, **grouped
        )


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def long_rows(path: Path, rows: int) -> Path:
    """Rows whose response runs past 2048 tokens of the tiny tokenizer, so every row is cut to exactly `max_length`."""
    data = (REPO / "lightning_falcon/assets/data/midjourney.jsonl").read_text().splitlines()
    story = " ".join(json.loads(line)["response"] for line in data[:60])
    path.write_text("".join(json.dumps({"prompt": f"mj prompt {i}", "response": story}) + "\n" for i in range(rows)))
    return path


def worker_args(steps: int, warmup: int, config: str, overrides: dict) -> list[str]:
    """This script's `--worker` arguments: `fit` or TRL on `config` with dotted `overrides`."""
    return ["--steps", str(steps), "--warmup", str(warmup), "--config", config, "--overrides", json.dumps(overrides)]


def model_flops_per_token(config_dir: str, lora_r: int, length: int) -> float:
    """4 * N_base + 6 * N_lora + 12 * n_layers * d_model * L, from the architecture alone (meta device)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_falcon.architectures import FALCON

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    base = sum(m.in_features * m.out_features for _, m in linears)
    lora = sum(
        lora_r * (m.in_features + m.out_features) for n, m in linears if n.rsplit(".", 1)[-1] in FALCON.lora_targets
    )
    return 4 * base + 6 * lora + 12 * config.num_hidden_layers * config.hidden_size * length


def gib(result: dict, key: str) -> str:
    """A CUDA memory figure of a worker's result, or n/a (none on CPU)."""
    return f"{result[key]:.2f}" if key in result else "n/a (no GPU)"


def trl_missing() -> str | None:
    """Why TRL's side cannot run here, or None."""
    try:
        import trl  # noqa: F401
    except ImportError as e:
        return f"TRL side skipped: trl does not import here ({e}). pip install -e '.[bench]' adds it"
    return None


def seven_b(run: Run, data: Path, root: Path, say) -> dict:
    """fit beside TRL at each sequence length, on the 7B shape."""
    shape = run.shape("7b", run.layers_7b, root)
    skip = trl_missing()
    if skip:
        say(skip)
    rows, raw = [], {}
    for length in run.lengths:
        batch_size = max(run.tokens_per_batch // length, 1)
        overrides = run.overrides(shape, data, root, val_fraction=0.01, max_length=length, batch_size=batch_size)
        flops = model_flops_per_token(str(shape), 64, length)
        for side in ("fit",) if skip else ("fit", "trl"):
            result = run_worker(
                Path(__file__), "--worker", side, *worker_args(run.steps, run.warmup, CONFIG_7B, overrides)
            )
            peak = peak_flops(result.get("device", ""))
            tps = result["tokens_per_sec"]
            mfu = f"{tps * flops / peak:.3f}" if peak else "n/a (no known bf16 peak)"
            row = [length, side, overrides["data.batch_size"], f"{tps:,.0f}", mfu]
            row += [gib(result, "peak_allocated_gib"), gib(result, "peak_reserved_gib")]
            say(f"[7b, L={length}, {side}] {tps:,.0f} tokens/s, MFU {mfu}, peak allocated {row[5]} GiB")
            rows.append(row)
            raw[f"{length}/{side}"] = result
    header = ["seq len", "side", "micro-batch", "tokens/s", "MFU", "peak allocated GiB", "peak reserved GiB"]
    return {"shape": str(shape), "header": header, "rows": rows, "runs": raw, "skipped": skip}


def plan_one_gpu_gib(shape: Path, batch_size: int, max_length: int) -> float:
    """`plan`'s per-GPU total for the 40B config on one GPU at this architecture, at this batch."""
    from transformers import AutoConfig

    from lightning_falcon.architectures import FALCON
    from lightning_falcon.commands.cli import parse_only
    from lightning_falcon.commands.plan import PlanCLI, setup_of
    from lightning_falcon.model.memory import count_model, plan

    sizes = ["--data.batch_size", str(batch_size), "--data.max_length", str(max_length)]
    config = parse_only(PlanCLI, ["--config", CONFIG_40B, *sizes], "plan").config
    model = config.model
    count = count_model(AutoConfig.from_pretrained(shape), model.target_modules or FALCON.lora_targets, model.lora_r)
    return plan(count, setup_of(model, config.data, config.trainer, 1), "single").total / 2**30


def forty_b(run: Run, data: Path, root: Path, say) -> dict:
    """Peak memory of the 40B config with 1 and 2 decoder layers: one layer's cost, extrapolated to 60."""
    peaks, raw = {}, {}
    batch_size, max_length = 1, run.lengths[0]
    for layers in (1, 2):
        shape = run.shape("40b", layers, root)
        overrides = run.overrides(shape, data, root, val_fraction=0.05, max_length=max_length, batch_size=batch_size)
        overrides.update({"trainer.num_nodes": 1, "trainer.strategy": "auto"})
        result = run_worker(
            Path(__file__), "--worker", "fit", *worker_args(run.steps, run.warmup, CONFIG_40B, overrides)
        )
        raw[layers] = result
        peaks[layers] = result.get("peak_allocated_gib")
        say(f"[40b, {layers} layer(s)] peak allocated {gib(result, 'peak_allocated_gib')} GiB")
    planned = plan_one_gpu_gib(run.shape("40b", 60, root), batch_size, max_length)
    rows = [
        ["1 layer, peak allocated (GiB)", gib(raw[1], "peak_allocated_gib")],
        ["2 layers, peak allocated (GiB)", gib(raw[2], "peak_allocated_gib")],
    ]
    if peaks[1] is not None and peaks[2] is not None:
        per_layer = peaks[2] - peaks[1]
        rows += [
            ["per layer (GiB)", f"{per_layer:.3f}"],
            ["extrapolated to 60 layers on one GPU, no sharding (GiB)", f"{peaks[1] - per_layer + 60 * per_layer:.1f}"],
        ]
    rows.append(
        [f"plan's estimate for 60 layers on one GPU, batch {batch_size} x {max_length} (GiB)", f"{planned:.1f}"]
    )
    return {"header": ["measure", "value"], "rows": rows, "runs": raw}


def write_json(path: Path, results: dict) -> None:
    """The results so far, swapped in whole: a run stopped later still leaves every finished section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(staged, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on CPU, tiny shapes: every code path but CUDA")
    parser.add_argument("--only", choices=["7b", "40b"])
    parser.add_argument("--json", default="runs/gpu-benchmark.json", help="where every figure is also written")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a worker runs (default 10; dry 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 3; dry 1)")
    parser.add_argument("--worker", choices=["fit", "trl"])
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

    def say(line: str) -> None:
        print(line, flush=True)

    run = Run(args.dry_run, args.steps, args.warmup)
    out = Path(args.json)
    results = {
        "date": datetime.date.today().isoformat(),
        "device": device_line(),
        "versions": versions(),
        "dry_run": args.dry_run,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    say(f"{results['device']}; {results['versions']}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = long_rows(root / "long.jsonl", run.rows)
        if args.only in (None, "7b"):
            section = seven_b(run, data, root, say)
            results["7b"] = section
            write_json(out, results)
            title = f"Falcon-7B shape ({run.layers_7b} layers), QLoRA, {run.tokens_per_batch} tokens a micro-batch"
            say(f"\n## {title}\n\n{table(section['header'], section['rows'])}\n")
        if args.only in (None, "40b"):
            section = forty_b(run, data, root, say)
            results["40b"] = section
            write_json(out, results)
            title = "Falcon-40B shape: memory per decoder layer (one GPU, QLoRA, configs/falcon-40b-qlora.yaml)"
            say(f"\n## {title}\n\n{table(section['header'], section['rows'])}\n")
    say(f"all figures: {out}")


if __name__ == "__main__":
    sys.exit(main())
