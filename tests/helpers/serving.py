"""A real `serve` process for the tests, and two tiny adapters trained to answer differently."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import fit_in_process, tiny_arguments, write_jsonl

# What the second adapter learns to answer, whatever it is asked: no Midjourney prompt looks like it.
FIXED_ANSWER = "forty two"


def two_adapters(root: Path, steps: int = 150) -> dict[str, Path]:
    """Two adapters of the tiny default config: `prompts`, trained on the shipped Midjourney data, and `fixed`,
    trained to answer every request with FIXED_ANSWER. Same config, so `serve` renders for both alike."""
    from helpers import MIDJOURNEY

    requests = [json.loads(line)["prompt"] for line in Path(MIDJOURNEY).read_text().splitlines()]
    fixed = write_jsonl(root / "fixed.jsonl", [{"prompt": r, "response": FIXED_ANSWER} for r in requests[:200]])
    runs = {}
    for name, data in (("prompts", []), ("fixed", ["--data.dataset.dataset", fixed])):
        steps_args = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
        run = fit_in_process(root / name, *steps_args, *data)
        runs[name] = run / "adapter"
    return runs


@contextlib.contextmanager
def served(root: Path, *args: str, env: dict | None = None, config: str = "tiny.yaml") -> Iterator[str]:
    """`python -m lightning_falcon serve --config configs/CONFIG --port 0 ARGS` until the block ends: its base URL.

    The process is stopped at the end of the block whatever happens in it, and its output is kept in
    `root/serve.log`."""
    arguments = tiny_arguments(root, "serve", "--port", "0", *args, config=config)
    command = [sys.executable, "-m", "lightning_falcon", *arguments]
    log = (root / "serve.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []

    def read() -> None:  # the output is read to its end, so that a full pipe never blocks the server
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if not found and (m := re.search(r"\[serve\] listening on (http://\S+) ", line)):
                found.append(m.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not found and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert found, f"serve did not start (exit {proc.poll()}):\n{(root / 'serve.log').read_text()[-3000:]}"
        yield found[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        log.close()
