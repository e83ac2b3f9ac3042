"""A killed run resumes exactly from its last DCP checkpoint, through the CLI in subprocesses.

Every test uses its own log_path. Final weights are compared through the final sampler checkpoint (an HF directory
in trainer storage named by the last line of checkpoints.jsonl). "The same rows were trained on" is checked two ways:
the data cursor recorded with every checkpoint (which, with the seeded per-epoch order, determines the rows) and the
per-step `train/loss` of the final attempt, which depends on both the rows and the weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import shutil
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, run_cli

TESTS = Path(__file__).resolve().parent
STORAGE = Path(os.environ["COOKBOOK_PLATFORM_ROOT"])
# These tests rewind to early checkpoints and compare whole indexes, so their runs keep every periodic checkpoint;
# retention (dcp_keep_last) with resume is tested in test_storage.py.
COMMON = ["weight_sync.dcp_save_interval=2", "weight_sync.dcp_keep_last=0", "recipe.batch_size=8",
          "recipe.eval_dataset=null"]
# GRPO from random init with exact-match rewards almost never sees a group with reward variance, so no step would
# train; this reward (fraction of digits in the completion) varies within a group from the first step on.
GRPO = ["recipe.group_size=4", "recipe.max_completion_tokens=4", "recipe.init_from=null",
        "recipe.reward_fn=test_resume:digit_fraction_reward"]
# Steps per kill/resume run: enough that the driver is still training when the first checkpoint line shows up.
STEPS = {"sft": 16, "dpo": 12, "orpo": 12, "grpo": 6}
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def digit_fraction_reward(completion_text: str, row: dict) -> float:
    return sum(c.isdigit() for c in completion_text) / max(len(completion_text), 1)


def args(recipe: str, log_path: Path, *extra: str) -> list[str]:
    return [f"+recipe={recipe}", f"log_path={log_path}", *COMMON, *(GRPO if recipe == "grpo" else []), *extra]


def train(recipe: str, log_path: Path, *extra: str, env: dict | None = None, ok: bool = True):
    result = run_cli(*args(recipe, log_path, *extra), env={**ENV, **(env or {})}, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def index(log_path: Path) -> list[dict]:
    from cookbook.checkpoints import read_index

    return read_index(log_path)


def final_weights(log_path: Path) -> dict:
    from safetensors.torch import load_file

    last = index(log_path)[-1]
    assert last["kind"] == "both" and last["sampler_path"], last
    return load_file(str(STORAGE / "jobs" / last["job_id"] / "sampler" / last["sampler_path"] / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def per_step(log_path: Path) -> dict[int, dict]:
    """The last logged record of every step (a resumed attempt re-logs the steps the killed one did after its
    last checkpoint)."""
    from cookbook.runs.rundir import read_jsonl

    return {r["step"]: r for r in read_jsonl(log_path / "metrics.jsonl") if "step" in r}


def cursors(log_path: Path) -> dict[int, dict]:
    return {r["step"]: r["data_cursor"] for r in index(log_path)}


def descendants(pid: int) -> set[int]:
    """All live descendants of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_after_first_checkpoint(argv: list[str], log_path: Path, timeout: float = 300) -> int:
    """Start the driver, SIGKILL it as soon as checkpoints.jsonl has a line with step >= 2; return that step.
    Checks that every process the driver started (control plane, trainer, deployment) goes away with it."""
    proc = subprocess.Popen([sys.executable, "-m", "cookbook.train", *argv], cwd=REPO,
                            env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.poll() is None, f"the run exited ({proc.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint line in time"
            family |= descendants(proc.pid)
            steps = [r["step"] for r in index(log_path)]
            if steps and max(steps) >= 2:
                family |= descendants(proc.pid)
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert family, "the driver started no platform processes?"
    deadline = time.monotonic() + 20
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in family if alive(p)], "processes outlived the killed driver"
    return max(r["step"] for r in index(log_path))


# ------------------------------------------------------------------------------------------------------- fixtures
PROMOTED_ID = f"test-promote-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory) -> Path:
    """An uninterrupted SFT run of STEPS['sft'] steps (checkpoints every 2 steps, final one promoted), shared by the
    SFT tests; tests that continue it work on a copy."""
    log_path = tmp_path_factory.mktemp("sft-reference") / "run"
    train("sft", log_path, f"max_steps={STEPS['sft']}", f"recipe.output_model_id={PROMOTED_ID}")
    yield log_path
    shutil.rmtree(STORAGE / "models" / PROMOTED_ID, ignore_errors=True)


def copy_run(source: Path, target: Path, keep_checkpoints: int | None = None) -> Path:
    """A copy of a run directory, optionally cut back to its first `keep_checkpoints` index lines (the weights stay
    in trainer storage, where cross_job:// paths find them)."""
    shutil.copytree(source, target)
    if keep_checkpoints is not None:
        lines = (target / "checkpoints.jsonl").read_text().splitlines(keepends=True)
        (target / "checkpoints.jsonl").write_text("".join(lines[:keep_checkpoints]))
    return target


# ------------------------------------------------------------------------------------------------ kill / resume
def check_kill_resume(recipe: str, reference: Path, tmp_path: Path) -> dict:
    n = STEPS[recipe]
    killed = tmp_path / f"{recipe}-killed"
    argv = args(recipe, killed, f"max_steps={n}")
    kill_step = kill_after_first_checkpoint(argv, killed)
    assert kill_step < n and all(r["kind"] == "state" for r in index(killed)), "the kill came after the final save"
    assert json.loads((killed / "status.json").read_text())["status"] == "running"

    result = train(recipe, killed, f"max_steps={n}")
    assert f"resumed from {killed}:step-{kill_step} at step {kill_step}" in result.stdout + result.stderr
    status = json.loads((killed / "status.json").read_text())
    assert status["status"] == "ok" and status["attempt"] == 2
    assert status["final_metrics"]["steps"] == n and status["final_metrics"]["steps_this_attempt"] == n - kill_step

    # Same rows: the cursor at every checkpoint (and at the end) equals the uninterrupted run's.
    assert cursors(killed) == cursors(reference)
    # Same updates: per-step loss of the resumed steps (and the steps before) against the uninterrupted run.
    ref_steps, res_steps = per_step(reference), per_step(killed)
    assert sorted(ref_steps) == list(range(1, n + 1))
    # The resumed attempt logged every step after the checkpoint. (A kill between a step's index line and its
    # metrics line leaves that one step without metrics: the resumed attempt starts after it.)
    assert set(range(kill_step + 1, n + 1)) <= set(res_steps) <= set(ref_steps)
    loss_diff = max(abs(ref_steps[s]["train/loss"] - res_steps[s]["train/loss"]) for s in res_steps
                    if "train/loss" in ref_steps[s])
    # Exact for GRPO too: the deployment samples a request the same, bit for bit, whatever it is batched with.
    assert loss_diff == 0.0, (loss_diff, kill_step)
    if recipe == "grpo":  # identical samples: the rewards and kept groups of every step match exactly
        for s in res_steps:
            for key in ("rollout/reward", "rollout/groups_kept", "train/completion_tokens"):
                assert ref_steps[s].get(key) == res_steps[s].get(key), (s, key)
    weight_diff = max_abs_diff(final_weights(reference), final_weights(killed))
    assert weight_diff == 0.0, (weight_diff, kill_step)
    print(f"[{recipe}] killed at step {kill_step}/{n}: max |dW| = {weight_diff:.3g}, max |dloss| = {loss_diff:.3g}")
    return {"kill_step": kill_step, "weight_diff": weight_diff, "loss_diff": loss_diff}


def test_sft_killed_run_resumes_exactly(sft_reference, tmp_path):
    check_kill_resume("sft", sft_reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo", "orpo", "grpo"])
def test_killed_run_resumes_exactly_every_recipe(recipe, tmp_path):
    reference = tmp_path / f"{recipe}-reference"
    train(recipe, reference, f"max_steps={STEPS[recipe]}")
    check_kill_resume(recipe, reference, tmp_path)


# ------------------------------------------------------------------------------------ crash during a checkpoint
@pytest.mark.parametrize("point", ["after_state_save", "mid_dcp_save"])
def test_crash_during_checkpoint_keeps_the_previous_one(point, sft_reference, tmp_path):
    from cookbook.checkpoints import describe

    n = STEPS["sft"]
    run = copy_run(sft_reference, tmp_path / "run", keep_checkpoints=1)  # one complete checkpoint: step-2
    assert [r["name"] for r in index(run)] == ["step-2"]
    # The crash fires at this attempt's first save (step 4): after the DCP save but before its index line (driver
    # SIGKILLed), or inside the DCP save before its metadata and rename (trainer SIGKILLed; the driver then fails).
    started = time.monotonic()
    crashed = train("sft", run, f"max_steps={n}", env={"COOKBOOK_CRASH_AT": point}, ok=False)
    elapsed = time.monotonic() - started
    assert crashed.returncode == (-signal.SIGKILL if point == "after_state_save" else 1), crashed.stderr[-2000:]
    assert elapsed < 120, f"the driver took {elapsed:.0f}s to notice the crash"
    # No half checkpoint is listed: the index and the listing still end at step-2 ...
    assert [r["name"] for r in index(run)] == ["step-2"]
    assert [r["name"] for r in describe(run, STORAGE)] == ["step-2"]
    listing = run_cli(str(run), module="cookbook.checkpoints")
    assert listing.returncode == 0 and "step-4" not in listing.stdout and "step-2" in listing.stdout
    # ... and in the trainer's storage the crashed save is at most a hidden temp dir, never a listed checkpoint.
    if point == "mid_dcp_save":
        from cookbook.local.trainer.checkpoints import Store

        job = re.search(r"trainer job (cookbook-[0-9a-f]+)", crashed.stdout + crashed.stderr).group(1)
        store = Store(STORAGE / "jobs" / job, job)
        assert "step-4" not in store.list_checkpoints()
        assert [p.name for p in store.checkpoints.iterdir() if p.name.startswith(".tmp-step-4-")]
    # A rerun without the crash resumes from step-2 and ends exactly where the uninterrupted run did.
    result = train("sft", run, f"max_steps={n}")
    assert f"resumed from {run}:step-2 at step 2" in result.stdout + result.stderr
    assert cursors(run) == cursors(sft_reference)
    assert max_abs_diff(final_weights(run), final_weights(sft_reference)) == 0.0


# ------------------------------------------------------------------------------------------------ resume rules
def test_resume_never_must_and_mismatch_refusals(sft_reference, tmp_path):
    sft_reference = copy_run(sft_reference, tmp_path / "run")  # a refused attempt still records its status there
    never = run_cli(*args("sft", sft_reference, f"max_steps={STEPS['sft']}", "resume=never"))
    assert never.returncode == 2 and "resume=never" in never.stderr and "log_path" in never.stderr, never.stderr

    must = run_cli(*args("sft", tmp_path / "empty", "max_steps=2", "resume=must"))
    assert must.returncode == 2 and "resume=must" in must.stderr, must.stderr
    assert not index(tmp_path / "empty")

    before = (sft_reference / "checkpoints.jsonl").read_text()
    orpo = run_cli(*args("orpo", sft_reference, f"max_steps={STEPS['sft'] + 2}"))
    assert orpo.returncode == 2, orpo.stderr[-2000:]
    assert "recipe (checkpoint: sft, this run: orpo)" in orpo.stderr and "resume_force=true" in orpo.stderr
    # (base model / training shape mismatches: test_checkpoints.py, without a platform)
    assert (sft_reference / "checkpoints.jsonl").read_text() == before  # refused runs wrote nothing


def test_resume_from_other_run_full_vs_weights_only(sft_reference, tmp_path):
    """`resume_from=<run>:<name>` loads weights + optimizer at position 0; with `resume_weights_only` the optimizer
    is fresh. Both see the same first batch with the same weights (same step-1 loss, which is computed before the
    update), the later updates differ because only the optimizer state differs."""
    n = STEPS["sft"]
    ref = f"{sft_reference}:step-{n}"
    full, fresh = tmp_path / "full", tmp_path / "weights-only"
    out = train("sft", full, "max_steps=3", f"resume_from={ref}")
    assert f"resumed from {ref} at step 0" in out.stdout + out.stderr
    train("sft", fresh, "max_steps=3", f"resume_from={ref}", "resume_weights_only=true")
    # Position 0 and step 0: the same cursor at step 2 as the source run had at its own step 2.
    assert cursors(full)[2] == cursors(fresh)[2] == cursors(sft_reference)[2]
    m_full, m_fresh, m_ref = per_step(full), per_step(fresh), per_step(sft_reference)
    assert sorted(m_full) == sorted(m_fresh) == [1, 2, 3]
    # Step 1: the other run's final weights on the first batch (not the base model's loss on it).
    assert m_full[1]["train/loss"] == m_fresh[1]["train/loss"] != m_ref[1]["train/loss"]
    assert m_full[1]["train/loss"] < m_ref[1]["train/loss"]
    assert m_full[1]["train/grad_norm"] == m_fresh[1]["train/grad_norm"]
    # After one update with different optimizer states everything differs.
    assert m_full[2]["train/loss"] != m_fresh[2]["train/loss"]
    diff = max_abs_diff(final_weights(full), final_weights(fresh))
    assert diff > 1e-4, diff


@pytest.mark.slow  # the routing is covered fast in test_checkpoints.py; this is the end-to-end version
def test_resume_from_named_checkpoint_of_this_run(sft_reference, tmp_path):
    """`resume_from=<name>` in the same run is a full resume (step + cursor): rewinding to step-4 and running to the
    end reproduces the uninterrupted run."""
    n = STEPS["sft"]
    run = copy_run(sft_reference, tmp_path / "run")
    out = train("sft", run, f"max_steps={n}", "resume_from=step-4")
    assert "resumed from step-4 at step 4" in out.stdout + out.stderr
    assert index(run)[-1]["step"] == n and index(run)[-1]["job_id"] != index(sft_reference)[-1]["job_id"]
    assert max_abs_diff(final_weights(run), final_weights(sft_reference)) == 0.0
    bad = run_cli(*args("sft", run, f"max_steps={n}", "resume_from=step-5"))
    assert bad.returncode == 2 and "no checkpoint named 'step-5'" in bad.stderr, bad.stderr


def test_torn_last_index_line_does_not_break_resume(sft_reference, tmp_path):
    run = copy_run(sft_reference, tmp_path / "run", keep_checkpoints=2)  # step-2, step-4
    last = (run / "checkpoints.jsonl").read_text().splitlines()[-1]
    with open(run / "checkpoints.jsonl", "a") as f:  # a crash in the middle of an append
        f.write(last[: len(last) // 2])
    assert [r["step"] for r in index(run)] == [2, 4]
    out = train("sft", run, "max_steps=6")
    assert f"resumed from {run}:step-4 at step 4" in out.stdout + out.stderr
    # The next append starts on a fresh line: the new checkpoint is readable, so a further rerun resumes from it.
    assert [r["step"] for r in index(run)] == [2, 4, 6]
    assert cursors(run)[6] == cursors(sft_reference)[6]
    again = train("sft", run, "max_steps=6")
    assert f"resumed from {run}:step-6 at step 6" in again.stdout + again.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["final_metrics"]["steps_this_attempt"] == 0 and status["final_metrics"]["final_checkpoint"] == "step-6"


# ------------------------------------------------------------------------------------------- promotion, listing
def test_promoted_model_loads_generates_and_matches_the_trainer(sft_reference, tmp_path):
    """The promoted directory is a standalone HF model: it loads, generates, holds exactly the final sampler
    checkpoint's tensors, and its logprobs reproduce the trainer's: a 1-step run that resumes from the final
    checkpoint reports as step-1 loss the trainer's forward (before its update) on the first batch; the same loss
    computed from the promoted model with plain transformers must agree."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cookbook.datasets.cursor import DataCursor
    from cookbook.datasets.load import load_dataset

    n = STEPS["sft"]
    status = json.loads((sft_reference / "status.json").read_text())
    promoted = Path(status["final_metrics"]["promoted_model"])
    assert promoted == STORAGE / "models" / PROMOTED_ID and (promoted / "config.json").exists()
    assert status["final_metrics"]["final_checkpoint"] == f"step-{n}"
    assert max_abs_diff(load_file(str(promoted / "model.safetensors")), final_weights(sft_reference)) == 0.0

    model = AutoModelForCausalLM.from_pretrained(promoted).eval()
    tok = AutoTokenizer.from_pretrained(promoted)
    prompt = tok("2+3=", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4

    probe = tmp_path / "probe"
    train("sft", probe, "max_steps=1", f"resume_from={sft_reference}:step-{n}")
    trainer_loss = per_step(probe)[1]["train/loss"]
    data = load_dataset("bundled:sft_arith_train", "sft", tok, 512, train_on_what="all_assistant_messages")
    batch = DataCursor(len(data), 16, True, 0, data.valid).next_batch(8)
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for i in batch.indices:
            datum = data.items[i]
            logits = model(torch.tensor([datum.model_input.to_ints()])).logits[0].float()
            targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].tolist())
            logprobs = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            weights = datum.loss_fn_inputs["weights"].to_torch()
            loss_sum += float(-(logprobs * weights).sum())
            tokens += float(weights.sum())
    print(f"[promote] HF loss {loss_sum / tokens:.8f} vs trainer {trainer_loss:.8f}: |d| = {abs(loss_sum / tokens - trainer_loss):.3g}")
    assert abs(loss_sum / tokens - trainer_loss) <= 1e-5, (loss_sum / tokens, trainer_loss)


def test_listing_shows_every_checkpoint(sft_reference, tmp_path):
    n = STEPS["sft"]
    out = run_cli(str(sft_reference), module="cookbook.checkpoints")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [(r[0], int(r[1]), r[2]) for r in rows] == (
        [(f"step-{s}", s, "state") for s in range(2, n, 2)] + [(f"step-{n}", n, "both")])
    assert all(r[5] == "MB" and float(r[4]) > 0 for r in rows)  # sizes from the local trainer storage
    assert "name" in out.stdout.splitlines()[0] and "size" in out.stdout.splitlines()[0]
    wrong = run_cli(str(tmp_path / "nope"), module="cookbook.checkpoints")
    assert wrong.returncode == 2 and "checkpoints.jsonl does not exist" in wrong.stderr


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    """W&B (offline here) resumes the run it started: one run id across both attempts, logged by both."""
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline"}
    train("sft", run, "max_steps=2", "wandb=offline", env=env)
    train("sft", run, "max_steps=4", "wandb=offline", env=env)
    run_id = (run / "wandb_run_id").read_text().strip()
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{run_id}") for name in offline_runs), offline_runs
    assert [r["step"] for r in index(run)][-1] == 4


def test_init_from_another_runs_checkpoint_starts_from_its_weights(sft_reference, tmp_path):
    """`recipe.init_from=<run_dir>:<name>` loads those weights (only) into a fresh run: with no steps to take, the new
    run's final checkpoint holds exactly the source checkpoint's weights, at step 0."""
    n = STEPS["sft"]
    run = tmp_path / "run"
    train("sft", run, "max_steps=0", f"recipe.init_from={sft_reference}:step-{n}")
    assert index(run)[-1]["step"] == 0
    assert max_abs_diff(final_weights(run), final_weights(sft_reference)) == 0.0
    bad = run_cli(*args("sft", tmp_path / "bad", "max_steps=0", f"recipe.init_from={sft_reference}:step-99"))
    assert bad.returncode == 2 and "step-99" in bad.stderr and "cookbook.checkpoints" in bad.stderr, bad.stderr
