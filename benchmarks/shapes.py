"""Real model shapes with fewer layers, and the bytes a loaded model really holds, for the scale tier and scale.py.

A shape is a shipped config.json (`lightning_falcon/assets/<name>/config.json`: real width, heads, KV heads,
vocabulary) with `num_hidden_layers` cut to N, written to a directory that `--model.model_name_or_path` takes
with `--model.random_init true`: the real loader then builds, quantizes and trains that architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lightning_falcon.assets import resolve
from lightning_falcon.model.quantization import constant_bytes, quantized_layers


def shape(asset: str, layers: int | None, root: Path, name: str = "", **changes) -> Path:
    """A directory holding the shipped `asset`'s config.json (`falcon-40b`, `falcon3-7b`, `falcon-h1-7b`, ...) with
    `layers` decoder layers (None: all of them) and any other config.json `changes` (a narrower width, say), named
    with `name` after the layer count."""
    config = json.loads((Path(resolve(f"asset:{asset}")) / "config.json").read_text())
    if layers is not None:
        config["num_hidden_layers"] = layers
    config.update(changes)
    out = Path(root) / f"{asset}-{config['num_hidden_layers']}layers{name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def falcon_shape(size: str, layers: int | None, root: Path, name: str = "", **changes) -> Path:
    """`shape` of falcon-`size` (`7b`, `40b`, `180b`, `11b`)."""
    return shape(f"falcon-{size}", layers, root, name, **changes)


def held_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes `model` holds, by the planner's rows: packed 4-bit/8-bit weights, their constants, every other
    parameter (biases of quantized layers included, as the planner counts them) and the trainable ones.
    Buffers (Falcon's rotary frequencies: 256 bytes) are not parameters and the planner leaves them out too.

    Counted from the tensors themselves (each storage once), not from `get_memory_footprint`, which leaves
    the quantization constants out (they are neither parameters nor buffers).
    """
    layers = quantized_layers(model)
    packed = {id(m.weight) for m in layers.values()}
    rows = {"quantized": 0, "constants": sum(constant_bytes(m) for m in layers.values()), "unquantized": 0, "lora": 0}
    for p in {id(p): p for p in model.parameters()}.values():
        size = p.numel() * p.element_size()
        if id(p) in packed:
            rows["quantized"] += size
        elif p.requires_grad:
            rows["lora"] += size
        else:
            rows["unquantized"] += size
    return rows


def _proc_bytes(path: str, field: str) -> int:
    """A `field: N kB` line of a /proc file, in bytes; 0 when the process has ended."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_anon_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory of a process (RssAnon): RSS without file mappings such as mmapped safetensors.
    0 for a process that has ended."""
    return _proc_bytes(f"/proc/{pid}/status", "RssAnon")


def pss_anon_bytes(pid: int | str = "self") -> int:
    """A process's proportional share of anonymous memory (Pss_Anon): a page it shares with others (copy-on-write
    after a fork) counts in part, so the sum over processes is what they hold together. 0 once it has ended."""
    return _proc_bytes(f"/proc/{pid}/smaps_rollup", "Pss_Anon")


def fit_arguments(
    config: str, shape: Path, random_dir: Path, root: Path, max_length: int, steps: int, *extra: str
) -> list[str]:
    """`fit` arguments for a shipped GPU config run on this CPU machine at a real shape with random weights.

    The config's model settings stand (nf4, double quantization, LoRA r 64 on the four projections,
    gradient checkpointing); only what a CPU needs changes: fp32 compute (bitsandbytes' bf16 4-bit path on
    CPU is far slower), torch's AdamW (the CPU figures in BENCHMARKS.md were taken with it), one sequence per
    step, and the shipped tiny tokenizer (no Hub download). The random checkpoint is written once into `random_dir`; the
    run's data cache and logs go under `root`.
    """
    return [
        "fit", "--config", config,
        "--model.model_name_or_path", str(shape), "--model.random_init", "true",
        "--model.random_init_dir", str(random_dir), "--data.tokenizer", "asset:tiny-falcon",
        "--data.cache_dir", str(root / "cache"), "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compute_dtype", "fp32",
        "--model.optimizer", "adamw",
        "--data.batch_size", "1", "--data.max_length", str(max_length), "--trainer.accumulate_grad_batches", "1",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1", "--generation.max_new_tokens", "4",
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip
