"""CPU: `fit` against TRL's `SFTTrainer` + PEFT: tokens/s and peak RSS on the same model, data and settings.

Both sides get configs/tiny.yaml's model built the same way (the package's 4-bit loader, then PEFT's
`prepare_model_for_kbit_training` and LoRA, handed to SFTTrainer as a ready PEFT model, as TRL's QLoRA
recipes do) and the same tokenized rows with the same labels (SFTTrainer takes a pre-tokenized
dataset with `labels` as is). Optimizer, schedule, clipping, batch size, max length, length grouping and
steps match; SFTConfig's own defaults that differ (gradient checkpointing and bf16 on) follow the config.
Each side runs in its own process, alternating, so each peak RSS is that side's alone.

    pip install -e ".[bench]"     # TRL
    python benchmarks/peer.py [--steps 200] [--warmup 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import TINY_CONFIG, StepWindow, compare_sides, fused_adamw, report, sides_table
from overhead import fit_worker


def settings(config: str, overrides: dict) -> dict:
    """A config's sections with dotted `overrides` applied, as the CLI applies `--data.max_length 512`."""
    import yaml

    out = yaml.safe_load(Path(config).read_text())
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def as_flags(overrides: dict) -> list[str]:
    """The same overrides as `fit` flags."""
    return [arg for key, value in overrides.items() for arg in (f"--{key}", json.dumps(value).strip('"'))]


def trl_optimizer(model: dict) -> str:
    """The transformers `optim` that steps what `fit` steps with these `model:` settings."""
    if model.get("optimizer") == "paged_adamw_8bit":
        return "paged_adamw_8bit"
    return "adamw_torch_fused" if fused_adamw(model) else "adamw_torch"


def trl_worker(
    steps: int,
    warmup: int,
    config: str = str(TINY_CONFIG),
    overrides: dict | None = None,
    anon_memory: bool = False,
) -> None:
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lightning_falcon.architectures import FALCON
    from lightning_falcon.assets import resolve
    from lightning_falcon.data import PromptDataModule
    from lightning_falcon.model.lora import apply_lora
    from lightning_falcon.model.quantization import load_causal_lm, resolve_compute_dtype
    from lightning_falcon.model.random_weights import random_checkpoint

    c = settings(config, overrides or {})
    m, d, t = c["model"], c["data"], c["trainer"]
    torch.manual_seed(c["seed_everything"])
    d.setdefault("tokenizer", m["model_name_or_path"])
    dm = PromptDataModule(**d)
    dm.prepare_data()
    dm.setup("fit")
    rows = dm._splits["train"].with_format(None).remove_columns(["input"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve(m["model_name_or_path"])
    if m.get("random_init"):  # the checkpoint `fit --model.random_init true` writes and loads: the same weights
        path = str(random_checkpoint(path, m.get("random_init_dir", "~/.cache/lightning_falcon/random")))
    base = load_causal_lm(
        path, m["quantization"], m.get("double_quant", True), resolve_compute_dtype(m["compute_dtype"], device), device
    )
    checkpointing = m.get("gradient_checkpointing", False)
    model = apply_lora(base, m["lora_r"], m["lora_alpha"], m["lora_dropout"], FALCON.lora_targets, checkpointing)
    if device.type == "cuda":  # training's peak, not the load's: as fit reports it
        torch.cuda.reset_peak_memory_stats()
    window = StepWindow(warmup, steps, anon_memory)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=d["batch_size"],
            # fit's accumulation and optimizer (the window counts each micro-batch's tokens on both sides)
            gradient_accumulation_steps=t.get("accumulate_grad_batches", 1),
            learning_rate=m["learning_rate"],
            weight_decay=m.get("weight_decay", 0.0),
            lr_scheduler_type=m.get("lr_schedule", "cosine"),
            warmup_steps=m.get("warmup_steps", 0),
            max_grad_norm=t.get("gradient_clip_val") or 0.0,
            optim=trl_optimizer(m),
            logging_steps=t.get("log_every_n_steps", 50),
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            use_cpu=device.type == "cpu",
            bf16=str(t.get("precision", "")).startswith("bf16"),
            fp16=False,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            max_length=d["max_length"],
            packing=d.get("batching") == "packed",
            train_sampling_strategy="group_by_length" if d.get("batching") == "grouped" else "random",
            seed=c["seed_everything"],
            dataloader_num_workers=d.get("num_workers", 0),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=dm.tokenizer)

        class Window(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                window.step_end(state.global_step - 1)

        def count(module, args, kwargs):
            if module.training:
                window.step_start(trainer.state.global_step, kwargs)

        trainer.add_callback(Window())
        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        trainer.train()
    report(window.result())


def compare(steps: int, warmup: int, repeats: int) -> dict:
    return compare_sides(Path(__file__), ("fit", "trl"), steps, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["fit", "trl"])
    args, extra = parser.parse_known_args()
    if args.worker == "fit":
        return fit_worker(args.steps, args.warmup, extra)
    if args.worker == "trl":
        return trl_worker(args.steps, args.warmup)
    out = compare(args.steps, args.warmup, args.repeats)
    print(sides_table(out, ("fit", "trl")))
    ratio = out["ratio"]
    print(
        f"\ntokens/s fit / TRL: {ratio['floor']:.3f} step-by-step floor, {ratio['median']:.3f} median of {args.repeats}"
    )


if __name__ == "__main__":
    sys.exit(main())
