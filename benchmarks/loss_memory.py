"""CPU: the memory of a training step at Falcon-7B's width and vocabulary, ours beside TRL's.

The shape of the scale tier: configs/falcon-7b-qlora.yaml's model (nf4 + double quantization, LoRA r 64
on the four projections, gradient checkpointing) with 2 of its 32 layers, random weights, at the real
width (4,544) and vocabulary (65,024); one sequence of 2,048 tokens per step. Three sides, each in its
own process, on the same rows, weights and settings:

- `fit, whole logits`: `fit --model.loss_chunk_size null`, the model's own loss over all the logits;
- `fit`: `fit` as shipped, the chunked loss (model/loss.py);
- `TRL`: `SFTTrainer` + PEFT, as benchmarks/peer.py builds it.

The figure is the peak anonymous memory (RssAnon) of the process from the first step's start to the
last step's end: forward, backward and optimizer step, the optimizer state included. CPU-only changes
to the config, on every side alike: fp32 compute, torch's AdamW, the shipped tiny tokenizer.

    pip install -e ".[bench]"     # TRL
    python benchmarks/loss_memory.py [--steps 2] [--max-length 2048] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, device_line, run_worker, table, versions
from overhead import fit_args
from peer import as_flags, trl_worker
from shapes import falcon_shape

CONFIG_7B = str(REPO / "configs" / "falcon-7b-qlora.yaml")
SIDES = ("fit, whole logits", "fit", "TRL")


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


def overrides(work: Path, max_length: int, layers: int) -> dict:
    shape = falcon_shape("7b", layers, work)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="steps per side; the first is left out of tokens/s")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the shape, weights and data here")
    parser.add_argument("--worker", choices=["fit", "trl"])
    parser.add_argument("--overrides", type=str, default="{}")
    args, extra = parser.parse_known_args()
    warmup = 1 if args.steps > 1 else 0
    if args.worker == "fit":
        return fit_worker(args.steps, warmup, extra)
    if args.worker == "trl":
        return trl_worker(args.steps, warmup, CONFIG_7B, json.loads(args.overrides), anon_memory=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        settings = overrides(work, args.max_length, args.layers)
        common = ["--steps", str(args.steps)]
        workers = {
            "fit, whole logits": ["--worker", "fit", *common, *as_flags(settings), "--model.loss_chunk_size", "null"],
            "fit": ["--worker", "fit", *common, *as_flags(settings)],
            "TRL": ["--worker", "trl", *common, "--overrides", json.dumps(settings)],
        }
        results = {side: run_worker(Path(__file__), *argv, timeout=3600) for side, argv in workers.items()}
    trl = results["TRL"]["anon_peak_mib"]
    rows = [
        [
            side,
            f"{r['anon_before_mib']:,.0f}",
            f"{r['anon_peak_mib']:,.0f}",
            f"{r['anon_peak_mib'] - r['anon_before_mib']:,.0f}",
            f"{r['anon_peak_mib'] / trl:.2f}",
            f"{r['tokens_per_sec']:,.1f}",
            f"{r['losses'][0]:.4f}" if r["losses"] else "",
        ]
        for side, r in results.items()
    ]
    print(f"{device_line()}; {versions()}")
    print(
        f"falcon-7b width, {args.layers} layers, vocabulary 65,024, batch 1 x {args.max_length} tokens, "
        f"{args.steps} steps (tokens/s over the last {args.steps - warmup})\n"
    )
    header = ["side", "RssAnon before steps, MiB", "peak, MiB", "peak - before", "peak / TRL", "tokens/s", "loss"]
    print(table(header, rows))


if __name__ == "__main__":
    sys.exit(main())
