"""The command surface a user meets first: the top-level help, under the name the program was started by."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lightning_falcon.commands.main import COMMANDS

HEAVY = ("torch", "lightning", "transformers", "peft", "bitsandbytes", "datasets")


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)


@pytest.mark.parametrize("launcher", ["module", "console script"])
def test_the_top_level_help_lists_every_subcommand_under_the_programs_name(launcher):
    # pip puts the console script beside the interpreter it installed into
    script = shutil.which("lightning-falcon", path=str(Path(sys.executable).parent))
    if launcher == "console script" and script is None:
        pytest.skip("the lightning-falcon console script is not installed (pip install -e .)")
    command, name = (
        ([sys.executable, "-m", "lightning_falcon"], "python -m lightning_falcon")
        if launcher == "module"
        else ([script], "lightning-falcon")
    )
    proc = run([*command, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {name} SUBCOMMAND")
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS) >= {"fit", "predict", "evaluate", "export", "plan", "prefetch", "slurm-args"}
    assert all(len(line) > 20 for line, _ in COMMANDS.values())  # a real line each, not just the name
    assert run(command).stdout == proc.stdout  # no subcommand: the same help


def test_the_top_level_help_loads_none_of_the_heavy_libraries():
    code = (
        "import sys; sys.argv = ['lightning-falcon', '--help']; "
        "from lightning_falcon.commands.main import main; main(); "
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0 and "LOADED []" in proc.stdout, proc.stdout[-500:] + proc.stderr[-2000:]


def test_an_unknown_subcommand_is_one_line_with_the_list():
    proc = run([sys.executable, "-m", "lightning_falcon", "trian", "--config", "configs/tiny.yaml"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "python -m lightning_falcon: error: unknown subcommand 'trian'"
    assert "  fit " in proc.stderr


@pytest.mark.parametrize("subcommand", ["fit", "plan", "export"])
def test_each_subcommand_keeps_its_own_help_under_the_programs_name(subcommand):
    proc = run([sys.executable, "-m", "lightning_falcon", subcommand, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m lightning_falcon ") and subcommand in proc.stdout.splitlines()[0]
