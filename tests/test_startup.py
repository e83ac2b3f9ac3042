"""Start-up and sharing the machine: spare trainer/deployment processes, torch threads per recipe, the store lock."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from cookbook.client.session import build_session
from cookbook.config import GRPOConfig, RunConfig, SFTConfig
from cookbook.errors import DataError
from cookbook.local.platform import LocalPlatform
from cookbook.local.storage import hold_store, store_is_live
from cookbook.runs.sweep import share_cores
from launchers.local import torch_threads
from tests.platform_harness import datum, find_pids, run_config

CORES = len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def no_process_outlives_the_test(tmp_path):
    yield
    for pid in find_pids(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def platform_pids(root) -> set[int]:
    return set(find_pids(str(root)))


# ------------------------------------------------------------------------------------------------------- spares
def test_the_job_starts_in_the_spare_and_the_unused_spare_stops_with_the_platform(tmp_path):
    root = tmp_path / "platform"
    with LocalPlatform(root, spares=["trainer", "deployment"]) as platform, contextlib.ExitStack() as stack:
        # The control plane and its two spares, each spare named by its log under this platform's root.
        spares = wait_for(lambda: [p for p in platform_pids(root) if "-spare-" in _cmdline(p)] or None,
                          what="the spares")
        wait_for(lambda: len([p for p in platform_pids(root) if "-spare-" in _cmdline(p)]) == 2, what="two spares")
        before = platform_pids(root)
        session = build_session(run_config(tmp_path / "run"), platform.base_url, platform.api_key,
                                needs_reference=False, needs_deployment=False, stack=stack, log=lambda m: None,
                                poll_interval_s=0.05)
        out = session.policy.forward_backward([datum([1, 2, 3, 4, 5])], "cross_entropy")
        assert math.isfinite(out.metrics["loss:sum"]) and out.metrics["loss:sum"] > 0
        # No new process: the trainer job runs in the spare trainer, which logs under the job's own name.
        assert platform_pids(root) == before, (before, platform_pids(root), spares)
        log = (root / "logs" / f"trainer-{session.job_id}.log").read_text()
        assert "serving local-micro" in log
        assert not (root / "logs" / "trainer-spare-0.log").exists()
        assert (root / "logs" / "deployment-spare-1.log").exists()  # still waiting for a deployment
    wait_for(lambda: not platform_pids(root), 30, "every process of the platform to stop")


def test_the_driver_does_its_own_start_up_work_once_the_trainer_job_exists(tmp_path, monkeypatch):
    """`while_starting` (a run renders its data there) runs after the trainer job is created, so it overlaps the
    trainer's start, with the tokenizer the session then carries; an error it raises ends the launch and the job."""
    from fireworks.training.sdk import TrainerJobManager

    root = tmp_path / "platform"
    monkeypatch.setattr("cookbook.client.session.new_job_id", lambda prefix: f"{prefix}-overlap")
    seen = []

    def while_starting(tokenizer):
        manager = TrainerJobManager(api_key=platform.api_key, base_url=platform.base_url)
        try:
            seen.append((tokenizer, manager.get("cookbook-overlap")["state"]))  # raises if there is no such job
        finally:
            manager.close()

    with LocalPlatform(root, spares=["trainer"]) as platform, contextlib.ExitStack() as stack:
        session = build_session(run_config(tmp_path / "run"), platform.base_url, platform.api_key,
                                needs_reference=False, needs_deployment=False, stack=stack, log=lambda m: None,
                                poll_interval_s=0.05, while_starting=while_starting)
        [(tokenizer, state)] = seen
        assert session.job_id == "cookbook-overlap" and tokenizer is session.tokenizer
        assert state in ("JOB_STATE_CREATING", "JOB_STATE_PENDING", "JOB_STATE_RUNNING"), state

    def bad_data(tokenizer):
        raise DataError("rows.jsonl:3: bad row")

    with LocalPlatform(root, spares=["trainer"]) as platform:
        with contextlib.ExitStack() as stack, pytest.raises(DataError, match="rows.jsonl:3"):
            build_session(run_config(tmp_path / "run"), platform.base_url, platform.api_key, needs_reference=False,
                          needs_deployment=False, stack=stack, log=lambda m: None, poll_interval_s=0.05,
                          while_starting=bad_data)
        # The launch's teardown deleted the job it had created: only the control plane is left.
        wait_for(lambda: platform_pids(root) == {platform.proc.pid}, 30, "the trainer job's process to stop")


def test_a_dead_spare_is_replaced_by_a_fresh_trainer(tmp_path):
    root = tmp_path / "platform"
    with LocalPlatform(root, spares=["trainer"]) as platform, contextlib.ExitStack() as stack:
        [spare] = wait_for(lambda: [p for p in platform_pids(root) if "-spare-" in _cmdline(p)] or None,
                           what="the spare")
        os.kill(spare, signal.SIGKILL)
        wait_for(lambda: spare not in platform_pids(root), what="the spare to die")
        session = build_session(run_config(tmp_path / "run"), platform.base_url, platform.api_key,
                                needs_reference=False, needs_deployment=False, stack=stack, log=lambda m: None,
                                poll_interval_s=0.05)
        out = session.policy.forward_backward([datum([1, 2, 3, 4, 5])], "cross_entropy")
        assert math.isfinite(out.metrics["loss:sum"])
        assert any(f"--job-id {session.job_id}" in _cmdline(p) for p in platform_pids(root))  # a fresh process
    wait_for(lambda: not platform_pids(root), 30, "every process of the platform to stop")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------------ threads
def test_sft_gets_every_core_and_grpo_one_thread_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("COOKBOOK_TORCH_THREADS", raising=False)
    assert torch_threads(RunConfig(recipe=SFTConfig())) == CORES
    assert torch_threads(RunConfig(recipe=GRPOConfig())) == 1
    monkeypatch.setenv("COOKBOOK_TORCH_THREADS", "3")
    assert torch_threads(RunConfig(recipe=SFTConfig())) == 3
    assert torch_threads(RunConfig(recipe=GRPOConfig())) == 3


def test_a_parallel_sweep_splits_the_cores_between_its_jobs(monkeypatch):
    monkeypatch.delenv("COOKBOOK_TORCH_THREADS", raising=False)
    share_cores(1)
    assert "COOKBOOK_TORCH_THREADS" not in os.environ
    share_cores(2)
    assert os.environ["COOKBOOK_TORCH_THREADS"] == str(max(1, CORES // 2))
    monkeypatch.setenv("COOKBOOK_TORCH_THREADS", "5")
    share_cores(4)
    assert os.environ["COOKBOOK_TORCH_THREADS"] == "5"  # the user's choice stands


# --------------------------------------------------------------------------------------------------- store lock
def test_a_store_is_live_exactly_while_its_server_process_lives(tmp_path):
    store = tmp_path / "jobs" / "job-1"
    assert not store_is_live(store)  # no store yet
    code = "import sys, time; from cookbook.local.storage import hold_store; from pathlib import Path\n" \
           "fd = hold_store(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert store_is_live(store)
        assert store_is_live(store)  # asking does not take the lock away
    finally:
        proc.kill()
        proc.wait()
    assert not store_is_live(store)  # released by the kernel when the process died
    fd = hold_store(store)  # and the next server can take it
    os.close(fd)
