"""CPU: what Lightning and this package cost over a hand-written PyTorch + PEFT loop doing identical work.

Both sides train configs/tiny.yaml's model (the same 4-bit nf4 load and LoRA, through the package's
own loader) on the same batches in the same order (the package's tokenized cache and sampler), with
the same AdamW, schedule, gradient clipping and number of steps. `fit` keeps everything a user's fit
does per step (logging to TensorBoard, the progress bar, the gradient-norm and NaN checks, the
throughput meter); validation and periodic checkpoints are switched off, as the loop has neither.

    python benchmarks/overhead.py [--steps 200] [--warmup 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import (
    TINY_CONFIG,
    StepWindow,
    compare_sides,
    lightning_window_callback,
    report,
    sides_table,
    tiny_settings,
)


def fit_args(steps: int, warmup: int, logdir: str, extra: list[str] = (), config: str = str(TINY_CONFIG)) -> list[str]:
    return [
        "fit",
        "--config",
        config,
        *extra,
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--checkpoint.every_n_train_steps",
        str(steps + 1),
        "--trainer.logger.init_args.save_dir",
        logdir,
        f"--trainer.callbacks+={lightning_window_callback(warmup, steps)}",
    ]


def fit_worker(steps: int, warmup: int, extra: list[str], config: str = str(TINY_CONFIG)) -> None:
    """`python -m lightning_falcon fit --config CONFIG EXTRA...`, in this process, timed by `LightningWindow`."""
    from lightning_falcon.cli import main

    with tempfile.TemporaryDirectory() as logdir:
        main(fit_args(steps, warmup, logdir, extra, config))


def loop_worker(steps: int, warmup: int) -> None:
    """The hand-written loop: the package's loader and data, PEFT, torch's AdamW; nothing else."""
    import torch

    from lightning_falcon.assets import resolve
    from lightning_falcon.data import PromptDataModule
    from lightning_falcon.lora import FALCON_TARGET_MODULES, apply_lora
    from lightning_falcon.module import lr_lambda
    from lightning_falcon.quantization import load_causal_lm

    config = tiny_settings()
    m, d, t = config["model"], config["data"], config["trainer"]
    torch.manual_seed(config["seed_everything"])
    dm = PromptDataModule(**d, tokenizer=m["model_name_or_path"])
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    base = load_causal_lm(resolve(m["model_name_or_path"]), m["quantization"], True, torch.float32, torch.device("cpu"))
    model = apply_lora(base, m["lora_r"], m["lora_alpha"], m["lora_dropout"], FALCON_TARGET_MODULES, False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=m["learning_rate"], weight_decay=m["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(m["warmup_steps"], steps, m["lr_schedule"], 0.0))
    window, step, epoch = StepWindow(warmup, steps), 0, 0
    while step < steps:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            window.step_start(step, batch)
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t["gradient_clip_val"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.step_end(step, loss)
            step += 1
            if step == steps:
                break
        epoch += 1
    report(window.result())


def compare(steps: int, warmup: int, repeats: int) -> dict:
    return compare_sides(Path(__file__), ("fit", "loop"), steps, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["fit", "loop"])
    args, extra = parser.parse_known_args()
    if args.worker == "fit":
        return fit_worker(args.steps, args.warmup, extra)
    if args.worker == "loop":
        return loop_worker(args.steps, args.warmup)
    out = compare(args.steps, args.warmup, args.repeats)
    print(sides_table(out, ("fit", "loop")))
    print(
        f"\noverhead ratio fit / loop: {out['ratio']['floor']:.3f} step-by-step floor (target >= 0.95), "
        f"{out['ratio']['median']:.3f} median of {args.repeats} runs"
    )


if __name__ == "__main__":
    sys.exit(main())
