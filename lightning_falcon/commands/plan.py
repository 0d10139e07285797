"""`python -m lightning_falcon plan`: the per-GPU memory of a config, for its strategy and every alternative.

python -m lightning_falcon plan --config configs/falcon-40b-qlora.yaml
python -m lightning_falcon plan --config configs/falcon-7b-qlora.yaml --devices 4 --gpu_memory 24GB
python -m lightning_falcon plan --config configs/falcon-180b-qlora.yaml --devices 8 --nodes 2 --gpu_memory 141GB

This reads the config as fit would (and refuses what fit would refuse), counts with `model/memory.py`,
whose docstring gives the formula, and prints the table, then the fewest nodes of `--devices` GPUs at which
the config's strategy fits `--gpu_memory`, or what stops every node count.
"""

from __future__ import annotations

import re

import torch

from lightning_falcon.architectures import architecture
from lightning_falcon.assets import resolve
from lightning_falcon.commands.cli import ParseOnlyCLI, check_config, parse_only
from lightning_falcon.model.config import read_model_config, warn_remote_code
from lightning_falcon.model.memory import (
    STRATEGIES,
    GiB,
    ModelCount,
    Plan,
    Setup,
    activation_bytes,
    attention_kernel,
    count_model,
    fewest_nodes,
    peak,
    plan,
)
from lightning_falcon.model.preference import PAIRED, REFERENCED
from lightning_falcon.training.strategy import StrategySettings


def parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '80' (GiB) or '24 GB' -> bytes. GB here means GiB, as GPU specs use it."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB")
    value, unit = float(match.group(1)), match.group(2) or "gb"
    return value * (GiB if unit.startswith("g") else 2**20)


def render(
    count: ModelCount, setup: Setup, plans: list[Plan], current: str, devices: int, gpu_memory: float, title: str
) -> str:
    """The table `plan` prints: components by strategy, in GiB, with a verdict per strategy, then the fewest nodes
    of `devices` GPUs at which the `current` strategy fits."""
    names = [p.strategy + ("*" if p.strategy == current else "") for p in plans]
    width = max(24, *(len(n) + 2 for n in names))
    lines = [title, f"{'per GPU, GiB':<26}" + "".join(f"{n:>{width}}" for n in names)]
    for row in plans[0].rows:
        lines.append(f"{row:<26}" + "".join(f"{p.rows[row] / GiB:>{width}.2f}" for p in plans))
    lines.append(f"{'total':<26}" + "".join(f"{p.total / GiB:>{width}.2f}" for p in plans))
    lines.append(
        f"{'load peak (ZeRO-3)':<26}"
        + "".join(f"{(p.load_peak / GiB if p.load_peak else 0):>{width}.2f}" for p in plans)
    )
    verdicts = ["fits" if peak(p) <= gpu_memory else "does not fit" for p in plans]
    lines.append(f"{f'verdict ({gpu_memory / GiB:.0f} GiB GPU)':<26}" + "".join(f"{v:>{width}}" for v in verdicts))
    lines.append(nodes_line(count, setup, current, devices, gpu_memory))
    lines.append(f"attention: {attention_kernel(count, setup).name}")
    if setup.objective in PAIRED:
        lines.append(objective_line(setup))
    forward = "activations + attention + logits" + (" + reference forward" if setup.reference_forward else "")
    lines.append(
        f"{forward}: {activation_bytes(count, setup, True) / GiB:.2f} GiB with gradient "
        f"checkpointing, {activation_bytes(count, setup, False) / GiB:.2f} GiB without"
    )
    lines.append(
        "* = this config's strategy. Weights are exact counts; activations, attention and workspace are estimates."
    )
    return "\n".join(lines)


def objective_line(setup: Setup) -> str:
    """One line: what a preference objective adds to the plan (none for sft, whose plan is the table alone)."""
    line = (
        f"objective {setup.objective}: 2 sequences per pair ({setup.sequences} a forward for "
        f"{setup.batch_size} pair(s))"
    )
    if setup.objective not in REFERENCED:
        return line + ", no reference"
    reference = "a frozen copy of model.adapter" if setup.reference_adapter else "the base, the adapter switched off"
    if setup.precompute_reference:
        return line + f"; the reference's log-probabilities ({reference}) computed once before training, none a step"
    return line + f", reference forward without gradients ({reference}; no second base)"


def nodes_line(count: ModelCount, setup: Setup, strategy: str, devices: int, gpu_memory: float) -> str:
    """One line: the fewest nodes of `devices` GPUs at which `strategy` fits `gpu_memory`, or what stops every count."""
    found = fewest_nodes(count, setup, strategy, devices, gpu_memory)
    gpus = f"{gpu_memory / GiB:.0f} GiB GPUs"
    p = found.plan
    if found.nodes is not None:
        loading = f", {p.load_peak / GiB:.2f} GiB while loading" if p.load_peak else ""
        return (
            f"nodes: {p.strategy} fits {gpus} from {found.nodes} node(s) of {devices} GPU(s) "
            f"({p.total / GiB:.2f} GiB per GPU{loading})"
        )
    if p.load_peak > gpu_memory:
        base = plan(count, setup, "single").rows["quantized base weights"]
        return (
            f"nodes: no node count fits {gpus} with {p.strategy}: the load peak, {p.load_peak / GiB:.2f} GiB, is the "
            f"same at any node count, since each GPU holds the whole 4-bit base ({base / GiB:.2f} GiB) while it "
            "loads, before DeepSpeed shards it"
        )
    row, size = max(p.rows.items(), key=lambda item: item[1])
    return (
        f"nodes: no node count fits {gpus} with {p.strategy}: {row} ({size / GiB:.2f} GiB) and the other rows it does "
        f"not divide stay {p.total / GiB:.2f} GiB per GPU at any node count"
    )


def setup_of(model, data, trainer, world_size: int) -> Setup:
    """What the planner needs from a parsed config's model, data and trainer sections, at `world_size` GPUs."""
    return Setup(
        quantization=model.quantization,
        double_quant=model.double_quant,
        compute_bytes=4 if model.compute_dtype == "fp32" else 2,  # auto is bf16/fp16 on a GPU
        gradient_checkpointing=model.gradient_checkpointing,
        optimizer=model.optimizer,
        batch_size=data.batch_size,
        max_length=data.max_length,
        world_size=world_size,
        mixed_16bit="16" in str(trainer.precision),
        upcast_frozen=model.upcast_frozen,
        loss_chunk_size=model.loss_chunk_size,
        attn_implementation=model.attn_implementation,
        fused_attention=model.fused_attention,
        objective=model.get("objective", "sft"),
        reference_adapter=model.get("adapter") is not None,
        precompute_reference=bool(model.get("precompute_reference", False)),
    )


def report(model, data, trainer, devices: int | None, num_nodes: int | None, gpu_memory: str) -> str:
    """The `plan` table for a parsed config (its model/data/trainer sections); devices/num_nodes override it.

    A config fit would refuse is refused here too, with fit's line (`cli.check_config`); fit's checks of the
    machine it runs on are left out, since plan is for planning a GPU run from another machine.
    """
    devices = devices if devices is not None else gpu_count(trainer.devices)
    nodes = num_nodes if num_nodes is not None else int(trainer.num_nodes or 1)
    setup = setup_of(model, data, trainer, devices * nodes)
    hf_config, source = model_config(model.model_name_or_path, model.trust_remote_code)
    family = architecture(hf_config)
    targets = model.target_modules if model.target_modules is not None else family.lora_targets
    strategy = StrategySettings.from_config(trainer.strategy)
    count = count_model(hf_config, targets, model.lora_r, quantized=model.quantization != "none")
    check_config(
        strategy,
        model.quantization,
        model.optimizer,
        targets,
        count.linear_modules,
        family,
        data.batching,
        model.objective,
    )
    plans = [plan(count, setup, name) for name in STRATEGIES]
    pairs = " pairs" if setup.objective in PAIRED else ""
    title = (
        f"{model.model_name_or_path}{source}: {len(count.quantized)} {model.quantization} layers, "
        f"LoRA r={model.lora_r} ({count.lora:,} params), batch {data.batch_size}{pairs} x {data.max_length} tokens, "
        f"{devices} GPU(s) x {nodes} node(s)"
    )
    current = strategy_name(strategy, devices * nodes)
    return render(count, setup, plans, current, devices, parse_bytes(gpu_memory), title)


def device_count(devices) -> int | None:
    """`trainer.devices` as a count: 4, "4", [0, 1] or "0,1"; None for "auto" and -1 (take what is there)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1", "None", ""):
        return None
    if "," in text or text.startswith("["):
        return len([d for d in text.strip("[]").split(",") if d.strip()])
    return int(text)


def gpu_count(devices) -> int:
    """`trainer.devices` as a number of GPUs; "auto" or -1 counts this machine's."""
    return device_count(devices) or max(torch.cuda.device_count(), 1)


def strategy_name(strategy: StrategySettings, world_size: int) -> str:
    """The planner's name for the strategy a config names."""
    if not strategy.deepspeed:
        return "ddp" if world_size > 1 else "single"
    if strategy.stage == 3:
        offload = strategy.offloads_optimizer or strategy.offloads_parameters
        return "deepspeed-zero3-offload" if offload else "deepspeed-zero3"
    return "deepspeed-zero2"


# The architectures of these Hub models ship with the package, so `plan` works without the Hub.
SHIPPED_CONFIGS = {
    "tiiuae/falcon-7b": "asset:falcon-7b",
    "tiiuae/falcon-7b-instruct": "asset:falcon-7b",
    "tiiuae/falcon-40b": "asset:falcon-40b",
    "tiiuae/falcon-40b-instruct": "asset:falcon-40b",
    "tiiuae/falcon-180B": "asset:falcon-180b",
    "tiiuae/falcon-180B-chat": "asset:falcon-180b",
    "tiiuae/falcon-11B": "asset:falcon-11b",
    "tiiuae/Falcon3-7B-Base": "asset:falcon3-7b",
    "tiiuae/Falcon3-7B-Instruct": "asset:falcon3-7b",
    "tiiuae/Falcon-H1-0.5B-Base": "asset:falcon-h1-0.5b",
    "tiiuae/Falcon-H1-0.5B-Instruct": "asset:falcon-h1-0.5b",
    "tiiuae/Falcon-H1-7B-Base": "asset:falcon-h1-7b",
    "tiiuae/Falcon-H1-7B-Instruct": "asset:falcon-h1-7b",
}


def model_config(model_name_or_path: str, trust_remote_code: bool):
    """(config.json, a note on its source): a local directory or the HF cache, else the shipped copy, else the Hub."""
    from transformers import AutoConfig

    if trust_remote_code:
        warn_remote_code(model_name_or_path)
    try:  # a local directory, or the Hub model already in the local cache
        return AutoConfig.from_pretrained(
            resolve(model_name_or_path), trust_remote_code=trust_remote_code, local_files_only=True
        ), ""
    except OSError:
        pass
    if model_name_or_path in SHIPPED_CONFIGS:  # no need to wait for the Hub: the architecture is known
        shipped = SHIPPED_CONFIGS[model_name_or_path]
        return read_model_config(shipped), f" (architecture from the shipped {shipped})"
    return read_model_config(model_name_or_path, trust_remote_code), ""


class PlanCLI(ParseOnlyCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--devices", type=int | None, default=None, help="GPUs per node (default: the config's)")
        parser.add_argument(
            "--num_nodes", "--nodes", type=int | None, default=None, help="Nodes (default: the config's)"
        )
        parser.add_argument(
            "--gpu_memory", type=str, default="80GB", help="Memory of one GPU for the verdict, e.g. 24GB, 40GB, 80GB"
        )


def main(args: list[str]) -> None:
    """`plan`: print the per-GPU memory of a config for its strategy and every alternative."""
    config = parse_only(PlanCLI, args, "plan").config
    print(report(config.model, config.data, config.trainer, config.devices, config.num_nodes, config.gpu_memory))
