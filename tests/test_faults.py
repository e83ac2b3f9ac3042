"""Faults on the platform side, end to end with the real processes: the trainer dies mid forward_backward, the
deployment dies mid rollout, a hot load fails on a damaged snapshot.

Each time the driver must exit non-zero within 30 s of the fault with one paragraph naming what failed and where its
log is, leave no process behind and record `failed` in status.json; rerunning the same command resumes from the last
checkpoint and ends with the weights of an uninterrupted run. Faults are injected with the fault points of
cookbook/runs/faults.py (environment variables the driver passes on to the platform's processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.platform_harness import find_pids
from conftest import REPO
from test_resume import ENV, STORAGE, final_weights, max_abs_diff

MICRO = ["base_model=local-micro", "infra.training_shape_id=accounts/local/trainingShapes/local-micro",
         "recipe.eval_dataset=null", "weight_sync.dcp_save_interval=2"]
RECIPES = {
    "sft": ["+recipe=sft", "recipe.batch_size=8", "max_steps=8", *MICRO],
    "grpo": ["+recipe=grpo", "recipe.batch_size=4", "recipe.group_size=4", "recipe.max_completion_tokens=4",
             "recipe.init_from=null", "recipe.reward_fn=test_resume:digit_fraction_reward", "max_steps=8", *MICRO],
}
# fault -> (recipe, environment that injects it, the process that dies (None: nothing dies), words of the message)
FAULTS = {
    "trainer_dies_mid_forward_backward": ("sft", {"COOKBOOK_CRASH_AT": "mid_forward_backward@6"}, "trainer-",
                                          ["policy trainer job", "killed by SIGKILL", "trainer-"]),
    "deployment_dies_mid_rollout": ("grpo", {"COOKBOOK_CRASH_AT": "mid_rollout@150"}, "deployment-",
                                    ["deployment", "is FAILED", "killed by SIGKILL", "deployment-"]),
    "hot_load_of_a_damaged_snapshot_fails": ("grpo", {"COOKBOOK_CORRUPT_AT": "sampler_snapshot@5"}, None,
                                             ["could not load snapshot", "sync-5-", "still serves"]),
}
# Exact for both: GRPO's samples do not depend on what the deployment batched them with.
TOLERANCE = {"sft": 0.0, "grpo": 0.0}


def _run(recipe: str, log_path: Path, env: dict | None = None):
    return subprocess.Popen([sys.executable, "-m", "cookbook.train", *RECIPES[recipe], f"log_path={log_path}"],
                            cwd=REPO, env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final weights of each recipe's run without faults."""
    weights = {}
    for recipe in RECIPES:
        log_path = tmp_path_factory.mktemp(f"{recipe}-uninterrupted")
        proc = _run(recipe, log_path)
        out, err = _finish(proc)
        assert proc.returncode == 0, err[-3000:]
        weights[recipe] = final_weights(log_path)
    return weights


def _fault_moment(proc: subprocess.Popen, log_path: Path, dies: str | None) -> float:
    """Watch the run until the fault happens; return when it did. A dying process is seen vanishing from /proc; a
    damaged snapshot by its hot load's error state (the 5th sampler snapshot being written)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if dies:
            alive = {pid for pid in find_pids(str(log_path)) if dies in Path(f"/proc/{pid}/cmdline").read_text()}
            if seen and not seen & alive:
                return time.monotonic()
            seen |= alive
        else:  # this run's trainer job, from its log's name, then its 5th snapshot
            jobs = [p.stem.removeprefix("trainer-") for p in (log_path / "platform" / "logs").glob("trainer-*.log")]
            if any((STORAGE / "jobs" / job / "sampler").glob("sync-5-*") for job in jobs):
                return time.monotonic()
        time.sleep(0.05)
    pytest.fail(f"the fault never showed (exit code {proc.poll()})")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_platform_fault_stops_the_run_clearly_and_a_rerun_resumes(fault, uninterrupted, tmp_path):
    recipe, env, dies, words = FAULTS[fault]
    log_path = tmp_path / "run"
    proc = _run(recipe, log_path, env)
    try:
        fault_at = _fault_moment(proc, log_path, dies)
        out, err = _finish(proc, timeout=60)
        detected_s = time.monotonic() - fault_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert detected_s < 30, detected_s
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: The run stopped because") and "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in message, message
    if dies:  # the named log exists and is the dead process's
        log_file = message.split("its log: ", 1)[1].split(". ", 1)[0]
        assert Path(log_file).is_file() and dies in Path(log_file).name, log_file
    assert "rerun the same command" in message
    assert json.loads((log_path / "status.json").read_text())["status"] == "failed"
    deadline = time.monotonic() + 30
    while find_pids(str(log_path)):
        assert time.monotonic() < deadline, f"processes left behind: {find_pids(str(log_path))}"
        time.sleep(0.2)

    rerun = _run(recipe, log_path)
    out, err = _finish(rerun)
    assert rerun.returncode == 0, err[-3000:]
    assert "resumed from" in err + out
    diff = max_abs_diff(final_weights(log_path), uninterrupted[recipe])
    print(f"{fault}: driver exited {detected_s:.1f}s after the fault; resumed weights max |Δ| {diff:.1e}")
    assert diff <= TOLERANCE[recipe]
