"""What a run's console leaves out: libraries' notices that a user of this program can do nothing about.

Each is silenced by its own text, only inside `python -m lightning_falcon` (a library user's process is
left as it is), and never an error or a warning about the user's own settings.
"""

from __future__ import annotations

import logging
import os
import warnings

# (category, start of the message): warnings raised inside the libraries, about the libraries.
WARNINGS = [
    # transformers 5 renamed the checkpointing API that PEFT's prepare_model_for_kbit_training calls
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
    # Lightning's own pytree helper, on torch 2.13
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
]
# (logger, start of the message): log records that advertise or report an optional extra.
RECORDS = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),  # Lightning's litlogger / litmodels advertisement
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
]


_quiet = False


class _DropStartingWith(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_console() -> None:
    """Silence `WARNINGS` and `RECORDS`, and Lightning's srun hint outside a Slurm job (inside one, a task
    started without srun is a real mistake, and the hint stays)."""
    global _quiet
    if _quiet:  # once a process: the log filters would pile up
        return
    _quiet = True
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    for name, start in RECORDS:
        logging.getLogger(name).addFilter(_DropStartingWith(start))
