"""The name this program was started by, for its usage lines and the fixes its errors name."""

from __future__ import annotations

import os
import sys


def program() -> str:
    """`lightning-falcon` when started as the console script, else `python -m lightning_falcon`."""
    return "lightning-falcon" if os.path.basename(sys.argv[0]) == "lightning-falcon" else "python -m lightning_falcon"
