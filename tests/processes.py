"""Child processes for the tests: a hang prints where it is, and no child outlives its test."""

import contextlib
import os
import signal
import subprocess

import pytest

CHILD_TIMEOUT = 600  # seconds; below the slow tier's per-test limit (helpers.SLOW_TIMEOUT)


def run_process(
    command, *, timeout: float = CHILD_TIMEOUT, input: str | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, input=input)`, but a child still running after `timeout`
    seconds prints the stack of every thread, in each of its processes (DDP ranks included), before the
    test fails with that output. A plain timeout would kill it and say nothing of where it hung."""
    env = {**(kwargs.pop("env", None) or os.environ), "PYTHONFAULTHANDLER": "1"}
    # Its own process group, so the signal reaches the ranks it launches too.
    child = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.PIPE if input is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = child.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(child, signal.SIGABRT)  # faulthandler prints every thread's traceback, then the process ends
        try:
            out, err = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            signal_group(child, signal.SIGKILL)
            out, err = child.communicate()
        pytest.fail(f"{' '.join(map(str, command))} still ran after {timeout} s; its threads:\n{err[-20000:]}")
    except BaseException:  # pytest's own time limit, or Ctrl-C: leave no child running into the next tests
        signal_group(child, signal.SIGKILL)
        child.communicate()
        raise
    return subprocess.CompletedProcess(command, child.returncode, out, err)


def signal_group(child: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have ended in the meantime
        os.killpg(child.pid, signum)
