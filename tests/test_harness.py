"""The suite's own guards: a hang fails with the test's name and every thread's stack, in this process or a child,
and a test stopped by its time limit leaves no child process behind."""

import os
import sys
from pathlib import Path

import pytest
from processes import run_process

pytest_plugins = ["pytester"]

# A main thread and a second one, both blocked: what a deadlocked collective looks like from outside.
HANGS = """
import threading, time
def wait_for_a_peer():
    time.sleep(600)
threading.Thread(target=wait_for_a_peer, daemon=True).start()
time.sleep(600)
"""


def test_a_hung_child_prints_every_threads_stack_and_fails_the_test():
    with pytest.raises(pytest.fail.Exception) as failed:
        run_process([sys.executable, "-c", HANGS], timeout=3)
    message = str(failed.value)
    assert "still ran after 3 s" in message
    assert "Current thread 0x" in message and "Thread 0x" in message.replace("Current thread", "")
    assert "wait_for_a_peer" in message, message


def test_a_test_past_its_timeout_fails_by_name_with_every_threads_stack(pytester):
    pytester.makepyfile(
        test_stuck="""
        import threading, time

        def test_waits_forever():
            threading.Thread(target=time.sleep, args=(600,), name="peer", daemon=True).start()
            time.sleep(600)
        """
    )
    result = pytester.runpytest_subprocess("-p", "timeout", "--timeout=2", "--timeout-method=signal")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "Timeout" in output and "test_waits_forever" in output
    assert "Stack of peer" in output  # the other thread too, not only the test's own


def test_a_test_stopped_by_its_time_limit_leaves_no_child_running(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # tests/processes.py
    pid_file = pytester.path / "child.pid"
    pytester.makepyfile(
        test_stuck=f"""
        import sys
        from processes import run_process

        def test_waits_for_its_child():
            child = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
            run_process([sys.executable, "-c", child])
        """
    )
    result = pytester.runpytest_subprocess("-p", "timeout", "--timeout=3", "--timeout-method=signal")
    result.assert_outcomes(failed=1)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, not orphaned into the tests that follow
