"""CPU: `fit --model.objective dpo` against TRL's `DPOTrainer`: tokens/s and peak anonymous memory, side by side.

Both sides train configs/tiny-dpo.yaml's model and settings with a fresh LoRA (`--model.adapter null`), so both
references are the base with the adapter switched off, on the shipped preference pairs:

- the model: tiny-falcon through the package's 4-bit loader (nf4, double quantization, fp32 compute), the base
  prepared as `fit` prepares it (PEFT's `prepare_model_for_kbit_training`), LoRA r 16 / alpha 32 / dropout 0 on
  the same four projections: `fit` through `apply_lora`, TRL from the same `LoraConfig` as `peft_config`.
  TRL casts a quantized model's LoRA weights to bf16; they are cast back to fp32 here (fp32 on both sides; the
  optimizer is not built yet), unless `--trl-bf16-lora` keeps TRL's cast.
- the data: the same tokens. TRL gets each pair as `fit` tokenized it (the instruction template, EOS, the same
  cut to max length 128), split into `prompt_ids` / `chosen_ids` / `rejected_ids` (its own tokenizing skipped,
  as benchmarks/peer.py hands SFTTrainer tokenized rows), and `fit`'s own sampler (length-grouped, seeded), so
  both train the same batches of 8 pairs (16 sequences) in the same order: checked, run by run.
- the step: sigmoid DPO, beta 0.1, torch's fused AdamW, lr 1e-3 with 10 warmup steps and a cosine decay,
  gradient clipping at 1.0, no accumulation, dropout off (`DPOConfig(disable_dropout=True)`), the reference's
  log-probabilities computed at every step (`precompute_ref_log_probs=False`).
Each side keeps its own attention (fit: `model/attention.py`; TRL: transformers' SDPA) and its own log-probability
kernel (fit: `model/preference.py`, 256 positions at a time; TRL: its fused LM head).

Tokens/s: the real tokens (attention mask ones: prompt and answer) of every chosen and rejected sequence of steps
`warmup` .. `steps - 1`, over those steps' time start to start; the first `warmup` steps are left out on both
sides alike. Peak memory: the process's anonymous memory (RssAnon, /proc/self/status), sampled every 5 ms from the
first step on, which leaves out the mmapped weights and counts the model, the optimizer and the steps. Each side
runs in its own process, the sides alternating, `--repeats` times; `floor` and `median` as in benchmarks/common.py.

    pip install -e ".[bench]"     # TRL
    python benchmarks/preference.py [--steps 50] [--warmup 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from statistics import mean

from common import (
    REPO,
    StepWindow,
    alternate,
    device_line,
    floor_rate,
    fused_adamw,
    lightning_window_callback,
    median,
    report,
    table,
    versions,
)
from overhead import fit_worker
from peer import settings, trl_optimizer

CONFIG = REPO / "configs" / "tiny-dpo.yaml"
SIDES = ("fit", "trl")
# `fit` from a fresh LoRA: no SFT adapter to start from, so the reference is the base with the adapter switched off
FIT_FLAGS = ["--model.objective", "dpo", "--model.adapter", "null", "--model.precompute_reference", "false"]


def pair_rows(rows) -> list[dict]:
    """`fit`'s tokenized pairs as TRL's tokenized columns: the shared request, then each answer (the labelled tail)."""
    from lightning_falcon.data.prompts import prompt_length

    out = []
    for r in rows:
        n = prompt_length(r["labels"])
        if n != prompt_length(r["rejected_labels"]) or r["input_ids"][:n] != r["rejected_ids"][:n]:
            raise RuntimeError("a pair whose two sequences differ before the answers: TRL's rows share one prompt")
        if r["labels"][n:] != r["input_ids"][n:] or r["rejected_labels"][n:] != r["rejected_ids"][n:]:
            raise RuntimeError("a pair with unlabelled answer tokens: TRL scores every answer token")
        out.append(
            {"prompt_ids": r["input_ids"][:n], "chosen_ids": r["input_ids"][n:], "rejected_ids": r["rejected_ids"][n:]}
        )
    return out


def trl_worker(steps: int, warmup: int, bf16_lora: bool = False) -> None:
    import datasets
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lightning_falcon.architectures import FALCON
    from lightning_falcon.assets import resolve
    from lightning_falcon.data import PromptDataModule
    from lightning_falcon.model.quantization import load_causal_lm, resolve_compute_dtype

    c = settings(str(CONFIG), {"model.adapter": None})
    m, d, t = c["model"], c["data"], c["trainer"]
    torch.manual_seed(c["seed_everything"])
    d.setdefault("tokenizer", m["model_name_or_path"])
    dm = PromptDataModule(**d)
    dm.prepare_data()
    dm.setup("fit")
    rows = datasets.Dataset.from_list(pair_rows(dm._splits["train"].with_format(None)))
    sampler = dm.train_dataloader().sampler  # fit's: the same batches in the same order
    cpu = torch.device("cpu")
    base = load_causal_lm(
        resolve(m["model_name_or_path"]), m["quantization"], m.get("double_quant", True),
        resolve_compute_dtype(m["compute_dtype"], cpu), cpu, attn_implementation="sdpa",
    )  # fmt: skip
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=m["lora_r"], lora_alpha=m["lora_alpha"], lora_dropout=m["lora_dropout"],
        target_modules=list(FALCON.lora_targets), bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    window = StepWindow(warmup, steps, anon_memory=True)
    last_loss = [None]

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # tokenized already, by fit's data module
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:  # this step's loss, for the window (kept as a tensor: no sync)
                last_loss[0] = (out[0] if return_outputs else out).detach()
            return out

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=d["batch_size"],
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
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=m.get("gradient_checkpointing", False),
            disable_dropout=True,
            precompute_ref_log_probs=False,
            max_length=d["max_length"],
            beta=m["beta"],
            label_smoothing=m.get("label_smoothing", 0.0),
            loss_type=["sigmoid"],
            seed=c["seed_everything"],
            dataloader_num_workers=d.get("num_workers", 0),
        )
        trainer = Trainer(model=base, args=args, train_dataset=rows, processing_class=dm.tokenizer, peft_config=lora)
        if not bf16_lora:  # TRL's QLoRA cast of the adapter to bf16, undone: fp32 on both sides
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        trainable = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
        started = set()

        class Window(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                window.step_end(state.global_step - 1, last_loss[0])

        def count(module, args, kwargs):
            # The policy's forward opens a step; the reference's (adapter off, same module) follows it.
            step = trainer.state.global_step
            if module.training and step not in started:
                started.add(step)
                window.step_start(step, kwargs)

        trainer.add_callback(Window())
        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        trainer.train()
    report(window.result(lora_dtype=str(sorted(trainable))))


def compare(steps: int, warmup: int, repeats: int, bf16_lora: bool = False) -> dict:
    common = ["--steps", str(steps), "--warmup", str(warmup)]
    workers = {"fit": ["--worker", "fit", *common], "trl": ["--worker", "trl", *common]}
    if bf16_lora:
        workers["trl"].append("--trl-bf16-lora")
    runs = alternate(workers, Path(__file__), repeats)
    tokens = {side: [r["step_tokens"] for r in runs[side]] for side in SIDES}
    if any(t != tokens["fit"][0] for side in SIDES for t in tokens[side]):
        raise RuntimeError("the sides (or repeats) trained different batches: the comparison would be unlike work")
    out: dict = {"runs": runs}
    for side in SIDES:
        out[side] = {
            "floor": floor_rate(runs[side]),
            "median": median(runs[side], "tokens_per_sec"),
            "anon_peak_mib": median(runs[side], "anon_peak_mib"),
            "anon_before_mib": median(runs[side], "anon_before_mib"),
        }
        out[side]["anon_step_mib"] = out[side]["anon_peak_mib"] - out[side]["anon_before_mib"]
    out["ratio"] = {k: out["fit"][k] / out["trl"][k] for k in ("floor", "median", "anon_peak_mib", "anon_step_mib")}
    return out


def sides_table(out: dict, bf16_lora: bool = False) -> str:
    names = {"fit": "fit --model.objective dpo", "trl": "TRL DPOTrainer" + (" (bf16 LoRA)" if bf16_lora else "")}
    rows = [
        [
            names[side],
            f"{out[side]['floor']:,.0f}",
            f"{out[side]['median']:,.0f}",
            ", ".join(f"{r['tokens_per_sec']:,.0f}" for r in out["runs"][side]),
            f"{out[side]['anon_peak_mib']:,.0f}",
            f"{out[side]['anon_before_mib']:,.0f}",
            f"{out[side]['anon_step_mib']:,.0f}",
        ]
        for side in SIDES
    ]
    r = out["ratio"]
    ratios = [f"{r[k]:.3f}" for k in ("floor", "median", "anon_peak_mib", "anon_step_mib")]
    rows.append(["ours / TRL", ratios[0], ratios[1], "", ratios[2], "", ratios[3]])
    header = ["side", "floor tokens/s", "median tokens/s", "each run", "peak RssAnon (MiB)", "before step 0"]
    header.append("steps add (MiB)")
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl-bf16-lora", action="store_true", help="keep TRL's bf16 cast of the LoRA weights")
    parser.add_argument("--worker", choices=SIDES)
    args, extra = parser.parse_known_args()
    if args.worker == "fit":
        timer = lightning_window_callback(args.warmup, args.steps, anon_memory=True)
        return fit_worker(args.steps, args.warmup, [*FIT_FLAGS, *extra], str(CONFIG), timer)
    if args.worker == "trl":
        return trl_worker(args.steps, args.warmup, args.trl_bf16_lora)
    print(f"device {device_line()} | {versions()}")
    out = compare(args.steps, args.warmup, args.repeats, args.trl_bf16_lora)
    print(
        f"\nDPO on configs/tiny-dpo.yaml (fresh LoRA, reference = the base), {args.steps} steps a run, "
        f"{args.repeats} runs a side alternating; tokens/s over steps {args.warmup}..{args.steps - 1} (the first "
        f"{args.warmup} left out): real tokens of chosen + rejected sequences, {out['runs']['fit'][0]['tokens']:,} "
        "the same on both sides; peak RssAnon from step 0 on, median of the runs\n"
    )
    print(sides_table(out, args.trl_bf16_lora))
    losses = {side: out["runs"][side][0]["losses"] for side in SIDES}
    tenth = max(len(losses["fit"]) // 10, 1)
    print(
        f"\nAdamW fused: {fused_adamw(settings(str(CONFIG), {})['model'])}; TRL's LoRA weights: "
        f"{out['runs']['trl'][0]['lora_dtype']}. Mean DPO loss of the first and the last {tenth} timed steps "
        "(first run; the same batches, LoRA initialised apart): "
        + "; ".join(f"{side} {mean(losses[side][:tenth]):.4f} -> {mean(losses[side][-tenth:]):.4f}" for side in SIDES)
    )


if __name__ == "__main__":
    sys.exit(main())
