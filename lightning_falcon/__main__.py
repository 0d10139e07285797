"""`python -m lightning_falcon fit --config configs/tiny.yaml`: builds the CLI and nothing else."""

import os
import signal

if "SLURM_JOB_ID" in os.environ:
    # Slurm's warning signal (SIGUSR1) kills by default; until the CLI listens for it (after these
    # imports), a preemption warning must not end the task.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

from lightning_falcon.commands.main import main

if __name__ == "__main__":
    main()
