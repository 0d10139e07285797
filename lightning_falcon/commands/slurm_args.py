"""Slurm: the fit arguments a job's allocation implies, checked against the config before `srun`.

    python -m lightning_falcon slurm-args --config configs/falcon-40b-qlora.yaml [overrides]

`slurm/fit.sbatch` and `slurm/fit-multinode.sbatch` run this on the batch node, then
`srun python -m lightning_falcon fit --config ... <these arguments>`. It prints, one per line:

* `--trainer.devices=T --trainer.num_nodes=N`: T tasks per node (one per GPU) and N nodes, read from
  Slurm's environment, so the trainer always matches the allocation;
* `--trainer.logger.init_args.version=slurm-JOBID`: the job logs to `runs/<name>/slurm-JOBID/`, the
  same directory after each requeue, so its checkpoints, TensorBoard events and adapter stay together;
* on a restart (SLURM_RESTART_COUNT > 0), `--ckpt_path=last`. The version being pinned, `last` means
  this job's own last checkpoint when it has one (`runs.find_last`), never another run's, so a
  requeued job resumes where it stopped, or from step 0 if it never saved.

It fails, in one line listing every problem, when the allocation runs a number of tasks per node
other than its GPUs, when the config (or an override) pins `trainer.devices` or
`trainer.num_nodes` to something the allocation contradicts, or when the rendezvous host (MASTER_ADDR,
else the job's first node) does not resolve: torch would wait for it, silently, for 30 minutes.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from lightning.fabric.plugins.environments import SLURMEnvironment

from lightning_falcon.commands.cli import ParseOnlyCLI, parse_only
from lightning_falcon.commands.plan import device_count
from lightning_falcon.errors import ConfigError

# Loggers whose `version` names the run directory; others are left to number their own runs.
VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


@dataclass(frozen=True)
class Allocation:
    """What a Slurm job was given, from the environment of its batch step."""

    job_id: str
    nodes: int
    tasks_per_node: list[int]  # one entry per node; uniform for the scripts' --ntasks-per-node
    gpus_per_node: int
    restarts: int
    rendezvous: str  # where the ranks meet: MASTER_ADDR, else the first node of the job (as Lightning picks it)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Allocation:
        if "SLURM_JOB_ID" not in env:
            raise ConfigError("not inside a Slurm job (SLURM_JOB_ID is unset): submit with sbatch slurm/fit.sbatch")
        job = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        tasks = expand_tasks_per_node(env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or "1")
        # As Lightning picks it: MASTER_ADDR when set (even empty), else the first node of the job.
        rendezvous = env.get("MASTER_ADDR")
        if rendezvous is None:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
            rendezvous = SLURMEnvironment.resolve_root_node_address(nodelist)
        return cls(job, nodes, tasks, gpus_per_node(env), int(env.get("SLURM_RESTART_COUNT") or 0), rendezvous)


def expand_tasks_per_node(value: str) -> list[int]:
    """Slurm's compressed SLURM_TASKS_PER_NODE: "8(x2),4" -> [8, 8, 4]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ConfigError(f"cannot read SLURM_TASKS_PER_NODE={value!r}: submit with --ntasks-per-node=N")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs on each node: SLURM_GPUS_ON_NODE, else the count in SLURM_GPUS_PER_NODE ("8", "a100:8"), else the
    GPUs listed in SLURM_JOB_GPUS ("0,1,2,3", set for --gres=gpu:N), else 0."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    match = re.search(r"(\d+)\s*$", env.get("SLURM_GPUS_PER_NODE", ""))
    if match:
        return int(match[1])
    return len([g for g in env.get("SLURM_JOB_GPUS", "").split(",") if g.strip()])


def fit_arguments(explicit: Mapping, resolved: Mapping, alloc: Allocation) -> list[str]:
    """The arguments that fit the trainer to `alloc`, or a ConfigError listing every contradiction.

    `explicit` holds only what the config files and overrides set (dotted keys); `resolved` the
    same with defaults, to find the logger.
    """
    tasks = alloc.tasks_per_node[0]
    problems = []
    if len(set(alloc.tasks_per_node)) > 1:
        problems.append(
            f"the allocation runs a different number of tasks on each node ({alloc.tasks_per_node}): "
            "submit with --ntasks-per-node=G, one task per GPU"
        )
    if alloc.gpus_per_node and alloc.gpus_per_node != tasks:
        problems.append(
            f"the allocation has {alloc.gpus_per_node} GPUs but {tasks} tasks per node: ask for one task per GPU, "
            f"e.g. sbatch --gpus-per-node={alloc.gpus_per_node} --ntasks-per-node={alloc.gpus_per_node}"
        )
    devices = device_count(explicit.get("trainer.devices"))
    if devices is not None and devices != tasks:
        problems.append(
            f"trainer.devices is {devices} but the allocation runs {tasks} task(s) per node: add "
            f"--trainer.devices auto (the allocation then decides) or submit with --ntasks-per-node={devices} "
            f"--gpus-per-node={devices}"
        )
    num_nodes = explicit.get("trainer.num_nodes")
    if num_nodes is not None and int(num_nodes) != alloc.nodes:
        problems.append(
            f"trainer.num_nodes is {num_nodes} but the allocation has {alloc.nodes} node(s): remove "
            f"trainer.num_nodes from the config or submit with --nodes={num_nodes}"
        )
    accelerator = str(resolved.get("trainer.accelerator") or "auto")
    if accelerator in ("gpu", "cuda") and alloc.gpus_per_node == 0:
        problems.append(
            f"trainer.accelerator is {accelerator} but the allocation has no GPUs: submit with --gpus-per-node=N, "
            "or --trainer.accelerator cpu"
        )
    if alloc.nodes * tasks > 1 and not alloc.rendezvous.strip():
        problems.append("MASTER_ADDR is set but empty: unset it, or export the first node's address")
    elif alloc.nodes * tasks > 1 and not resolves(alloc.rendezvous):
        problems.append(
            f"the rendezvous host {alloc.rendezvous} (the job's first node) does not resolve, so every rank would wait "
            "for it: export MASTER_ADDR=<that node's address> in the script's Environment block"
        )
    ConfigError.collect(problems)

    args = [f"--trainer.devices={tasks}", f"--trainer.num_nodes={alloc.nodes}"]
    logger = resolved.get("trainer.logger")
    class_path = str(getattr(logger, "class_path", "") or "")
    init_args = getattr(logger, "init_args", None)
    if class_path.endswith(VERSIONED_LOGGERS) and getattr(init_args, "version", None) is None:
        args.append(f"--trainer.logger.init_args.version=slurm-{alloc.job_id}")
    if alloc.restarts > 0 and explicit.get("ckpt_path") is None:
        args.append("--ckpt_path=last")  # resolved by the CLI inside this job's own directory (runs.find_last)
    return args


def resolves(host: str) -> bool:
    try:
        socket.gethostbyname(host)
    except OSError:
        return False
    return True


class SlurmArgsCLI(ParseOnlyCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # fit's own argument, passed through the sbatch scripts: a resubmitted job names its checkpoint.
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="As for fit")


def main(args: list[str]) -> None:
    """`slurm-args`, inside a Slurm job: print the fit arguments its allocation implies, one per line."""
    alloc = Allocation.from_env()  # first: outside a job nothing else matters
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the arguments, for the sbatch script
        cli = parse_only(SlurmArgsCLI, args, "slurm-args")
        explicit = cli.parser.parse_args(args, defaults=False)  # only what the config files and overrides set
    print("\n".join(fit_arguments(explicit, cli.config, alloc)))
