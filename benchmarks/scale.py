"""Falcon-7B (all 32 layers) and Falcon-40B (N of its 60 layers, full width) at their real shapes on this CPU
machine, and the other families (Falcon-180B, Falcon2-11B, Falcon3-7B, Falcon-H1-7B) at real width with one or
two layers, random weights: each phase timed, with its peak anonymous memory and the bytes it wrote, the
planner beside what was measured, and the checks that must hold at these sizes.

    python benchmarks/scale.py                     # everything: about 90 minutes on 2 cores, ~50 GB of disk
    python benchmarks/scale.py --only 7b           # or 40b, or families; --workdir keeps the random checkpoints

Every run goes through the product's own commands (`fit`, `fit --ckpt_path last`, `export --merge`) with
the shipped GPU configs and the CPU overrides of `shapes.fit_arguments`, in child processes. Memory is
RssAnon summed over a run's process tree, sampled every 0.2 s: plain RSS would count the mmap of the
safetensors files. "Written" is what the phase left on disk. A failed check stops the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from common import REPO, device_line, table, versions
from shapes import falcon_shape, fit_arguments, held_bytes, rss_anon_bytes, shape

GiB = 2**30
CONFIG_7B = str(REPO / "configs" / "falcon-7b-qlora.yaml")
CONFIG_40B = str(REPO / "configs" / "falcon-40b-qlora.yaml")
OVERLAY = {s: ["--config", str(REPO / "configs" / "strategy" / f"{s}.yaml")] for s in ("ddp", "deepspeed-zero3")}
CPU_DEEPSPEED = ["--trainer.strategy.class_path", "cpu_deepspeed.CPUDeepSpeedStrategy"]
# Validation before training generates the config's samples: minutes of 4-bit forwards on CPU (and a
# whole-model gather per forward under ZeRO-3), which is not what these phases measure.
NO_SANITY = ["--trainer.num_sanity_val_steps", "0"]
TOKENS = list(range(3, 35))  # the tokens whose logits the merged model and the 4-bit base + adapter compare
# The other families' shipped configs and the layers they keep here (a 180B layer is 2.2 billion weights)
FAMILIES = {"falcon-180b": 1, "falcon-11b": 2, "falcon3-7b": 2, "falcon-h1-7b": 1}


# ----------------------------------------------------------------- measuring a child process
def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def dir_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in p.rglob("*") if f.is_file())


class Run:
    """A child process with its output lines timestamped and its tree's RssAnon sampled until it ends."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
        if cwd is not None:
            Path(cwd).mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, cwd=cwd
        )
        self.lines: list[tuple[float, str]] = []
        self.samples: list[tuple[float, int, int]] = []  # (time, tree total, largest process)
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        while self.proc.poll() is None:
            sizes = [rss_anon_bytes(p) for p in descendants(self.proc.pid)]
            self.samples.append((time.perf_counter(), sum(sizes), max(sizes, default=0)))
            time.sleep(0.2)
        reader.join()
        self.end = time.perf_counter()
        self.output = "".join(line for _, line in self.lines)
        if self.proc.returncode != 0:
            sys.exit(f"FAILED ({self.proc.returncode}): {' '.join(command)}\n{self.output[-5000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line))
            sys.stderr.write("    | " + line[:200].rstrip() + "\n") if VERBOSE else None

    def at(self, marker: str) -> float:
        """When the first output line holding `marker` appeared."""
        return next(t for t, line in self.lines if marker in line)

    def peak(self, start: float | None = None, end: float | None = None, per_process: bool = False) -> int:
        start, end = start or self.start, end or self.end
        return max((s[2 if per_process else 1] for s in self.samples if start <= s[0] <= end), default=0)


VERBOSE = False
ROWS: list[list] = []  # the phase table
CHECKS: list[str] = []


def row(phase: str, seconds: float, peak: int | None, written: int | None, note: str = "") -> None:
    memory = "" if peak is None else f"{peak / GiB:.2f}"
    ROWS.append([phase, f"{seconds:,.1f}", memory, "" if written is None else f"{written / GiB:.2f}", note])
    print(f"  {phase}: {seconds:,.1f} s, peak RssAnon {memory or '-'} GiB" + (f", {note}" if note else ""), flush=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"CHECK FAILED: {what}")
    CHECKS.append(what)
    print(f"  ok: {what}", flush=True)


def python(*code_and_args: str) -> list[str]:
    return [sys.executable, *code_and_args]


def falcon(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_falcon", *args]


# ----------------------------------------------------------------- phases shared by both sizes
def random_checkpoint_phase(label: str, shape: Path, random_dir: Path) -> Path:
    code = (
        "import sys; from lightning_falcon.model.random_weights import random_checkpoint; "
        "print(random_checkpoint(sys.argv[1], sys.argv[2]))"
    )
    before = dir_bytes(random_dir)
    run = Run(python("-c", code, str(shape), str(random_dir)))
    path = Path(run.output.strip().splitlines()[-1])
    written = dir_bytes(random_dir) - before
    row(f"{label}: random bf16 checkpoint", run.end - run.start, run.peak(), written, "cached" if not written else "")
    return path


def fit_phases(label: str, run: Run, log_dir: Path, written_before: int) -> None:
    """Split a fit's time at its own output lines: load + LoRA, training steps (with their checkpoints), adapter."""
    loaded, stopped = run.at("[model] quantized linear layers"), run.at("`Trainer.fit` stopped")
    row(f"{label}: start, data, load nf4 + LoRA", loaded - run.start, run.peak(run.start, loaded), None)
    row(
        f"{label}: training steps + checkpoints",
        stopped - loaded,
        run.peak(loaded, stopped),
        None,
        f"peak per process {run.peak(loaded, stopped, per_process=True) / GiB:.2f} GiB",
    )
    row(f"{label}: adapter + exit", run.end - stopped, run.peak(stopped, run.end), dir_bytes(log_dir) - written_before)


def footprint_mib(output: str) -> float:
    line = next(line for line in output.splitlines() if "memory footprint:" in line)
    return float(line.rsplit("memory footprint:", 1)[1].split()[0])


def planner_rows(shape: Path, world_size: int, max_length: int, strategy: str = "single") -> dict[str, float]:
    """The planner's rows for `shape` with LoRA r 64 on its family's default targets, fp32 compute (as on CPU)."""
    from transformers import AutoConfig

    from lightning_falcon.architectures import architecture
    from lightning_falcon.model.memory import Setup, count_model, plan

    config = AutoConfig.from_pretrained(shape)
    count = count_model(config, architecture(config).lora_targets, 64)
    setup = Setup(compute_bytes=4, mixed_16bit=False, batch_size=1, max_length=max_length, world_size=world_size)
    return plan(count, setup, strategy).rows


def weight_bytes(rows: dict[str, float]) -> float:
    keys = ("quantized base weights", "quantization constants", "unquantized parameters", "LoRA parameters")
    return sum(rows[k] for k in keys)


# ----------------------------------------------------------------- Falcon-7B
def seven_b(work: Path, steps: int, max_length: int, layers: int | None) -> list[list]:
    print(f"## Falcon-7B, {layers or 'all 32'} layers", flush=True)
    shape = falcon_shape("7b", layers, work)
    random_dir, root = work / "random", work / "7b"
    checkpoint = random_checkpoint_phase("7B", shape, random_dir)
    logs = root / "runs" / "falcon-7b-midjourney"
    every = ["--checkpoint.every_n_train_steps", "1", *NO_SANITY]

    before = dir_bytes(logs)
    fit = Run(falcon(*fit_arguments(CONFIG_7B, shape, random_dir, root, max_length, steps, *every)), cwd=root)
    fit_phases(f"7B fit, {steps} steps x {max_length} tokens", fit, logs, before)
    run = logs / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    check(
        state["global_step"] == steps and all(".lora_" in k for k in state["state_dict"]),
        f"7B last.ckpt holds only the {len(state['state_dict'])} LoRA tensors (and their optimizer state)",
    )
    checkpoint_write(state, root / "write-test.ckpt")
    del state

    before = dir_bytes(logs)
    resume = Run(
        falcon(
            *fit_arguments(CONFIG_7B, shape, random_dir, root, max_length, steps + 1, *every, "--ckpt_path", "last")
        ),
        cwd=root,
    )
    fit_phases("7B resume, 1 step", resume, logs, before)
    check(f"step {steps} of {steps + 1}" in resume.output, f"7B resumed at step {steps} and trained to {steps + 1}")
    adapter = logs / "version_1" / "adapter"

    out = root / "reload.json"
    reload = Run(python(__file__, "--worker", "reload", str(checkpoint), str(adapter), str(out)))
    measured = json.loads(out.read_text())
    row("7B adapter reloaded by PeftModel on the nf4 base", reload.end - reload.start, reload.peak(), None)

    merged_dir = root / "merged"
    export = Run(falcon("export", "--adapter", str(adapter), "--output", str(merged_dir), "--merge", "--dtype", "bf16",
                        "--overwrite"))  # fmt: skip
    row("7B export --merge --dtype bf16", export.end - export.start, export.peak(), dir_bytes(merged_dir))

    out_merged = root / "merged.json"
    compare = Run(
        python(__file__, "--worker", "merged", str(merged_dir), str(root / "reload-logits.pt"), str(out_merged))
    )
    agreement = json.loads(out_merged.read_text())
    row("7B merged model loaded, logits compared", compare.end - compare.start, compare.peak(), None)
    check(
        agreement["top1"] >= 0.9,
        f"7B merged bf16 logits vs nf4 base + adapter: relative difference {agreement['relative']:.4f}, "
        f"top-1 token agrees on {agreement['top1']:.0%} of {len(TOKENS)} positions",
    )

    rows = planner_rows(shape, 1, max_length)
    planned = weight_bytes(rows)
    check(
        measured["total"] == planned,
        f"7B weights held (counted tensor by tensor) = planner's weight rows = {planned:,.0f} bytes",
    )
    fit_footprint = footprint_mib(fit.output) * 2**20
    training = fit.peak(fit.at("[fit] world size"), fit.at("`Trainer.fit` stopped"))
    at_start = next(s[1] for s in fit.samples if s[0] >= fit.at("[fit] world size"))
    transient = rows["LoRA gradients"] + rows["LoRA optimizer states"] + rows["activations"] + rows["logits"]
    return [
        ["7B weights (nf4 base + constants + fp32 rest + LoRA)", f"{planned / GiB:.3f}",
         f"{measured['total'] / GiB:.3f} (tensors); fit's footprint line {fit_footprint / GiB:.3f}",
         f"get_memory_footprint alone: {measured['footprint'] / GiB:.3f}, without the constants"],
        ["7B of which quantization constants", f"{rows['quantization constants'] / GiB:.3f}",
         f"{measured['constants'] / GiB:.3f}", ""],
        [f"7B step at {max_length} tokens: gradients + Adam + activations + logits", f"{transient / GiB:.2f}",
         f"{(training - at_start) / GiB:.2f} (peak RssAnon in training minus at its start)",
         "CPU: fp32 compute (c = 4), glibc's allocator instead of CUDA's caching one, no CUDA context"],
    ]  # fmt: skip


def checkpoint_write(state: dict, path: Path) -> None:
    """The product's checkpoint write (atomic: temporary file, fsync, rename) of a real 7B last.ckpt, timed alone."""
    from lightning_falcon.training.checkpoint_io import AtomicCheckpointIO

    start = time.perf_counter()
    AtomicCheckpointIO().save_checkpoint(state, path)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    row(
        "7B checkpoint write alone (AtomicCheckpointIO, fsync'd)",
        seconds,
        None,
        size,
        f"{size / seconds / 2**20:,.0f} MiB/s",
    )
    path.unlink()


# ----------------------------------------------------------------- Falcon-40B layers
def forty_b(work: Path, layers: int, steps: int, max_length: int) -> list[list]:
    print(f"## Falcon-40B, {layers} of 60 layers at full width, 2 CPU processes", flush=True)
    shape = falcon_shape("40b", layers, work)
    random_dir, root = work / "random", work / "40b"
    checkpoint = random_checkpoint_phase(f"40B x{layers}", shape, random_dir)

    out = root / "layers.json"
    root.mkdir(parents=True, exist_ok=True)
    measure = Run(python(__file__, "--worker", "layers", str(checkpoint), str(out)))
    per_layer = json.loads(out.read_text())
    row(f"40B x{layers}: nf4 load, bytes per layer counted", measure.end - measure.start, measure.peak(), None)

    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "benchmarks")])}
    two = ["--trainer.devices", "2", "--checkpoint.every_n_train_steps", "1", *NO_SANITY]
    results = {}
    for strategy in ("ddp", "deepspeed-zero3"):
        extra = [*OVERLAY[strategy], *two, *(CPU_DEEPSPEED if strategy != "ddp" else [])]
        sub = root / strategy
        logs = sub / "runs" / "falcon-40b-midjourney"
        args = fit_arguments(CONFIG_40B, shape, random_dir, sub, max_length, steps, *extra)
        fit = Run(falcon(*args), env=env, cwd=root)
        fit_phases(f"40B x{layers} {strategy}, {steps} step(s) x {max_length} tokens", fit, logs, 0)
        check("[adapter] LoRA weights identical on all 2 ranks" in fit.output, f"40B {strategy}: one identical adapter")
        results[strategy] = fit
        if strategy == "ddp":
            state = torch.load(logs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
            check(all(".lora_" in k for k in state["state_dict"]), "40B DDP: last.ckpt holds only LoRA weights")
            del state
        else:
            shards = zero3_checks(fit.output, logs / "version_0", layers)
            before = dir_bytes(logs)
            resume = Run(falcon(*args, "--trainer.max_steps", str(steps + 1), "--ckpt_path", "last"), env=env, cwd=root)
            fit_phases(f"40B x{layers} {strategy} resume, 1 step", resume, logs, before)
            check(f"step {steps} of {steps + 1}" in resume.output, f"40B ZeRO-3 resumed at step {steps}")

    full_shape = falcon_shape("40b", None, work / "full")
    planned_60 = weight_bytes(planner_rows(full_shape, 1, max_length))
    planned_few = weight_bytes(planner_rows(shape, 1, max_length))
    planned_layer = (planned_60 - planned_few) / (60 - layers)
    measured_60 = per_layer["rest"] + 60 * per_layer["per_layer"]
    sharded = planner_rows(shape, 2, max_length, "deepspeed-zero3")["quantized base weights"]
    return [
        ["40B bytes per layer (nf4 + constants + LoRA r 64)", f"{planned_layer / GiB:.4f}",
         f"{per_layer['per_layer'] / GiB:.4f}", "counted on a real load of the layers"],
        ["40B weights at 60 layers, one process", f"{planned_60 / GiB:.2f}", f"{measured_60 / GiB:.2f}",
         "measured: embeddings and final norm + 60 x the measured layer"],
        [f"40B x{layers} nf4 storage per rank, ZeRO-3 over 2", f"{sharded / GiB:.3f}", f"{shards / GiB:.3f}",
         "rank-local 4-bit bytes, from the strategy's own count"],
    ]  # fmt: skip


# ----------------------------------------------------------------- the other families
def families(work: Path) -> list[list]:
    """Each family's real width and vocabulary with few layers: the random checkpoint, the nf4 load with LoRA r 64
    on its default targets, and the bytes held against the planner's."""
    print(f"## {', '.join(FAMILIES)}: real width, {'/'.join(str(n) for n in FAMILIES.values())} layers", flush=True)
    planner = []
    for asset, layers in FAMILIES.items():
        config_dir = shape(asset, layers, work)
        checkpoint = random_checkpoint_phase(f"{asset} x{layers}", config_dir, work / "random")
        out = work / f"{asset}-held.json"
        load = Run(python(__file__, "--worker", "held", str(checkpoint), str(out)))
        held = json.loads(out.read_text())
        row(f"{asset} x{layers}: nf4 load + LoRA r 64 on its default targets", load.end - load.start, load.peak(), None)
        rows = planner_rows(config_dir, 1, 128)
        planned = weight_bytes(rows)
        check(held["total"] == planned, f"{asset} x{layers}: weights held = the planner's, {planned:,.0f} bytes")
        unquantized = f"{rows['unquantized parameters'] / GiB:.3f} planned, {held['unquantized'] / GiB:.3f} held"
        planner.append(
            [f"{asset} x{layers} weights (nf4 + constants + fp32 rest + LoRA)", f"{planned / GiB:.3f}",
             f"{held['total'] / GiB:.3f}", f"{held['quantized_layers']} nf4 layers; unquantized {unquantized}"]
        )  # fmt: skip
    return planner


def zero3_checks(output: str, run: Path, layers: int) -> int:
    """Each rank holds half the 4-bit storage; the checkpoint's shards hold only LoRA and optimizer state."""
    import re

    shards = re.findall(r"\[shards\] rank (\d): 4-bit storage (\d+) of (\d+) elements", output)
    local, full = int(shards[0][1]), int(shards[0][2])
    check(
        len(shards) == 2 and all(int(s[1]) == full // 2 for s in shards),
        f"40B ZeRO-3: each rank holds {local:,} of the {full:,} 4-bit storage elements (half)",
    )
    last = run / "checkpoints" / "last.ckpt"
    kinds = {}
    for f in last.rglob("*.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)
        if "module" in state:
            kinds.setdefault("model", []).append(all(".lora_" in k for k in (state["module"] or {})))
        else:
            kinds.setdefault("optimizer", []).append(f.stat().st_size)
    check(
        len(kinds.get("model", [])) == 2 and all(kinds["model"]) and len(kinds.get("optimizer", [])) == 2,
        f"40B ZeRO-3 checkpoint: 2 model shards holding only LoRA, 2 optimizer shards, "
        f"{dir_bytes(last) / 2**20:,.0f} MiB in all",
    )
    element = 4  # the 4-bit storage is kept in fp32 elements under ZeRO-3 (quant_storage), 8 packed weights each
    return local * element


# ----------------------------------------------------------------- workers (run in their own processes)
def worker_reload(checkpoint: str, adapter: str, out: str) -> None:
    """The nf4 base + the adapter through plain `PeftModel.from_pretrained`; its bytes and some logits."""
    from peft import PeftModel

    from lightning_falcon.model.quantization import load_causal_lm

    base = load_causal_lm(checkpoint, "nf4", True, torch.float32, torch.device("cpu"))
    footprint = base.get_memory_footprint()
    model = PeftModel.from_pretrained(base, adapter)
    held = held_bytes(model)
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    held["lora"], held["unquantized"] = lora, held["unquantized"] - lora  # PEFT loads the adapter frozen
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.save(logits, Path(out).with_name("reload-logits.pt"))
    Path(out).write_text(json.dumps({**held, "total": sum(held.values()), "footprint": footprint + lora}))


def worker_merged(merged: str, logits_path: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0].float()
    reference = torch.load(logits_path, weights_only=True)
    relative = float((logits - reference).norm() / reference.norm())
    top1 = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    Path(out).write_text(json.dumps({"relative": relative, "top1": top1}))


def worker_held(checkpoint: str, out: str) -> None:
    """Bytes a checkpoint's nf4 load with LoRA r 64 on its family's default targets holds, by the planner's rows."""
    from lightning_falcon.architectures import architecture
    from lightning_falcon.model.lora import apply_lora
    from lightning_falcon.model.quantization import load_causal_lm, quantized_layers

    base = load_causal_lm(checkpoint, "nf4", True, torch.float32, torch.device("cpu"))
    layers = len(quantized_layers(base))
    model = apply_lora(base, 64, 16, 0.1, architecture(base.config).lora_targets, gradient_checkpointing=True)
    held = held_bytes(model)
    Path(out).write_text(json.dumps({**held, "total": sum(held.values()), "quantized_layers": layers}))


def worker_layers(checkpoint: str, out: str) -> None:
    """Bytes each decoder layer holds after nf4 + LoRA r 64, and the rest (embeddings, final norm), counted."""
    from lightning_falcon.architectures import FALCON
    from lightning_falcon.model.lora import apply_lora
    from lightning_falcon.model.quantization import load_causal_lm

    base = load_causal_lm(checkpoint, "nf4", True, torch.float32, torch.device("cpu"))
    model = apply_lora(base, 64, 16, 0.1, FALCON.lora_targets, gradient_checkpointing=True)
    total = sum(held_bytes(model).values())
    layers = model.get_base_model().transformer.h
    per = [sum(held_bytes(layer).values()) for layer in layers]
    Path(out).write_text(json.dumps({"per_layer": per[0], "rest": total - sum(per), "layers": per}))


def main() -> None:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["7b", "40b", "families"])
    parser.add_argument("--workdir", default="/tmp/lightning_falcon-scale")
    parser.add_argument("--steps", type=int, default=2, help="7B optimizer steps before the resumed one")
    parser.add_argument("--max_length", type=int, default=256, help="7B sequence length")
    parser.add_argument("--layers_40b", type=int, default=2)
    parser.add_argument("--layers_7b", type=int, default=None, help="fewer 7B layers, to try the script quickly")
    parser.add_argument("--verbose", action="store_true", help="echo the children's output")
    parser.add_argument("--worker", choices=["reload", "merged", "layers", "held"])
    parser.add_argument("args", nargs="*")
    args = parser.parse_args()
    if args.worker:
        workers = {"reload": worker_reload, "merged": worker_merged, "layers": worker_layers, "held": worker_held}
        return workers[args.worker](*args.args)
    VERBOSE = args.verbose
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    planner = []
    if args.only in (None, "7b"):
        planner += seven_b(work, args.steps, args.max_length, args.layers_7b)
    if args.only in (None, "40b"):
        planner += forty_b(work, args.layers_40b, 1, 128)
    if args.only in (None, "families"):
        planner += families(work)
    print(f"\n{device_line()}; {versions()}; {time.strftime('%Y-%m-%d')}, {(time.time() - started) / 60:.0f} min\n")
    print(table(["phase", "wall s", "peak RssAnon GiB", "written GiB", "note"], ROWS))
    print()
    print(table(["planner against the measurement", "planned GiB", "measured GiB", "note"], planner))
    print("\nChecks that held:\n" + "\n".join(f"- {c}" for c in CHECKS))


if __name__ == "__main__":
    sys.exit(main())
