"""Storage retention and `python -m cookbook.local storage`, end to end with real processes.

Every run here uses its own platform storage root (COOKBOOK_PLATFORM_ROOT in a temporary directory), so sizes and
prune results are exactly this module's. One module-scoped scenario of short GRPO runs on local-tiny feeds the tests:
- `reference`: 16 steps, a DCP checkpoint every 2 steps, `dcp_keep_last=2`, the final checkpoint promoted;
- `killed`: the same run whose trainer is SIGKILLed inside its 4th DCP save (step 8, fault point `mid_dcp_save@4`),
  so it stops with a deleted checkpoint (step-2) behind it and a crashed save's temp dir, then rerun to the end;
- a refused attempt on `killed` (resume_from a deleted checkpoint).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from test_checkpoints import StubPolicy
from test_resume import ENV, max_abs_diff
from trainer_harness import start_trainer

GRPO = ["+recipe=grpo", "recipe.batch_size=2", "recipe.init_from=null", "recipe.eval_dataset=null",
        "recipe.reward_fn=test_resume:digit_fraction_reward"]
SCENARIO = [*GRPO, "recipe.group_size=4", "recipe.max_completion_tokens=4", "weight_sync.dcp_save_interval=2",
            "weight_sync.dcp_keep_last=2"]
STEPS = 16
PROMOTED = "storage-test-model"


def train(root: Path, log_path: Path, *extra: str, env: dict | None = None, ok: bool = True, base=SCENARIO):
    result = run_cli(*base, f"log_path={log_path}", *extra, env={**ENV, "COOKBOOK_PLATFORM_ROOT": str(root),
                                                                 **(env or {})})
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def storage_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("storage", "--storage", str(root), *args, module="cookbook.local", timeout=120)


def index_lines(log_path: Path) -> list[dict]:
    from cookbook.runs.rundir import read_jsonl

    return read_jsonl(log_path / "checkpoints.jsonl")


def live(log_path: Path) -> list[dict]:
    from cookbook.checkpoints import read_index

    return read_index(log_path)


def registry(root: Path, log_path: Path) -> list[str]:
    from cookbook.local.storage import jobs_of_run

    return jobs_of_run(root, log_path)


def final_weights(root: Path, log_path: Path) -> dict:
    from safetensors.torch import load_file

    last = live(log_path)[-1]
    return load_file(str(root / "jobs" / last["job_id"] / "sampler" / last["sampler_path"] / "model.safetensors"))


def files(root: Path) -> dict[str, int]:
    """Every file under `root` (relative path -> size): what a prune may or may not have touched."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


# ------------------------------------------------------------------------- retention rules, without a platform
class DeletingPolicy(StubPolicy):
    """The stub trainer of test_checkpoints.py, plus checkpoint deletion (failing every time when `error` is set)."""

    def __init__(self, job_id: str, error: str | None = None):
        super().__init__()
        self.job_id, self.error, self.deletes = job_id, error, []

    def delete_checkpoint(self, checkpoint_id, timeout=None):
        self.deletes.append(checkpoint_id)
        if self.error:
            raise RuntimeError(self.error)


def checkpointer(log_path: Path, policy, keep: int):
    from cookbook.checkpoints import Checkpointer
    from cookbook.config.compose import compose_run_config

    run = compose_run_config(["+recipe=sft", f"log_path={log_path}", "weight_sync.dcp_save_interval=2",
                              f"weight_sync.dcp_keep_last={keep}"])
    log_path.mkdir(parents=True, exist_ok=True)
    return Checkpointer(run, policy, "sft")


def test_keep_last_deletes_only_this_jobs_older_periodic_checkpoints(tmp_path):
    from cookbook.checkpoints import Checkpointer, read_index

    log_path = tmp_path / "run"
    earlier = checkpointer(log_path, DeletingPolicy("job-a"), keep=2)  # an attempt that was killed after step 6
    for step in (2, 4, 6):
        earlier.save(step, {"position": step})
    policy = DeletingPolicy("job-b")
    resumed = checkpointer(log_path, policy, keep=2)
    for step in (8, 10, 12, 14):
        resumed.save(step, {"position": step})
    resumed.save(16, {"position": 16}, final=True)
    # job-a deleted its own step-2 (3 periodic > 2); job-b deleted step-8 and step-10, never job-a's, nor the final.
    assert policy.deletes == ["weights/step-8", "weights/step-10"]
    assert [(r["job_id"], r["name"]) for r in read_index(log_path)] == [
        ("job-a", "step-4"), ("job-a", "step-6"), ("job-b", "step-12"), ("job-b", "step-14"), ("job-b", "step-16")]
    events = [r for r in index_lines(log_path) if r.get("event") == "deleted"]
    assert [(r["job_id"], r["name"]) for r in events] == [("job-a", "step-2"), ("job-b", "step-8"),
                                                         ("job-b", "step-10")]
    # Resume picks the newest live checkpoint; the index survives a torn line after an event.
    with open(log_path / "checkpoints.jsonl", "a") as f:
        f.write('{"event": "deleted", "name": "step-1')
    point = Checkpointer(resumed.run, DeletingPolicy("job-c"), "sft").resume()
    assert point.step == 16

    keep_all = DeletingPolicy("job-d")
    cp = checkpointer(tmp_path / "all", keep_all, keep=0)
    for step in range(2, 21, 2):
        cp.save(step, {"position": step})
    assert keep_all.deletes == [] and len(read_index(tmp_path / "all")) == 10


def test_a_failing_delete_warns_once_and_keeps_everything(tmp_path, capsys):
    from cookbook.checkpoints import read_index

    policy = DeletingPolicy("job-a", error="HTTP 404: no such route")
    cp = checkpointer(tmp_path / "run", policy, keep=1)
    for step in range(2, 13, 2):
        cp.save(step, {"position": step})
    err = capsys.readouterr().err
    assert err.count("[retention]") == 1 and "HTTP 404: no such route" in err and "kept" in err
    assert policy.deletes == ["weights/step-2"]  # tried once, then off for the rest of the run
    assert [r["step"] for r in read_index(tmp_path / "run")] == [2, 4, 6, 8, 10, 12]  # nothing recorded as deleted


def test_a_deletion_sent_ahead_reports_its_outcome_when_collected(capsys):
    import concurrent.futures

    from cookbook.runs.retention import discard_soon

    class Answering:  # the trainer's answer arrives later, as the SDK's future
        def __init__(self):
            self.sent = {}

        def submit_delete_checkpoint(self, checkpoint_id):
            self.sent[checkpoint_id] = concurrent.futures.Future()
            return self.sent[checkpoint_id]

    client = Answering()
    wait = discard_soon(client, "sampler_weights/s1")
    assert list(client.sent) == ["sampler_weights/s1"]  # sent at once, answered later
    client.sent["sampler_weights/s1"].set_result(None)
    assert wait() is True

    class Refusing:  # a client whose deletion fails as it is sent
        def submit_delete_checkpoint(self, checkpoint_id):
            raise RuntimeError("HTTP 404: no such route")

    wait = discard_soon(Refusing(), "sampler_weights/s2")
    assert capsys.readouterr().err == ""  # nothing said until the answer is collected
    assert wait() is False
    err = capsys.readouterr().err
    assert err.count("[retention]") == 1 and "RuntimeError: HTTP 404: no such route" in err


def test_resume_from_a_deleted_name_names_the_kept_ones(tmp_path):
    from cookbook.errors import UserError

    log_path = tmp_path / "run"
    cp = checkpointer(log_path, DeletingPolicy("job-a"), keep=1)
    for step in (2, 4, 6):
        cp.save(step, {"position": step})
    cp.run.resume_from = "step-2"
    with pytest.raises(UserError) as e:
        cp.resume()
    assert "'step-2'" in str(e.value) and "was deleted" in str(e.value) and "(step-6)" in str(e.value)
    cp.run.resume_from = f"{log_path}:step-6"
    assert cp.resume().source == f"{log_path}:step-6"


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("platform-storage")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage-runs")


@pytest.fixture(scope="module")
def legacy(root) -> Path:
    """A job store no run recorded (as left by a cookbook older than the run registry): one complete checkpoint and
    the temp dir of a crashed save."""
    store = root / "jobs" / "legacy-job"
    (store / "checkpoints" / "a").mkdir(parents=True)
    (store / "checkpoints" / "a" / "meta.json").write_text("{}")
    (store / "checkpoints" / ".tmp-b-0123abcd").mkdir()
    (store / "checkpoints" / ".tmp-b-0123abcd" / "__0_0.distcp").write_bytes(b"x" * 1000)
    return store


@pytest.fixture(scope="module")
def trainer(root, legacy):
    """A live trainer on a store of this root, started on top of temp dirs a crashed save left there."""
    store = root / "jobs" / "live-job"
    for leftover in ("checkpoints/.tmp-step-9-deadbeef", "sampler/.deleting-step-3-abc-0badc0de"):
        (store / leftover).mkdir(parents=True)
        (store / leftover / "data").write_bytes(b"x" * 100)
    with start_trainer(root / "jobs", "live-job", "local-micro") as t:
        yield t


@pytest.fixture(scope="module")
def scenario(root, runs) -> dict:
    reference, killed = runs / "reference", runs / "killed"
    started = time.monotonic()
    train(root, reference, f"max_steps={STEPS}", f"recipe.output_model_id={PROMOTED}")
    crash = train(root, killed, f"max_steps={STEPS}", env={"COOKBOOK_CRASH_AT": "mid_dcp_save@4"}, ok=False)
    assert crash.returncode == 1, crash.stderr[-3000:]
    after_kill = [r["name"] for r in live(killed)]
    killed_job = registry(root, killed)[0]
    leftovers = names(root / "jobs" / killed_job / "checkpoints")
    resumed = train(root, killed, f"max_steps={STEPS}")
    refused = train(root, killed, f"max_steps={STEPS}", "resume_from=step-2", ok=False)
    print(f"[storage] scenario runs took {time.monotonic() - started:.0f}s")
    return {"reference": reference, "killed": killed, "after_kill": after_kill, "killed_job": killed_job,
            "leftovers": leftovers, "resumed": resumed, "refused": refused}


# ----------------------------------------------------------------------------------- the trainer's DELETE route
def test_delete_route_deletes_only_this_jobs_checkpoints(trainer, legacy):
    import httpx
    from fireworks.training.sdk.trainer import TrainerServiceEndpoint

    from cookbook.client.trainer import ReconnectableClient

    # Started on a store with a crashed save's temp dirs: the trainer removed them (it is the store's only writer).
    assert names(trainer.store / "checkpoints") == set() and names(trainer.store / "sampler") == set()
    assert "left by an unfinished save" in trainer.stderr()

    endpoint = TrainerServiceEndpoint(job_name="accounts/local/rlorTrainerJobs/live-job", job_id="live-job",
                                      base_url=trainer.base_url)
    client = ReconnectableClient(None, "live-job", "local-micro", fw_api_key=trainer.api_key, endpoint=endpoint)
    try:
        client.save_state("a")
        client.save_state("b")
        snapshot = client.save_weights_for_sampler_ext("s", checkpoint_type="base").snapshot_name
        assert names(trainer.store / "checkpoints") == {"a", "b"}
        assert names(trainer.store / "sampler") == {snapshot}

        client.delete_checkpoint("weights/a")
        client.delete_checkpoint(f"sampler_weights/{snapshot}")
        assert names(trainer.store / "checkpoints") == {"b"} and names(trainer.store / "sampler") == set()
        assert (legacy / "checkpoints" / "a" / "meta.json").is_file()  # another job's checkpoint of the same name

        url = f"{trainer.base_url}/api/v1/training_runs/{client.inner.model_id}/checkpoints"
        key = {"X-API-Key": trainer.api_key}
        for checkpoint_id, status in (("weights/a", 404), ("sampler_weights/nope", 404), ("optimizer/b", 400),
                                      ("weights/..%2F..%2Flegacy-job%2Fcheckpoints%2Fa", 400),
                                      ("weights/.tmp-b-0123abcd", 400)):
            r = httpx.delete(f"{url}/{checkpoint_id}", headers=key)
            assert r.status_code == status, (checkpoint_id, r.status_code, r.text)
            assert "error" in r.json()
        assert httpx.delete(f"{trainer.base_url}/api/v1/training_runs/nobody/checkpoints/weights/b",
                            headers=key).status_code == 404
        assert httpx.delete(f"{url}/weights/b").status_code == 401  # the key is required here too
        assert names(trainer.store / "checkpoints") == {"b"}
        assert (legacy / "checkpoints" / "a" / "meta.json").is_file()
        with pytest.raises(Exception, match="not found"):  # the client raises; retention decides what to do
            client.delete_checkpoint("weights/a")
    finally:
        client.close()


# ------------------------------------------------------------------------------------------- retention in a run
def test_runs_keep_the_last_dcp_checkpoints_and_only_the_held_snapshot(root, scenario):
    reference = scenario["reference"]
    last = live(reference)[-1]
    store = root / "jobs" / last["job_id"]
    # DCP: the newest 2 periodic checkpoints and the final one; the others were deleted as the run went, and each
    # deletion is an event line of the index, which then no longer offers them.
    assert names(store / "checkpoints") == {"step-12", "step-14", f"step-{STEPS}"}
    assert [r["name"] for r in live(reference)] == ["step-12", "step-14", f"step-{STEPS}"]
    events = [r for r in index_lines(reference) if r.get("event") == "deleted"]
    assert [r["name"] for r in events] == [f"step-{s}" for s in range(2, 11, 2)]
    assert all(r["reason"] == "weight_sync.dcp_keep_last=2" and r["job_id"] == last["job_id"] for r in events)
    # Sampler snapshots: 15 weight syncs, and what is left is the final (promotable) one and the last synced one,
    # which the deployment held when the run ended.
    held = names(store / "sampler") - {last["sampler_path"]}
    assert len(held) == 1 and held.pop().startswith(f"sync-{STEPS - 1}-"), names(store / "sampler")
    assert (root / "models" / PROMOTED / "config.json").is_file()

    listing = run_cli(str(reference), module="cookbook.checkpoints", env={"COOKBOOK_PLATFORM_ROOT": str(root)})
    assert listing.returncode == 0, listing.stderr
    rows = [line.split()[0] for line in listing.stdout.splitlines()[1:] if line.startswith("step-")]
    assert rows == ["step-12", "step-14", f"step-{STEPS}"]
    assert "5 older periodic checkpoint(s) deleted by retention" in listing.stdout


def test_a_resume_after_retention_deleted_checkpoints_is_exact(root, scenario):
    killed = scenario["killed"]
    # Killed inside the step-8 save: the index offered step-4 and step-6 (step-2 deleted by then).
    assert scenario["after_kill"] == ["step-4", "step-6"]
    out = scenario["resumed"].stdout + scenario["resumed"].stderr
    assert f"resumed from {killed}:step-6 at step 6" in out
    diff = max_abs_diff(final_weights(root, killed), final_weights(root, scenario["reference"]))
    print(f"[storage] resumed after retention: max |dW| = {diff:.2g}")
    assert diff <= 1e-5
    # Retention in the resumed attempt deletes only its own job's checkpoints; the killed job's stay offered.
    by_job: dict[str, list[str]] = {}
    for r in live(killed):
        by_job.setdefault(r["job_id"], []).append(r["name"])
    assert by_job[scenario["killed_job"]] == ["step-4", "step-6"]
    assert [names for job, names in by_job.items() if job != scenario["killed_job"]] == [
        ["step-12", "step-14", f"step-{STEPS}"]]


def test_resume_from_a_deleted_checkpoint_is_a_user_error(scenario):
    refused = scenario["refused"]
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr
    for words in ("'step-2'", "was deleted", "dcp_keep_last=2", "weight_sync.dcp_keep_last=0", "step-4"):
        assert words in message, message


def test_the_next_run_removes_a_crashed_saves_temp_dirs(root, scenario):
    crashed = [n for n in scenario["leftovers"] if n.startswith(".tmp-step-8-")]
    assert scenario["leftovers"] == {"step-4", "step-6", *crashed} and len(crashed) == 1, scenario["leftovers"]
    # The rerun (a new trainer job: no trainer starts on the killed job's store again) removed the temp dir.
    assert names(root / "jobs" / scenario["killed_job"] / "checkpoints") == {"step-4", "step-6"}
    assert f"{crashed[0]}, left by an unfinished save of an earlier attempt" in scenario["resumed"].stdout


# --------------------------------------------------------------------------------------------- the storage command
def would_delete(stdout: str) -> set[str]:
    """The paths of a prune's `would delete` / `deleting` list."""
    listed = stdout.split("delete (", 1)[1] if "delete (" in stdout else stdout.split("deleting (", 1)[1]
    return {re.search(r"\s(/\S+)  \(", line).group(1) for line in listed.splitlines()[1:] if line.startswith("  ")}


def parse_jobs(stdout: str) -> dict[str, dict]:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] in ("running", "referenced", "orphaned", "unrecorded"):
            rows[parts[0]] = {"state": parts[1], "size": f"{parts[2]} {parts[3]}", "age": parts[4], "run": parts[5]}
    return rows


def test_storage_command_lists_and_prunes(root, scenario, trainer, legacy):
    reference, killed = scenario["reference"], scenario["killed"]
    ref_job = live(reference)[-1]["job_id"]
    shutil.rmtree(reference)  # that run is gone: its job is orphaned now (its promoted model stays)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / "models" / f".tmp-half-promoted-{dead.pid}").mkdir()  # a promotion whose process is gone
    (root / "warmstart" / "local-tiny-arith-0000").mkdir(parents=True)
    (root / "warmstart" / "local-tiny-arith-0000" / "config.json").write_text("{}")

    killed_job, resumed_job = scenario["killed_job"], live(killed)[-1]["job_id"]
    killed_jobs = registry(root, killed)  # killed, resumed, refused attempt
    refused_job = [j for j in killed_jobs if j not in (killed_job, resumed_job)]
    assert len(refused_job) == 1

    listing = storage_cli(root)
    assert listing.returncode == 0, listing.stderr
    jobs = parse_jobs(listing.stdout)
    assert jobs["live-job"]["state"] == "running"
    assert jobs["legacy-job"]["state"] == "unrecorded" and jobs["legacy-job"]["run"] == "-"
    for job in (killed_job, resumed_job):
        assert jobs[job]["state"] == "referenced" and jobs[job]["run"] == str(killed)
    for job in (ref_job, *refused_job):
        assert jobs[job]["state"] == "orphaned"
    assert jobs[ref_job]["run"] == str(reference)
    assert "its run directory is gone" in listing.stdout
    assert all(j["size"].split()[1] in ("B", "KB", "MB") and j["age"][-1] in "smhd" for j in jobs.values())
    assert f"resumable: step-12, step-14, step-{STEPS}" in listing.stdout
    assert "local-tiny-arith-0000" in listing.stdout and PROMOTED in listing.stdout

    # What no run can resume from or promote, known from how the scenario ran:
    expected = {
        *(f"jobs/{j}" for j in (ref_job, *refused_job)),  # orphaned: whole jobs
        # inside the referenced jobs, the snapshots the deployment held last (no index points at them)
        *(f"jobs/{killed_job}/sampler/{n}" for n in names(root / "jobs" / killed_job / "sampler")),
        *(f"jobs/{resumed_job}/sampler/{n}" for n in names(root / "jobs" / resumed_job / "sampler")
          if n != live(killed)[-1]["sampler_path"]),
        "jobs/legacy-job/checkpoints/.tmp-b-0123abcd",
        f"models/.tmp-half-promoted-{dead.pid}",
    }
    before = files(root)
    dry = storage_cli(root, "--prune")
    assert dry.returncode == 0, dry.stderr
    assert files(root) == before, "a dry run deleted something"
    listed = would_delete(dry.stdout)
    assert listed == {str(root / p) for p in expected}, listed ^ {str(root / p) for p in expected}
    assert "add --yes" in dry.stdout

    pruned = storage_cli(root, "--prune", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert would_delete(pruned.stdout) == listed
    after = files(root)
    gone = set(before) - set(after)
    assert gone == {f for f in before if any(f == p or f.startswith(p + "/") for p in expected)}
    assert all(after[f] == before[f] for f in after)
    freed = sum(before[f] for f in gone)
    assert f"freed {freed / 2**20:.1f} MB" in pruned.stdout, (freed, pruned.stdout[-500:])
    for p in expected:
        assert not (root / p).exists()
    print(f"[storage] prune freed {freed / 2**20:.1f} MB of {sum(before.values()) / 2**20:.1f} MB")

    # Unrecorded jobs go only when asked; nothing else is left to prune.
    again = storage_cli(root, "--prune", "--include-unrecorded")
    assert would_delete(again.stdout) == {str(legacy)}
    assert "(orphaned job: no run recorded it)" in again.stdout

    # The run can still resume (its newest checkpoint is in a job the prune cut down).
    more = train(root, killed, f"max_steps={STEPS + 2}")
    assert f"resumed from {killed}:step-{STEPS} at step {STEPS}" in more.stdout + more.stderr

    wrong = storage_cli(root, "--yes")
    assert wrong.returncode == 2 and "--prune" in wrong.stderr and "Traceback" not in wrong.stderr


# ------------------------------------------------------------------------------------------------------ bounded
@pytest.mark.slow
def test_a_500_step_grpo_run_keeps_storage_bounded(tmp_path):
    """500 GRPO steps on local-tiny, a weight sync every step and a DCP checkpoint every 25: the run's storage ends
    at most 5 x (one DCP checkpoint + one base snapshot)."""
    from cookbook.local.storage import size_and_newest

    root, log_path = tmp_path / "platform", tmp_path / "run"
    started = time.monotonic()
    # Two epochs: with groups without signal refilled from the data, one epoch of the 2,000 prompts ends near step 450.
    train(root, log_path, "max_steps=500", "recipe.epochs=2", "recipe.group_size=2", "recipe.max_completion_tokens=2",
          "weight_sync.dcp_save_interval=25", "weight_sync.dcp_keep_last=3", base=GRPO)
    wall = time.monotonic() - started
    last = live(log_path)[-1]
    store = root / "jobs" / last["job_id"]
    dcp = size_and_newest(store / "checkpoints" / last["name"])[0]
    base = size_and_newest(store / "sampler" / last["sampler_path"])[0]
    total = size_and_newest(root)[0]
    limit = 5 * (dcp + base)
    print(f"[storage] 500-step GRPO: {wall:.0f}s wall; storage {total / 2**20:.1f} MB (DCP {dcp / 2**20:.1f} MB, "
          f"base snapshot {base / 2**20:.1f} MB, limit {limit / 2**20:.1f} MB); "
          f"{len(names(store / 'checkpoints'))} DCP checkpoints, {len(names(store / 'sampler'))} snapshots")
    assert total <= limit
    assert names(store / "checkpoints") == {"step-425", "step-450", "step-475", "step-500"}
    assert len(names(store / "sampler")) == 2
    assert sum(1 for r in index_lines(log_path) if r.get("event") == "deleted") == 19 - 3
