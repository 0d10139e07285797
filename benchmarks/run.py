"""Every benchmark in one command; prints Markdown tables for BENCHMARKS.md with the date, device and versions.

    pip install -e ".[bench]"
    python benchmarks/run.py            # about 25 minutes on 2 CPU cores; the GPU part runs only with CUDA
    python benchmarks/run.py --quick    # fewer steps and repeats: checks that the harness runs

A part that cannot run here says so and why ("not measured"); it never prints a figure it did not measure.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

from common import device_line, versions

HERE = Path(__file__).resolve().parent


def part(title: str, script: str, *args: str) -> None:
    print(f"\n# {title}\n\n$ python benchmarks/{script} {' '.join(args)}".rstrip(), flush=True)
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return
    lines = [line for line in proc.stdout.splitlines() if not line.startswith(("RESULT", "[data]"))]
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 steps, 1 repeat: the harness runs, figures are rough")
    args = parser.parse_args()
    steps, repeats = (["--steps", "30", "--warmup", "5"], "1") if args.quick else (["--steps", "200"], "5")

    import torch

    print(f"date {datetime.date.today()} | device {device_line()} | {versions()}")
    speed = ["--speed-steps", steps[1], "--warmup", "5" if args.quick else "20"]
    part("CPU: data pipeline", "data_pipeline.py", *speed, "--repeats", repeats)
    overhead = ["--repeats", repeats, "--interleaved-repeats", repeats]
    part("CPU: Lightning overhead (fit vs a hand-written loop)", "overhead.py", *steps, *overhead)
    try:
        import trl  # noqa: F401

        part("CPU: fit vs TRL SFTTrainer", "peer.py", *steps, "--repeats", repeats)
        dpo = ["--steps", "30", "--warmup", "5", "--repeats", "1"] if args.quick else []
        part("CPU: fit --model.objective dpo vs TRL DPOTrainer", "preference.py", *dpo)
    except ImportError:
        for title in ("CPU: fit vs TRL SFTTrainer", "CPU: fit --model.objective dpo vs TRL DPOTrainer"):
            print(f"\n# {title}\n\nnot measured: TRL is not installed (pip install -e '.[bench]')")
    part("CPU: serve under load, batched vs one at a time; the queue", "serve.py", *(["--quick"] if args.quick else []))
    if torch.cuda.is_available():
        part("GPU: Falcon-7B shape, QLoRA; Falcon-40B memory per layer", "gpu.py", *(["--quick"] if args.quick else []))
    else:
        print("\n# GPU: Falcon-7B shape, QLoRA; Falcon-40B memory per layer\n\nnot measured: no CUDA device here")


if __name__ == "__main__":
    sys.exit(main())
