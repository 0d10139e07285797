"""Slurm preemption: save at a step boundary, requeue, and exit, instead of losing the job's work.

Slurm warns a job before its time limit with the signal of `#SBATCH --signal=SIGUSR1@90` (and at
preemption too, where the cluster sets `PreemptParameters=send_user_signal`). Lightning's own
auto-requeue saves its checkpoint inside the signal handler, which can run in the middle of a
backward pass or a collective and then hangs or writes a torn state (pytorch-lightning #21406), and
it leaves a new `hpc_ckpt_N.ckpt` behind at every requeue (#6204). `SlurmRequeue` replaces it:

* the handler only sets a flag. The CLI installs it as the process starts under Slurm (`listen`), so a
  signal that comes while the model loads is kept, not fatal (SIGUSR1's default action kills);
* at the next optimizer step, every rank learns whether any rank got the signal (one all-reduce
  of a scalar per step, only under Slurm), and together they write `last.ckpt` in the run's
  checkpoint directory, the file `--ckpt_path last` resumes from;
* then rank 0 runs `scontrol requeue`, and every rank leaves fit with exit code 0, skipping the
  end-of-fit work (the adapter is written only when training really ends).

A job that gets SIGTERM instead (a preemption without the user signal, `scancel`, a time limit
with no warning) is stopped by Lightning at the next batch; this callback saves `last.ckpt` on the
way out and leaves requeueing to Slurm (PreemptMode=REQUEUE requeues by itself; a cancel stays cancelled).
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
from lightning.pytorch.utilities.exceptions import SIGTERMException

_received = False  # set by the handler; read at step boundaries


def _on_signal(signum, frame) -> None:
    # Nothing else here: a signal handler runs between any two bytecodes, even inside a collective.
    global _received
    _received = True


def listen(signum: int = signal.SIGUSR1):
    """From now on, Slurm's warning signal only sets a flag that `SlurmRequeue` acts on. Returns the old handler."""
    return signal.signal(signum, _on_signal)


def received() -> bool:
    return _received


class Requeued(SystemExit):
    """Leaves fit after the requeue checkpoint: a SystemExit with code 0, so no traceback and no error."""

    def __init__(self) -> None:
        super().__init__(0)


class SlurmRequeue(Callback):
    """On Slurm's warning signal, checkpoint at the next optimizer step, requeue the job and exit. No-op elsewhere."""

    def __init__(self) -> None:
        self.active = False
        self._step: int | None = None
        self._previous = None
        self._signum = signal.SIGUSR1

    # ----------------------------------------------------------------- set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(environment, SLURMEnvironment):
            return
        # Lightning registers its own handler in fit's _run, after this hook, unless auto_requeue is off.
        environment.auto_requeue = False
        self._signum = environment.requeue_signal or signal.SIGUSR1
        self._previous = listen(self._signum)
        self.active = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.active and self._previous is not None:
            signal.signal(self._signum, self._previous)
        self.active = False

    # ----------------------------------------------------------------- the step boundary
    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active or trainer.global_step == self._step:
            return  # elsewhere, or inside a gradient-accumulation window
        self._step = trainer.global_step
        requested = received()
        if trainer.world_size > 1:  # any rank's signal stops them all at this same step
            flag = torch.tensor(float(requested), device=trainer.strategy.root_device)
            requested = trainer.strategy.reduce(flag, reduce_op="sum").item() > 0
        if not requested:
            return
        rank_zero_info(f"[slurm] requeue signal: saving at step {trainer.global_step}")
        path = save_last(trainer)
        trainer.strategy.barrier("requeue checkpoint saved")
        # The requeue terminates this job with SIGTERM; the checkpoint is safe, so let it pass.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if trainer.is_global_zero:
            requeue()
            rank_zero_info(f"[slurm] saved {path} at step {trainer.global_step}; job requeued, exiting")
        raise Requeued()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.active and isinstance(exception, SIGTERMException):
            path = save_last(trainer)
            rank_zero_info(f"[slurm] SIGTERM: saved {path} at step {trainer.global_step}")


def save_last(trainer) -> Path:
    """Write the run's `last.ckpt` (the file `--ckpt_path last` resumes from) through ModelCheckpoint's path."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        callback.last_model_path = str(path)  # recorded in the checkpoint, so its next save_last overwrites it
    else:
        path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def requeue() -> None:
    """`scontrol requeue` this job (or array task): Slurm stops it and queues it again with the same id."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({proc.stderr.strip()}); resubmit with --ckpt_path last")
