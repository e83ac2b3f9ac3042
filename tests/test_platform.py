"""Lifecycle of the embedded platform: no process outlives the driver, however the driver ends.

Each case runs a small driver in a subprocess that opens `launchers.local.launch` (control plane + trainer job
[+ deployment]), reports the pids it started, then exits normally, raises, gets SIGINT or gets SIGKILL. The test then
scans /proc for any process whose command line names the run's platform root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.platform_harness import find_pids
from tests.conftest import REPO

DRIVER = textwrap.dedent("""
    import faulthandler, signal, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if it hangs
    # Ctrl-C as a terminal delivers it. A process started from a background job of a non-interactive shell (a CI
    # script run with `&`) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: the
    # driver would sleep through the signal (that was the flaky `[sigint]` case of issue #12).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from tests.platform_harness import find_pids
    from launchers.local import launch
    from tests.platform_harness import run_config

    log_path, mode, deployment = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    with launch(run_config(log_path), needs_reference=False, needs_deployment=deployment, log=lambda m: None) as s:
        print("READY", *find_pids(log_path), flush=True)
        if mode == "exception":
            raise RuntimeError("driver failed on purpose")
        if mode == "wait":
            time.sleep(600)
    print("CLEAN EXIT", flush=True)
""")


@pytest.fixture(autouse=True)
def no_process_outlives_the_test(tmp_path):
    """Whatever happens in a test, nothing it started keeps running: a failed assertion must not leave a platform
    behind for the next test (or the next CI job) to trip over."""
    yield
    for pid in find_pids(str(tmp_path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_driver(tmp_path, mode: str, deployment: bool):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), mode, "1" if deployment else "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        pytest.fail(f"driver did not get ready: {line!r}\n{proc.stderr.read()[-3000:]}")
    pids = [int(p) for p in line.split()[1:]]
    return proc, pids


def _wait_or_dump(proc, timeout_s: float) -> tuple[str, str]:
    """The driver's output once it exited; if it is still running after `timeout_s`, fail with its threads' stacks."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"driver still running {timeout_s:.0f}s after the signal; its threads:\n{err[-12000:]}")


def _assert_all_gone(root, pids, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = find_pids(str(root))
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"processes left behind: {left} (started: {pids})")


@pytest.mark.parametrize("mode,deployment,expected_rc", [("normal", False, 0), ("exception", False, 1)])
def test_no_leftovers_after_exit_or_exception(tmp_path, mode, deployment, expected_rc):
    proc, pids = _start_driver(tmp_path, mode, deployment)
    assert len(pids) >= 2  # control plane + trainer
    out, err = _wait_or_dump(proc, timeout_s=60)
    assert proc.returncode == expected_rc, err[-2000:]
    if mode == "exception":
        assert "driver failed on purpose" in err
    else:
        assert "CLEAN EXIT" in out
    _assert_all_gone(tmp_path, pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_no_leftovers_after_ctrl_c_or_sigkill(tmp_path, sig):
    proc, pids = _start_driver(tmp_path, "wait", True)
    assert len(pids) >= 3  # control plane + trainer + deployment
    proc.send_signal(sig)
    _wait_or_dump(proc, timeout_s=60)
    assert proc.returncode != 0
    _assert_all_gone(tmp_path, pids)
