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
    fused_adamw,
    lightning_window_callback,
    loss_chunk_size,
    report,
    run_worker,
    sides_table,
    table,
    tiny_settings,
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

    with tempfile.TemporaryDirectory() as logdir:
        main(fit_args(steps, warmup, logdir, extra, config, timer))


class HandLoop:
    """The hand-written loop: the package's loader and data, PEFT, torch's AdamW; nothing else.

    Seeded as `fit` seeds itself, so both train the same batches from the same weights.
    """

    def __init__(self, steps: int) -> None:
        import torch

        from lightning_falcon.assets import resolve
        from lightning_falcon.data import PromptDataModule
        from lightning_falcon.model.lora import FALCON_TARGET_MODULES, apply_lora
        from lightning_falcon.model.module import lr_lambda
        from lightning_falcon.model.quantization import load_causal_lm

        config = tiny_settings()
        m, d, t = config["model"], config["data"], config["trainer"]
        torch.manual_seed(config["seed_everything"])
        dm = PromptDataModule(**d, tokenizer=m["model_name_or_path"])
        dm.prepare_data()
        dm.setup("fit")
        self.loader = dm.train_dataloader()
        path = resolve(m["model_name_or_path"])
        base = load_causal_lm(path, m["quantization"], True, torch.float32, torch.device("cpu"))
        self.model = apply_lora(base, m["lora_r"], m["lora_alpha"], m["lora_dropout"], FALCON_TARGET_MODULES, False)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=m["learning_rate"], weight_decay=m["weight_decay"], fused=fused_adamw(m) or None
        )
        schedule = lr_lambda(m["warmup_steps"], steps, m["lr_schedule"], 0.0)
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
            self.hand = HandLoop(self.steps)

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
        stamps = [time.perf_counter()]
        loss = self.hand.step(batch, stamps)
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


def interleaved(steps: int, warmup: int, repeats: int) -> dict:
    """`repeats` fresh processes of `Interleaved`: each run's loop-over-fit time ratio, and their median."""
    runs = [
        run_worker(Path(__file__), "--worker", "interleaved", "--steps", str(steps), "--warmup", str(warmup))
        for _ in range(repeats)
    ]
    ratios = [r["fit"]["tokens_per_sec"] / r["loop"]["tokens_per_sec"] for r in runs]
    return {"runs": runs, "ratios": ratios, "ratio": statistics.median(ratios)}


def compare(steps: int, warmup: int, repeats: int) -> dict:
    return compare_sides(Path(__file__), ("fit", "loop"), steps, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating")
    parser.add_argument("--interleaved-repeats", type=int, default=5, help="runs of `Interleaved` (0: none)")
    parser.add_argument("--worker", choices=["fit", "loop", "interleaved"])
    args, extra = parser.parse_known_args()
    if args.worker == "fit":
        return fit_worker(args.steps, args.warmup, extra)
    if args.worker == "loop":
        return loop_worker(args.steps, args.warmup)
    if args.worker == "interleaved":
        timer = {"class_path": "overhead.Interleaved", "init_args": {"warmup": args.warmup, "steps": args.steps}}
        return fit_worker(args.steps, args.warmup, extra, timer=json.dumps(timer))
    out = compare(args.steps, args.warmup, args.repeats)
    print("## Alternating processes\n\n" + sides_table(out, ("fit", "loop")))
    print(
        f"\noverhead ratio fit / loop: {out['ratio']['floor']:.3f} step-by-step floor (target >= 0.95), "
        f"{out['ratio']['median']:.3f} median of {args.repeats} runs"
    )
    if args.interleaved_repeats:
        inter = interleaved(args.steps, args.warmup, args.interleaved_repeats)
        rows = [
            [i + 1, f"{r['fit']['tokens_per_sec']:,.0f}", f"{r['loop']['tokens_per_sec']:,.0f}", f"{ratio:.3f}"]
            for i, (r, ratio) in enumerate(zip(inter["runs"], inter["ratios"]))
        ]
        same = all(r["fit"]["losses"] == r["loop"]["losses"] for r in inter["runs"])
        print("\n## Interleaved in one process (a fit step, then a loop step)\n")
        print(table(["run", "fit tokens/s", "loop tokens/s", "fit / loop"], rows))
        print(
            f"\noverhead ratio fit / loop, interleaved: {inter['ratio']:.3f} median of {args.interleaved_repeats} "
            f"runs (target >= 0.95); losses identical on both sides at every step: {same}"
        )
        print("\n## Where fit's extra time goes (interleaved runs above; mean of the timed steps)\n")
        print(phase_table(inter["runs"]))


if __name__ == "__main__":
    sys.exit(main())
