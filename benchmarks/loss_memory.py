"""CPU: the memory of a training step at Falcon-7B's (or -40B's) width and vocabulary, ours beside TRL's.

The shape of the scale tier: configs/falcon-7b-qlora.yaml's model (nf4 + double quantization, LoRA r 64
on the four projections, gradient checkpointing) at falcon-7b's shape with 2 of its 32 layers (or, with
`--size 40b`, falcon-40b's with 1 of 60), random weights, at the real width (4,544; 8,192), heads (71
with one key/value head; 128 in 8 groups) and vocabulary (65,024); one sequence of 2,048 tokens per
step. Four sides, each in its own process, on the same rows, weights and settings:

- `fit, whole logits`: `fit --model.loss_chunk_size null`, the model's own loss over all the logits;
- `fit, transformers' attention`: `fit --model.fused_attention false`, Falcon's attention as transformers
  runs it (on 7B, SDPA's math kernel; on 40B, keys and values copied to all 128 heads);
- `fit`: `fit` as shipped: the chunked loss (model/loss.py) and attention on SDPA's fused kernels
  (model/attention.py);
- `TRL`: `SFTTrainer` + PEFT, as benchmarks/peer.py builds it (transformers' attention).

The figure is the peak anonymous memory (RssAnon) of the process from the first step's start to the
last step's end: forward, backward and optimizer step, the optimizer state included. Beside it, what
`plan` counts for the same step (LoRA gradients and optimizer state, activations, attention, logits and
the dequantized layer, without the 1 GiB it reserves for CUDA). CPU-only changes to the config, on
every side alike: fp32 compute, torch's AdamW, the shipped tiny tokenizer.

    pip install -e ".[bench]"     # TRL
    python benchmarks/loss_memory.py [--size 7b] [--steps 2] [--max-length 2048] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from common import REPO, device_line, run_worker, table, versions
from overhead import fit_args
from peer import as_flags, trl_worker
from shapes import falcon_shape

CONFIG_7B = str(REPO / "configs" / "falcon-7b-qlora.yaml")


def long_rows(path: Path, rows: int, tokens: int) -> Path:
    """`rows` prompt/response rows whose response runs past `tokens` tokens of the tiny tokenizer, so
    every row is cut to exactly `max_length` and every step trains the same number of tokens."""
    source = [json.loads(line) for line in (REPO / "lightning_falcon/assets/data/midjourney.jsonl").open()]
    with path.open("w") as f:
        for i in range(rows):
            row = source[i % len(source)]
            response = " ".join(r["response"] for r in source[i : i + tokens // 8])  # > 8 tokens a response
            f.write(json.dumps({"prompt": row["prompt"], "response": response}) + "\n")
    return path


def overrides(work: Path, size: str, max_length: int, layers: int) -> dict:
    shape = falcon_shape(size, layers, work)
    return {
        "model.model_name_or_path": str(shape),
        "model.random_init": True,
        "model.random_init_dir": str(work / "random"),
        "model.compute_dtype": "fp32",
        "model.optimizer": "adamw",
        "data.dataset": str(long_rows(work / "long.jsonl", 16, max_length)),
        "data.tokenizer": "asset:tiny-falcon",
        "data.cache_dir": str(work / "cache"),
        "data.batch_size": 1,
        "data.max_length": max_length,
        "trainer.accelerator": "cpu",
        "trainer.precision": "32-true",
        "trainer.accumulate_grad_batches": 1,
        "trainer.enable_progress_bar": False,
    }


def fit_worker(steps: int, warmup: int, flags: list[str]) -> None:
    from common import lightning_window_callback

    from lightning_falcon.commands.main import main

    timer = lightning_window_callback(warmup, steps, anon_memory=True)
    with tempfile.TemporaryDirectory() as logdir:
        main(fit_args(steps, warmup, logdir, flags, CONFIG_7B, timer))


def planned_step_mib(settings: dict, loss_chunk_size: int | None, fused_attention: bool) -> float:
    """What `plan` counts for a training step of these settings on one device, in MiB: everything a step adds to
    the loaded model (the weights are counted apart), without the CUDA reserve."""
    from lightning_falcon.commands.cli import parse_only
    from lightning_falcon.commands.plan import PlanCLI, setup_of
    from lightning_falcon.model.config import read_model_config
    from lightning_falcon.model.memory import WORKSPACE_RESERVE, count_model, plan

    config = parse_only(PlanCLI, ["--config", CONFIG_7B, *as_flags(settings)], "plan").config
    model = config.model
    count = count_model(read_model_config(model.model_name_or_path), model.target_modules, model.lora_r)
    setup = replace(
        setup_of(model, config.data, config.trainer, 1),
        loss_chunk_size=loss_chunk_size,
        fused_attention=fused_attention,
        attn_implementation="sdpa",  # what `model.attn_implementation: null` is on CPU
    )
    rows = plan(count, setup, "single").rows
    step = ("LoRA gradients", "LoRA optimizer states", "activations", "attention", "logits", "workspace")
    return (sum(rows[r] for r in step) - WORKSPACE_RESERVE) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="steps per side; the first is left out of tokens/s")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--size", choices=["7b", "40b"], default="7b", help="the shape: falcon-7b's or falcon-40b's")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 2 for 7b, 1 for 40b)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the shape, weights and data here")
    parser.add_argument("--sides", default=None, help="comma-separated sides to run (default: all four)")
    parser.add_argument("--worker", choices=["fit", "trl"])
    parser.add_argument("--overrides", type=str, default="{}")
    args, extra = parser.parse_known_args()
    warmup = 1 if args.steps > 1 else 0
    layers = args.layers or {"7b": 2, "40b": 1}[args.size]
    if args.worker == "fit":
        return fit_worker(args.steps, warmup, extra)
    if args.worker == "trl":
        return trl_worker(args.steps, warmup, CONFIG_7B, json.loads(args.overrides), anon_memory=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        settings = overrides(work, args.size, args.max_length, layers)
        fit = ["--worker", "fit", "--steps", str(args.steps), *as_flags(settings)]
        workers = {  # side: (arguments, the loss chunk and the attention `plan` counts for it)
            "fit, whole logits": ([*fit, "--model.loss_chunk_size", "null"], None, True),
            "fit, transformers' attention": ([*fit, "--model.fused_attention", "false"], 256, False),
            "fit": (fit, 256, True),
            "TRL": (["--worker", "trl", "--steps", str(args.steps), "--overrides", json.dumps(settings)], None, False),
        }
        if args.sides:
            workers = {side: workers[side] for side in args.sides.split(",")}
        results = {side: run_worker(Path(__file__), *argv, timeout=3600) for side, (argv, _, _) in workers.items()}
        planned = {side: planned_step_mib(settings, chunk, fused) for side, (_, chunk, fused) in workers.items()}
    trl = results["TRL"]["anon_peak_mib"]
    rows = [
        [
            side,
            f"{r['anon_before_mib']:,.0f}",
            f"{r['anon_peak_mib']:,.0f}",
            f"{r['anon_peak_mib'] - r['anon_before_mib']:,.0f}",
            f"{r['anon_peak_mib'] / trl:.2f}",
            f"{planned[side]:,.0f}",
            f"{r['tokens_per_sec']:,.1f}",
            f"{r['losses'][0]:.4f}" if r["losses"] else "",
        ]
        for side, r in results.items()
    ]
    print(f"{device_line()}; {versions()}")
    print(
        f"falcon-{args.size} shape, {layers} layer(s), vocabulary 65,024, batch 1 x {args.max_length} tokens, "
        f"{args.steps} steps (tokens/s over the last {args.steps - warmup})\n"
    )
    header = [
        "side", "RssAnon before steps, MiB", "peak, MiB", "peak - before", "peak / TRL", "plan's step, MiB",
        "tokens/s", "loss",
    ]  # fmt: skip
    print(table(header, rows))


if __name__ == "__main__":
    sys.exit(main())
