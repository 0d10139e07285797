"""CPU: what Lightning and this package cost over a hand-written PyTorch + PEFT loop doing identical work.

Both sides train configs/tiny.yaml's model (the same 4-bit nf4 load and LoRA, through the package's
own loader) on the same batches in the same order (the package's tokenized cache and sampler), with
the same AdamW, schedule, gradient clipping and number of steps. `fit` keeps everything a user's fit
does per step (logging to TensorBoard, the progress bar, the gradient-norm and NaN checks, the
throughput meter); validation and periodic checkpoints are switched off, as the loop has neither.

The fixed cost a step is a `fit` step's time less the loop's on the same batch, in one process
(`Interleaved`): each step's median over the runs, averaged over the steps. `--real-size` measures the same on a
step of real size:
the shipped falcon-7b config at its real width and vocabulary with 2 layers (random weights), one
sequence of `--max-length` tokens a step.

    python benchmarks/overhead.py [--steps 200] [--warmup 20] [--repeats 5] [--interleaved-repeats 5]
    python benchmarks/overhead.py --real-size --steps 12 --warmup 2 --interleaved-repeats 3 [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    TINY_CONFIG,
    Callback,
    StepWindow,
    compare_sides,
    device_line,
    fit_setting,
    fused_adamw,
    lightning_window_callback,
    loss_chunk_size,
    report,
    run_worker,
    sides_table,
    table,
    tiny_settings,
    versions,
)


def fit_args(
    steps: int, warmup: int, logdir: str, extra: list[str] = (), config: str = str(TINY_CONFIG), timer: str = ""
) -> list[str]:
    """`fit` on `config` for `steps` steps, no validation or periodic checkpoint, timed by `timer` (a
    `--trainer.callbacks+=` value; default `LightningWindow`)."""
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
        f"--trainer.callbacks+={timer or lightning_window_callback(warmup, steps)}",
    ]


def fit_worker(steps: int, warmup: int, extra: list[str] = (), config: str = str(TINY_CONFIG), timer: str = "") -> None:
    """`python -m lightning_falcon fit --config CONFIG EXTRA...`, in this process, timed by `timer`
    (default `LightningWindow`)."""
    from lightning_falcon.commands.main import main

    # The bar a user at a terminal has: a worker's stdout is a pipe, where the CLI would write lines instead.
    bar = "--trainer.callbacks+=lightning_falcon.training.progress.ProgressBar"
    with tempfile.TemporaryDirectory() as logdir:
        main(fit_args(steps, warmup, logdir, [*extra, bar], config, timer))


class HandLoop:
    """The hand-written loop: the package's loader and data, PEFT, torch's AdamW; nothing else.

    `settings` are a config's `model`, `data` and `trainer` sections and its `seed_everything` (default:
    configs/tiny.yaml's). Seeded as `fit` seeds itself, so both train the same batches from the same weights.
    """

    def __init__(self, steps: int, settings: dict | None = None) -> None:
        import torch

        from lightning_falcon.architectures import FALCON
        from lightning_falcon.assets import resolve
        from lightning_falcon.data import PromptDataModule
        from lightning_falcon.model.attention import attend
        from lightning_falcon.model.lora import apply_lora
        from lightning_falcon.model.quantization import load_causal_lm, resolve_compute_dtype
        from lightning_falcon.model.random_weights import random_checkpoint
        from lightning_falcon.model.step_policy import lr_factor
        from lightning_falcon.upstream import route_falcon_attention

        config = settings or tiny_settings()
        m, d, t = config["model"], dict(config["data"]), config["trainer"]
        torch.manual_seed(config["seed_everything"])
        d["tokenizer"] = d.get("tokenizer") or m["model_name_or_path"]
        dm = PromptDataModule(**d)
        dm.prepare_data()
        dm.setup("fit")
        self.loader = dm.train_dataloader()
        path = resolve(m["model_name_or_path"])
        if m.get("random_init"):  # the checkpoint fit has written (or would write) for this architecture
            path = str(random_checkpoint(path, m["random_init_dir"]))
        cpu = torch.device("cpu")
        dtype = resolve_compute_dtype(m.get("compute_dtype", "auto"), cpu)
        base = load_causal_lm(path, m["quantization"], m.get("double_quant", True), dtype, cpu)
        if fit_setting(m, "fused_attention"):  # fit's attention (model/attention.py), so the losses are fit's
            route_falcon_attention(base, attend)
        self.model = apply_lora(
            base, m["lora_r"], m["lora_alpha"], m["lora_dropout"], m.get("target_modules") or FALCON.lora_targets,
            m.get("gradient_checkpointing", False), m.get("upcast_frozen", True),
        )  # fmt: skip
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=m["learning_rate"], weight_decay=m["weight_decay"], fused=fused_adamw(m) or None
        )
        schedule = lr_factor(m["warmup_steps"], steps, m["lr_schedule"], m.get("min_lr_ratio", 0.0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.clip = t["gradient_clip_val"]
        self.chunk = loss_chunk_size(m)
        self.batches = self._epochs()

    def _epochs(self):
        epoch = 0
        while True:
            self.loader.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def loss(self, batch: dict):
        """The loss `fit` computes: chunked through the output layer (model/loss.py) unless the config says not."""
        from lightning_falcon.model.loss import chunked_causal_lm_loss

        if self.chunk is None:
            return self.model(**batch, use_cache=False).loss
        causal_lm = self.model.get_base_model()
        hidden = causal_lm.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        return chunked_causal_lm_loss(hidden, causal_lm.get_output_embeddings(), batch["labels"], self.chunk)

    def step(self, batch: dict, stamps: list[float] | None = None):
        """One training step; `stamps` gets the time after the forward, the backward and the update."""
        import torch

        stamps = [] if stamps is None else stamps
        loss = self.loss(batch)
        stamps.append(time.perf_counter())
        loss.backward()
        stamps.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        return loss


def loop_worker(steps: int, warmup: int) -> None:
    """`HandLoop` alone in this process, timed by `StepWindow` (the fetch of the next batch included)."""
    loop, window = HandLoop(steps), StepWindow(warmup, steps)
    for step in range(steps):
        batch = next(loop.batches)
        window.step_start(step, batch)
        window.step_end(step, loop.step(batch))
    report(window.result())


PHASES = {
    "between": (
        "fit: the other callbacks' on_train_batch_end (throughput meter, progress bar, checkpoint check), "
        "Lightning's logging and loop bookkeeping, the next batch's fetch and transfer; loop: the fetch"
    ),
    "forward": (
        "fit: the other callbacks' on_train_batch_start, Lightning's closure and step dispatch, the forward, "
        "the loss NaN guard, the train/loss log (logged steps); loop: the forward"
    ),
    "backward": "fit: zero_grad and the backward hooks, the backward; loop: the backward",
    "update": (
        "fit: the gradient norm and its NaN guard, clipping, AdamW, the LR schedule, Lightning's optimizer "
        "plumbing; loop: clipping, AdamW, the LR schedule, zero_grad"
    ),
}


def live_settings(trainer, pl_module) -> dict:
    """The settings this `fit` runs with, as `HandLoop` takes them: the module's and the data's arguments
    as the CLI gave them, the clipping, and the seed the CLI set."""
    import os

    def arguments(hparams) -> dict:  # less what jsonargparse adds to them (`_instantiator`)
        return {k: v for k, v in hparams.items() if not k.startswith("_")}

    return {
        "model": arguments(pl_module.hparams),
        "data": arguments(trainer.datamodule.hparams),
        "trainer": {"gradient_clip_val": trainer.gradient_clip_val},
        "seed_everything": int(os.environ["PL_GLOBAL_SEED"]),
    }


class Interleaved(Callback):
    """`fit` and `HandLoop` in one process, a step each in turn: after each `fit` step, the loop trains
    its own copy of the model on its own next batch (the same batch, as both are seeded alike).

    Each `fit` step is timed from one `on_train_batch_start` to the next, less the loop step run in between;
    each loop step from its fetch to its end. A slow spell of the machine then hits both sides within the
    same ~0.1 s instead of in different runs. Each timed step is also split into `PHASES`, on `fit`'s side
    at its hooks (this callback's run before the other callbacks'). Reports both sides when training ends.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.fit: dict[str, list] = {"step_seconds": [], "step_tokens": [], "losses": [], "phases": []}
        self.loop: dict[str, list] = {"step_seconds": [], "step_tokens": [], "losses": [], "phases": []}
        self._start: float | None = None
        self._stamps: dict[str, float] = {}
        self._loop_seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        with torch.random.fork_rng():  # fit's own random stream stays as it would be without the loop
            self.hand = HandLoop(self.steps, live_settings(trainer, pl_module))
        # The loop's steps draw from a stream of their own that starts where fit's does: the same dropout
        # masks on both sides, and neither side's draws move the other's.
        self._loop_rng = torch.get_rng_state()

    def _timed(self, step: int) -> bool:
        return self.warmup <= step < self.steps

    def _end_fit_step(self, now: float) -> None:
        """The timed `fit` step that began at `self._start` ends at `now` (the next step's start, or the end)."""
        self.fit["step_seconds"].append(now - self._start - self._loop_seconds)
        self.fit["phases"][-1]["between"] = now - self._stamps["end"] - self._loop_seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._start is not None:
            self._end_fit_step(now)
        step = trainer.global_step
        self._start = now if self._timed(step) else None
        if self._start is not None:
            self.fit["step_tokens"].append(int(batch["attention_mask"].sum()))

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self._stamps["zero_grad"] = time.perf_counter()  # in Lightning's closure: the training_step has returned

    def on_after_backward(self, trainer, pl_module) -> None:
        self._stamps["after_backward"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        end = self._stamps["end"] = time.perf_counter()
        step = trainer.global_step - 1
        if self._timed(step):
            s = self._stamps
            self.fit["phases"].append(
                {
                    "forward": s["zero_grad"] - self._start,
                    "backward": s["after_backward"] - s["zero_grad"],
                    "update": end - s["after_backward"],
                }
            )
        start = time.perf_counter()
        batch = next(self.hand.batches)
        with torch.random.fork_rng():
            torch.set_rng_state(self._loop_rng)
            stamps = [time.perf_counter()]
            loss = self.hand.step(batch, stamps)
            self._loop_rng = torch.get_rng_state()
        fetched, forward, backward, updated = stamps
        self._loop_seconds = updated - start
        if self._timed(step):
            self.fit["losses"].append(float(outputs["loss"]))
            self.loop["losses"].append(float(loss))
            self.loop["step_seconds"].append(self._loop_seconds)
            self.loop["step_tokens"].append(int(batch["attention_mask"].sum()))
            self.loop["phases"].append(
                {
                    "between": fetched - start,
                    "forward": forward - fetched,
                    "backward": backward - forward,
                    "update": updated - backward,
                }
            )

    def on_train_end(self, trainer, pl_module) -> None:
        if self._start is not None:  # the last step ends with training
            self._end_fit_step(time.perf_counter())
        result = {}
        for side, r in (("fit", self.fit), ("loop", self.loop)):
            seconds, tokens = sum(r["step_seconds"]), sum(r["step_tokens"])
            result[side] = {**r, "tokens_per_sec": tokens / seconds, "seconds": seconds, "tokens": tokens}
        report(result)


def step_differences(run: dict) -> list[float]:
    """Each timed step's `fit` time less the loop's on the same batch, in ms."""
    return [1e3 * (a - b) for a, b in zip(run["fit"]["step_seconds"], run["loop"]["step_seconds"], strict=False)]


def fixed_cost_ms(runs: list[dict]) -> float:
    """`fit`'s cost over the loop a step, in ms: for each step, the median over the runs of its difference
    (a slow spell of the machine hits one run's step, not all of them), then the mean over the steps (so
    the logged steps' extra cost counts at its real share, which a median over steps would leave out)."""
    return statistics.mean(statistics.median(d) for d in zip(*map(step_differences, runs), strict=False))


def _mean_ms(side: dict, phase: str | None) -> float:
    """A side's mean time a step in `phase` (None: the whole step), in ms."""
    seconds = side["step_seconds"] if phase is None else [p[phase] for p in side["phases"]]
    return 1e3 * statistics.mean(seconds)


def phase_table(runs: list[dict]) -> str:
    """Where `fit`'s extra time goes: each phase's mean ms a step on both sides (median over the runs)."""
    rows = []
    for phase in [*PHASES, None]:
        fit, loop = (statistics.median(_mean_ms(r[side], phase) for r in runs) for side in ("fit", "loop"))
        rows.append([phase or "whole step", f"{fit:.2f}", f"{loop:.2f}", f"{fit - loop:+.2f}", PHASES.get(phase, "")])
    return table(["phase", "fit ms/step", "loop ms/step", "fit - loop", "what each side does in it"], rows)


def interleaved(steps: int, warmup: int, repeats: int, extra: list[str] = (), timeout: int = 900) -> dict:
    """`repeats` fresh processes of `Interleaved` (`extra`: the worker's `fit` arguments): each run's
    loop-over-fit time ratio and fixed cost a step, and their medians."""
    common = ["--worker", "interleaved", "--steps", str(steps), "--warmup", str(warmup)]
    runs = [run_worker(Path(__file__), *common, *extra, timeout=timeout) for _ in range(repeats)]
    ratios = [r["fit"]["tokens_per_sec"] / r["loop"]["tokens_per_sec"] for r in runs]
    return {
        "runs": runs,
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "fixed_costs_ms": [fixed_cost_ms([r]) for r in runs],  # each run's mean difference
        "fixed_cost_ms": fixed_cost_ms(runs),
    }


def real_size_arguments(work: Path, max_length: int, layers: int) -> list[str]:
    """`fit` arguments for configs/falcon-7b-qlora.yaml at its real width with `layers` layers (random
    weights), one sequence of exactly `max_length` tokens a step; CPU-only changes as in loss_memory.py."""
    from loss_memory import CONFIG_7B, overrides
    from peer import as_flags

    settings = overrides(work, max_length, layers)
    settings["trainer.enable_progress_bar"] = True  # as a user's fit has it, like the tiny side
    return ["--config-file", CONFIG_7B, *as_flags(settings)]


def compare(steps: int, warmup: int, repeats: int) -> dict:
    return compare_sides(Path(__file__), ("fit", "loop"), steps, warmup, repeats)


def print_interleaved(inter: dict, repeats: int) -> None:
    rows = [
        [i + 1, f"{r['fit']['tokens_per_sec']:,.1f}", f"{r['loop']['tokens_per_sec']:,.1f}", f"{ratio:.3f}",
         f"{1e3 * statistics.median(r['loop']['step_seconds']):,.1f}", f"{cost:+.2f}"]
        for i, (r, ratio, cost) in enumerate(zip(inter["runs"], inter["ratios"], inter["fixed_costs_ms"], strict=False))
    ]  # fmt: skip
    same = all(r["fit"]["losses"] == r["loop"]["losses"] for r in inter["runs"])
    header = ["run", "fit tokens/s", "loop tokens/s", "fit / loop", "loop ms/step (median)", "fit - loop ms (mean)"]
    print(table(header, rows))
    print(
        f"\noverhead ratio fit / loop, interleaved: {inter['ratio']:.3f} median of {repeats} runs; fixed cost "
        f"{inter['fixed_cost_ms']:.2f} ms a step (fit step - loop step: each step's median over the runs, "
        "averaged over the steps); "
        f"losses identical on both sides at every step: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating (0: none)")
    parser.add_argument("--interleaved-repeats", type=int, default=5, help="runs of `Interleaved` (0: none)")
    parser.add_argument(
        "--real-size", action="store_true",
        help="only the interleaved runs, on configs/falcon-7b-qlora.yaml at its real width (--layers, --max-length)",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=2, help="--real-size: decoder layers")
    parser.add_argument("--max-length", type=int, default=128, help="--real-size: tokens a step (one sequence)")
    parser.add_argument("--config-file", default=str(TINY_CONFIG), help=argparse.SUPPRESS)  # a worker's config
    parser.add_argument("--worker", choices=["fit", "loop", "interleaved"])
    args, extra = parser.parse_known_args()
    if args.worker == "fit":
        return fit_worker(args.steps, args.warmup, extra, args.config_file)
    if args.worker == "loop":
        return loop_worker(args.steps, args.warmup)
    if args.worker == "interleaved":
        timer = {"class_path": "overhead.Interleaved", "init_args": {"warmup": args.warmup, "steps": args.steps}}
        return fit_worker(args.steps, args.warmup, extra, args.config_file, timer=json.dumps(timer))
    if args.real_size:
        with tempfile.TemporaryDirectory() as tmp:
            flags = real_size_arguments(Path(tmp), args.max_length, args.layers)
            inter = interleaved(args.steps, args.warmup, args.interleaved_repeats, [*flags, *extra], timeout=3600)
        print(f"{device_line()}; {versions()}")
        print(
            f"configs/falcon-7b-qlora.yaml at falcon-7b width, {args.layers} layers, batch 1 x {args.max_length} "
            f"tokens, {args.steps} steps, steps {args.warmup}-{args.steps - 1} timed\n"
        )
        print_interleaved(inter, args.interleaved_repeats)
        print("\n## Where the time goes (mean of the timed steps)\n")
        return print(phase_table(inter["runs"]))
    if args.repeats:
        out = compare(args.steps, args.warmup, args.repeats)
        print("## Alternating processes\n\n" + sides_table(out, ("fit", "loop")))
        print(
            f"\noverhead ratio fit / loop: {out['ratio']['floor']:.3f} step-by-step floor, "
            f"{out['ratio']['median']:.3f} median of {args.repeats} runs"
        )
    if args.interleaved_repeats:
        inter = interleaved(args.steps, args.warmup, args.interleaved_repeats, extra)  # extra: fit's arguments
        print("\n## Interleaved in one process (a fit step, then a loop step)\n")
        print_interleaved(inter, args.interleaved_repeats)
        print("\n## Where fit's extra time goes (interleaved runs above; mean of the timed steps)\n")
        print(phase_table(inter["runs"]))


if __name__ == "__main__":
    sys.exit(main())
