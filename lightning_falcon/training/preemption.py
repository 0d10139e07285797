"""Slurm preemption: save at a step boundary, requeue, and exit, instead of losing the job's work.

Slurm warns a job before its time limit with the signal of `#SBATCH --signal=SIGUSR1@90` (and at
preemption too, where the cluster sets `PreemptParameters=send_user_signal`). Lightning's own
auto-requeue saves its checkpoint inside the signal handler, which can run in the middle of a
backward pass or a collective and then hangs or writes a torn state (pytorch-lightning #21406), and
it leaves a new `hpc_ckpt_N.ckpt` behind at every requeue (#6204). Its SIGTERM handler broadcasts
inside the handler too. `SlurmRequeue` replaces both:

* the handlers only set a flag. The CLI installs the SIGUSR1 one as the process starts under Slurm
  (`listen`), so a warning that comes while the model loads is kept, not fatal;
* at the next optimizer step, every rank learns whether any rank got a signal (one all-reduce of two
  numbers per step, only under Slurm with several ranks), and together they write the periodic
  checkpoint due at that step, if any, and `last.ckpt`, the file `--ckpt_path last` resumes from;
* on SIGUSR1, rank 0 then runs `scontrol requeue` and every rank leaves fit, skipping the end-of-fit
  work (the adapter is written only when training really ends). A failed requeue exits non-zero;
* on SIGTERM (a preemption without the user signal, `scancel`, a time limit with no warning) they
  leave the same way without requeueing: PreemptMode=REQUEUE requeues by itself, a cancel stays cancelled.

A signal that arrives with the last step done changes nothing: fit ends normally.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_falcon.training.checkpoint_io import checkpoint_dir
from lightning_falcon.upstream import cluster_environment, write_due_checkpoints

# Set by the handlers, read at step boundaries: "stop" for SIGTERM, "requeue" for the warning signal.
_received = {"requeue": False, "stop": False}


def _on_signal(signum, frame) -> None:
    # Nothing else here: a signal handler runs between any two bytecodes, even inside a collective.
    _received["stop" if signum == signal.SIGTERM else "requeue"] = True


def listen(signum: int = signal.SIGUSR1):
    """From now on, `signum` only sets a flag that `SlurmRequeue` acts on. Returns the old handler."""
    return signal.signal(signum, _on_signal)


class Interrupted(SystemExit):
    """Leaves fit after the interruption checkpoint: a SystemExit, so the CLI ends without a traceback."""


class SlurmRequeue(Callback):
    """On Slurm's warning signal, checkpoint at the next optimizer step, requeue the job and exit. No-op elsewhere."""

    def __init__(self) -> None:
        self.active = False
        self._step: int | None = None
        self._previous: dict[int, object] = {}
        self._signum = signal.SIGUSR1

    # ----------------------------------------------------------------- set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = cluster_environment(trainer)
        if stage != "fit" or not isinstance(environment, SLURMEnvironment):
            return
        # Lightning registers its own handler in fit's _run, after this hook, unless auto_requeue is off.
        environment.auto_requeue = False
        self._signum = environment.requeue_signal or signal.SIGUSR1
        self._previous[self._signum] = listen(self._signum)
        self.active = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step
        if self.active:
            # Lightning has just installed its SIGTERM handler (it broadcasts inside the handler): replace it.
            self._previous.setdefault(signal.SIGTERM, listen(signal.SIGTERM))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}
        self.active = False

    # ----------------------------------------------------------------- the step boundary
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active or trainer.global_step == self._step:
            return  # elsewhere, or inside a gradient-accumulation window
        self._step = trainer.global_step
        requeue_signal, stop_signal = _received["requeue"], _received["stop"]
        if trainer.world_size > 1:  # any rank's signal stops them all at this same step
            flags = torch.tensor([float(requeue_signal), float(stop_signal)], device=trainer.strategy.root_device)
            requeue_signal, stop_signal = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        if not (requeue_signal or stop_signal) or 0 < trainer.max_steps <= trainer.global_step:
            return
        name = "requeue signal" if requeue_signal else "SIGTERM"
        rank_zero_info(f"[slurm] {name}: saving at step {trainer.global_step}")
        # ModelCheckpoint runs after this callback: a periodic checkpoint due at this step is written first.
        write_due_checkpoints(trainer, pl_module, outputs, batch, batch_idx)
        path = save_last(trainer)
        trainer.strategy.barrier("interruption checkpoint saved")
        if not requeue_signal:
            rank_zero_info(f"[slurm] SIGTERM: saved {path} at step {trainer.global_step}; exiting")
            raise Interrupted(0)
        # The requeue ends this job with SIGTERM: the checkpoint is safe, so let it pass.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problem = trainer.strategy.broadcast(requeue() if trainer.is_global_zero else None, src=0)
        if problem:
            rank_zero_warn(f"[slurm] saved {path}, but {problem}. Fix: resubmit with --ckpt_path {path}")
            raise Interrupted(1)
        rank_zero_info(f"[slurm] saved {path} at step {trainer.global_step}; job requeued, exiting")
        raise Interrupted(0)


def save_last(trainer) -> Path:
    """Write the run's `last.ckpt` (the file `--ckpt_path last` resumes from) through ModelCheckpoint's path."""
    callback = trainer.checkpoint_callback
    path = checkpoint_dir(trainer) / "last.ckpt"
    if callback is not None and callback.dirpath:
        path = path.with_name(f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")
        callback.last_model_path = str(path)  # recorded in the checkpoint, so its next save_last overwrites it
    trainer.save_checkpoint(path)
    return path


def requeue() -> str | None:
    """`scontrol requeue` this job (or array task): Slurm stops it and queues it again with the same id.

    Returns None, or what went wrong (the cluster may forbid requeueing: JobRequeue=0, --no-requeue).
    """
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e})"
    if proc.returncode != 0:
        return f"scontrol requeue {job} failed ({proc.stderr.strip() or proc.returncode})"
    return None
