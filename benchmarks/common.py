"""What every benchmark shares: the tiny config's settings, a step timer, worker processes and the environment line.

Every figure is a ratio or a pair measured side by side in one run: the workers being compared run in
turn, alternating, each in a fresh process (so peak RSS is its own).

Two rates are kept for each side:
- `median`: the median over repeats of a whole run's tokens / seconds;
- `floor`: the tokens over the sum, step by step, of that step's fastest time among the repeats. Each
  side trains the same batches in every repeat (seeded), so step i is the same work each time, and its
  fastest time is the one least disturbed by the machine. On the 2-core machine these figures were taken
  on, a plain 1024x1024 matmul loop itself swings between 149 and 191 GFLOP/s from one second to the
  next, and whole runs of identical work differ by up to 2x; the floor is what stays put.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def tiny_settings() -> dict:
    """configs/tiny.yaml's model, data and trainer sections: every side of a comparison uses these."""
    return yaml.safe_load(TINY_CONFIG.read_text())


def fit_setting(model: dict, name: str):
    """A `model:` setting as `fit` takes it: the config's value, else FalconQLoRA's default. Every side of a
    comparison uses the same one."""
    import inspect

    from lightning_falcon.model.module import FalconQLoRA

    return model.get(name, inspect.signature(FalconQLoRA).parameters[name].default)


def fused_adamw(model: dict) -> bool:
    """Whether `fit` with these `model:` settings steps a fused AdamW."""
    return fit_setting(model, "fused_adamw")


def loss_chunk_size(model: dict) -> int | None:
    """The chunk of positions `fit`'s loss takes with these `model:` settings (None: the model's own loss)."""
    return fit_setting(model, "loss_chunk_size")


def versions() -> str:
    import bitsandbytes
    import lightning
    import torch
    import transformers

    line = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, lightning {lightning.__version__}"
    )
    try:
        import trl

        line += f", trl {trl.__version__}"
    except ImportError:
        pass
    return line


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, no GPU"


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """This process's peak anonymous memory (RssAnon) from `start()` on, sampled by a thread every `interval` s.

    RssAnon, not RSS: RSS also counts the mmapped safetensors files, which are page cache, not the process's.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.before, self.peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from shapes import rss_anon_bytes

        self.before = self.peak = rss_anon_bytes()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, rss_anon_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """{'anon_before_mib': at start(), 'anon_peak_mib': the peak since}."""
        from shapes import rss_anon_bytes

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())
        return {"anon_before_mib": self.before / 2**20, "anon_peak_mib": self.peak / 2**20}


class StepWindow:
    """Times training steps `warmup` .. `steps - 1` and counts their real tokens (attention_mask ones).

    The first `warmup` steps (allocator, thread pools, first-call costs) are left out on every side alike.
    `anon_memory`: also sample the peak RssAnon from the first step's start on (every step, warmup
    included: the first one allocates the optimizer state), and RssAnon just before it.
    """

    def __init__(self, warmup: int, steps: int, anon_memory: bool = False) -> None:
        self.warmup, self.steps = warmup, steps
        self.stamps: list[float] = []  # at each timed step's start, and at the last one's end
        self.step_tokens: list[int] = []
        self.losses: list = []  # each timed step's loss, kept as tensors: no extra sync inside the window
        self.anon = AnonPeak() if anon_memory else None

    def step_start(self, step: int, batch: dict) -> None:
        if step == 0 and self.anon is not None:
            self.anon.start()
        if self.warmup <= step < self.steps:
            self.stamps.append(time.perf_counter())
            self.step_tokens.append(int(batch["attention_mask"].sum()))

    def step_end(self, step: int, loss=None) -> None:
        if loss is not None and self.warmup <= step < self.steps:
            self.losses.append(loss.detach())
        if step == self.steps - 1:
            self.stamps.append(time.perf_counter())

    def result(self, **extra) -> dict:
        import torch

        # Start to start: a step's time holds everything between two steps (loading, hooks, logging).
        step_seconds = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        seconds, tokens = sum(step_seconds), sum(self.step_tokens)
        out = {
            "tokens_per_sec": tokens / seconds,
            "seconds": seconds,
            "tokens": tokens,
            "timed_steps": len(step_seconds),
            "step_seconds": step_seconds,
            "step_tokens": self.step_tokens,
            "losses": [float(x) for x in self.losses],
            "peak_rss_mib": peak_rss_mib(),
        }
        if self.anon is not None:
            out.update(self.anon.stop())
        if torch.cuda.is_available():  # since the model was loaded (each side resets the peak after loading)
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            out["device"] = torch.cuda.get_device_name()
        return {**out, **extra}


def report(result: dict) -> None:
    """A worker's last stdout line: its result as JSON."""
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(script: Path, *args: str, env: dict | None = None, timeout: int = 900) -> dict:
    """Run `script --worker ...` in a fresh process and return its RESULT."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        check=False,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def alternate(workers: dict[str, list[str]], script: Path, repeats: int) -> dict[str, list[dict]]:
    """Run each named worker `repeats` times, interleaved (a, b, a, b, ...), so drift hits both alike."""
    results: dict[str, list[dict]] = {name: [] for name in workers}
    for _ in range(repeats):
        for name, args in workers.items():
            results[name].append(run_worker(script, *args))
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def floor_rate(results: list[dict]) -> float:
    """Tokens/s over the sum of each step's fastest time among the repeats (see the module docstring)."""
    if any(r["step_tokens"] != results[0]["step_tokens"] for r in results):
        raise RuntimeError("the repeats trained different batches: a step-by-step floor would compare unlike work")
    return sum(results[0]["step_tokens"]) / sum(map(min, zip(*(r["step_seconds"] for r in results), strict=False)))


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table, ready to paste into BENCHMARKS.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lightning_window_callback(warmup: int, steps: int, anon_memory: bool = False) -> str:
    """The `--trainer.callbacks+=` value that times a `fit` run with `LightningWindow`."""
    init = {"warmup": warmup, "steps": steps, "anon_memory": anon_memory}
    return json.dumps({"class_path": "common.LightningWindow", "init_args": init})


try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - lightning is a dependency
    Callback = object


class LightningWindow(Callback):
    """`StepWindow` as a Lightning callback: reports when training ends (rank 0)."""

    def __init__(self, warmup: int, steps: int, anon_memory: bool = False) -> None:
        self.window = StepWindow(warmup, steps, anon_memory)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.window.step_start(trainer.global_step, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts the step just taken; `outputs` is what training_step returned
        self.window.step_end(trainer.global_step - 1, outputs["loss"])

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            report(self.window.result())


def compare_sides(script: Path, sides: tuple[str, str], steps: int, warmup: int, repeats: int) -> dict:
    """Run `script --worker SIDE` for both sides, alternating; each side's floor, median and peak RSS, and
    the first side's rates over the second's (`ratio`)."""
    common = ["--steps", str(steps), "--warmup", str(warmup)]
    runs = alternate({side: ["--worker", side, *common] for side in sides}, script, repeats)
    out: dict = {"runs": runs}
    for side in sides:
        out[side] = {
            "floor": floor_rate(runs[side]),
            "median": median(runs[side], "tokens_per_sec"),
            "peak_rss_mib": median(runs[side], "peak_rss_mib"),
        }
    out["ratio"] = {k: out[sides[0]][k] / out[sides[1]][k] for k in ("floor", "median")}
    return out


def sides_table(out: dict, sides: tuple[str, str]) -> str:
    """`compare_sides`' result as a Markdown table."""
    rows = [
        [
            side,
            f"{out[side]['floor']:,.0f}",
            f"{out[side]['median']:,.0f}",
            ", ".join(f"{r['tokens_per_sec']:,.0f}" for r in out["runs"][side]),
            f"{out[side]['peak_rss_mib']:,.0f}",
        ]
        for side in sides
    ]
    return table(["side", "floor tokens/s", "median tokens/s", "each run", "median peak RSS (MiB)"], rows)
