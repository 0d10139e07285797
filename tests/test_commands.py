"""The command surface a user meets first: the top-level help, under the name the program was started by."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from lightning_falcon.commands.main import COMMANDS

HEAVY = ("torch", "lightning", "transformers", "peft", "bitsandbytes", "datasets")


def run(command: list[str]) -> subprocess.CompletedProcess:
    # This checkout's package, whichever one the console script's editable install points at.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=False)


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
    assert proc.stderr.strip().splitlines()[-1] == "lightning_falcon: error: unknown subcommand 'trian'"
    assert "  fit " in proc.stderr


@pytest.mark.parametrize("subcommand", ["fit", "plan", "export", "chat"])
def test_each_subcommand_keeps_its_own_help_under_the_programs_name(subcommand):
    proc = run([sys.executable, "-m", "lightning_falcon", subcommand, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m lightning_falcon ") and subcommand in proc.stdout.splitlines()[0]


def test_the_readmes_first_screen_names_only_subcommands_and_configs_that_exist():
    """The first-hour block: install without extras, then fit, chat and TensorBoard (the slow tier runs the
    same fit and chat commands: tests/test_chat.py)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## The first hour", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].split() for line in block.splitlines()]
    ours = [words for words in commands if words[:3] == ["python", "-m", "lightning_falcon"]]
    assert [words[3] for words in ours] == ["fit", "chat"]
    for words in ours:
        assert words[3] in COMMANDS and (REPO / words[words.index("--config") + 1]).is_file()
    assert ["pip", "install", "-e", "."] in commands and ["tensorboard", "--logdir", "runs"] in commands


@pytest.mark.slow
@pytest.mark.parametrize("console", ["terminal", "pipe"])
def test_a_fit_console_shows_ours_and_none_of_the_libraries_notices(tmp_path, console):
    """On a real pseudo-terminal (the Rich bar) and through pipes (progress lines, as in a Slurm log)."""
    import pexpect

    # A stand-in `srun` on PATH: Lightning's srun hint appears wherever Slurm is installed, outside a job too.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    command = [
        sys.executable, "-m", "lightning_falcon", "fit", "--config", str(REPO / "configs" / "tiny.yaml"),
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--generation.samples", "[]",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--data.cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    if console == "terminal":
        child = pexpect.spawn(command[0], command[1:], cwd=str(tmp_path), env=env, encoding="utf-8", timeout=600)
        child.expect(pexpect.EOF)
        child.close()
        returncode, output = child.exitstatus, child.before
    else:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    assert returncode == 0, output[-3000:]
    noise = [
        "The `srun` command is available",  # Lightning, outside a Slurm job
        "💡 Tip",  # Lightning's litlogger / litmodels advertisement
        "Setting accelerator to CPU",  # DeepSpeed, though not in use
        "is deprecated",  # FutureWarnings from transformers and Lightning internals
        "Total estimated model params size",  # Lightning's summary, untrue of a 4-bit model
        "Epoch 0/-2",  # Lightning's bar in a run bounded by steps
        "Failed to load CPU gemm_4bit_forward",  # bitsandbytes' optional kernel
    ]
    assert not [line for line in output.splitlines() if any(n in line for n in noise)], output[-3000:]
    assert "[model] quantized linear layers: 8 | trainable params:" in output  # the 4-bit-aware summary
    if console == "terminal":
        assert "Epoch 0 of a 2-step run" in output and "[fit] step" not in output
    else:
        assert "[fit] step 2/2 (100%) · " in output and "Epoch 0" not in output
    assert "[adapter] saved to" in output


# a subcommand's help is argparse's, which lets a closed pipe go and exits 0 itself
@pytest.mark.parametrize(
    "args, code", [(["--help"], 128 + signal.SIGPIPE), (["fit", "--help"], 0)], ids=["program", "subcommand"]
)
def test_help_into_a_pipe_whose_reader_has_gone_ends_quietly(args, code):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) has already gone when help is written
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_falcon", *args],
        check=False,
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
