"""The checkpoint index and the resume rules without a platform: `Checkpointer` against a recording stub policy,
the JSONL index (torn lines), and `python -m cookbook.checkpoints` on a synthetic run directory.

The end-to-end versions (real trainer, kills, crash points, promotion) are in test_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import run_cli
from cookbook.checkpoints import INDEX, Checkpointer, describe, read_index
from cookbook.config.compose import compose_run_config
from cookbook.errors import UserError
from cookbook.runs.rundir import append_jsonl, read_jsonl

CURSOR = {"position": 16, "num_rows": 2000, "epochs": 16, "shuffle": True, "seed": 0}


class StubPolicy:
    """Records the trainer calls the Checkpointer makes."""

    job_id = "job-a"

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def save_state(self, name, timeout=None):
        self.calls.append(("save_state", name))

    def save_weights_for_sampler_ext(self, name, checkpoint_type=None, timeout=None):
        self.calls.append(("save_sampler", f"{name}:{checkpoint_type}"))
        return SimpleNamespace(snapshot_name=f"{name}-abc123")

    def resolve_checkpoint_path(self, name, source_job_id=None):
        return f"cross_job://{source_job_id}/{name}"

    def load_state(self, path, timeout=None):
        self.calls.append(("load_state", path))

    def load_state_with_optimizer(self, path, timeout=None):
        self.calls.append(("load_state_with_optimizer", path))


def make(log_path: Path, *overrides: str, recipe: str = "sft") -> tuple[Checkpointer, StubPolicy]:
    run = compose_run_config([f"+recipe={recipe}", f"log_path={log_path}", *overrides])
    log_path.mkdir(parents=True, exist_ok=True)
    policy = StubPolicy()
    return Checkpointer(run, policy, recipe), policy


def saved_run(tmp_path: Path, steps=(2, 4), name: str = "run") -> Path:
    log_path = tmp_path / name
    ckpt, _ = make(log_path)
    for s in steps:
        ckpt.save(s, {**CURSOR, "position": 8 * s}, final=s == steps[-1])
    return log_path


# ------------------------------------------------------------------------------------------------------- saving
def test_save_appends_one_complete_line_per_checkpoint(tmp_path):
    log_path = tmp_path / "run"
    ckpt, policy = make(log_path)
    ckpt.save(2, CURSOR)
    ckpt.save(4, {**CURSOR, "position": 32}, final=True)
    lines = (log_path / INDEX).read_text().splitlines()
    assert len(lines) == 2
    first, final = map(json.loads, lines)
    for key in ("name", "step", "kind", "data_cursor", "state_path", "sampler_path", "job_id", "base_model",
                "training_shape", "recipe", "time", "save_time_s"):
        assert key in first and key in final, key
    assert first["name"] == "step-2" and first["kind"] == "state" and first["sampler_path"] is None
    assert first["data_cursor"] == CURSOR and first["state_path"] == "cross_job://job-a/step-2"
    assert first["base_model"] == "local-tiny" and first["recipe"] == "sft"
    assert first["training_shape"] == "accounts/local/trainingShapes/local-tiny"
    assert final["kind"] == "both" and final["sampler_path"] == "step-4-abc123"
    assert policy.calls == [("save_state", "step-2"), ("save_state", "step-4"), ("save_sampler", "step-4:base")]


def test_final_save_at_a_step_already_saved_does_not_save_the_state_twice(tmp_path):
    ckpt, policy = make(tmp_path / "run")
    ckpt.save(4, CURSOR)
    ckpt.save(4, CURSOR, final=True)
    assert [c for c in policy.calls if c[0] == "save_state"] == [("save_state", "step-4")]


def test_torn_last_line_is_ignored_and_the_next_append_starts_a_fresh_line(tmp_path):
    log_path = saved_run(tmp_path)
    index = log_path / INDEX
    last = index.read_text().splitlines()[-1]
    with open(index, "a") as f:
        f.write(last[: len(last) // 2])  # a crash in the middle of an append
    assert [r["step"] for r in read_index(log_path)] == [2, 4]
    append_jsonl(index, {"name": "step-6", "step": 6, "state_path": "cross_job://job-a/step-6"})
    assert [r["step"] for r in read_index(log_path)] == [2, 4, 6]
    append_jsonl(tmp_path / "fresh.jsonl", {"a": 1})  # a new file gets no leading newline
    assert (tmp_path / "fresh.jsonl").read_text() == '{"a": 1}\n'
    assert read_jsonl(tmp_path / "missing.jsonl") == []


# ------------------------------------------------------------------------------------------------------ resuming
def test_auto_resumes_from_the_last_line_with_optimizer_step_and_cursor(tmp_path):
    log_path = saved_run(tmp_path, steps=(2, 4, 6))
    ckpt, policy = make(log_path)
    point = ckpt.resume()
    assert (point.step, point.cursor["position"]) == (6, 48)
    assert point.source == f"{log_path}:step-6"
    assert policy.calls == [("load_state_with_optimizer", "cross_job://job-a/step-6")]


def test_fresh_start_loads_init_weights_only(tmp_path):
    ckpt, policy = make(tmp_path / "run")
    point = ckpt.resume("cross_job://other/step-9")
    assert (point.step, point.cursor, point.source) == (0, None, None)
    assert policy.calls == [("load_state", "cross_job://other/step-9")]


def test_resume_never_and_must(tmp_path):
    log_path = saved_run(tmp_path)
    ckpt, policy = make(log_path, "resume=never")
    with pytest.raises(UserError, match="resume=never.*2 checkpoint\\(s\\).*step-4.*new log_path"):
        ckpt.resume()
    ckpt, policy = make(tmp_path / "empty", "resume=must")
    with pytest.raises(UserError, match="resume=must.*no checkpoint"):
        ckpt.resume()
    assert policy.calls == []
    ckpt, _ = make(log_path, "resume=must")
    assert ckpt.resume().step == 4


def test_resume_from_named_checkpoint_of_this_run_is_a_full_resume(tmp_path):
    log_path = saved_run(tmp_path, steps=(2, 4, 6))
    ckpt, policy = make(log_path, "resume_from=step-4")
    point = ckpt.resume()
    assert (point.step, point.cursor["position"]) == (4, 32)
    assert policy.calls == [("load_state_with_optimizer", "cross_job://job-a/step-4")]
    ckpt, _ = make(log_path, "resume_from=step-5")
    with pytest.raises(UserError, match="no checkpoint named 'step-5'.*step-2, step-4, step-6"):
        ckpt.resume()


def test_resume_from_another_run_resets_position_weights_only_resets_optimizer(tmp_path):
    other = saved_run(tmp_path, steps=(2, 4), name="other")
    ckpt, policy = make(tmp_path / "new", f"resume_from={other}:step-2")
    point = ckpt.resume()
    assert (point.step, point.cursor, point.source) == (0, None, f"{other}:step-2")
    assert policy.calls == [("load_state_with_optimizer", "cross_job://job-a/step-2")]
    ckpt, policy = make(tmp_path / "new2", f"resume_from={other}:step-4", "resume_weights_only=true")
    point = ckpt.resume()
    assert (point.step, point.cursor) == (0, None)
    assert policy.calls == [("load_state", "cross_job://job-a/step-4")]  # no optimizer state


@pytest.mark.parametrize("overrides, recipe, differs", [
    ([], "orpo", "recipe (checkpoint: sft, this run: orpo)"),
    (["base_model=local-small"], "sft", "base_model (checkpoint: local-tiny, this run: local-small)"),
    (["infra=local-small"], "sft", "training_shape (checkpoint: accounts/local/trainingShapes/local-tiny"),
])
def test_mismatch_is_refused_with_what_differs_unless_forced(tmp_path, overrides, recipe, differs):
    log_path = saved_run(tmp_path)
    ckpt, policy = make(log_path, *overrides, recipe=recipe)
    with pytest.raises(UserError) as err:
        ckpt.resume()
    assert differs in str(err.value) and "resume_force=true" in str(err.value)
    assert policy.calls == []
    ckpt, policy = make(log_path, *overrides, "resume_force=true", recipe=recipe)
    assert ckpt.resume().step == 4
    # The same check guards resume_from=<other run>:<name>.
    ckpt, policy = make(tmp_path / "new", *overrides, f"resume_from={log_path}:step-2", recipe=recipe)
    with pytest.raises(UserError, match="resume_force"):
        ckpt.resume()


# ------------------------------------------------------------------------------------------------------- listing
def test_listing_prints_every_checkpoint_with_step_kind_time_and_size(tmp_path):
    log_path = saved_run(tmp_path, steps=(2, 4, 6))
    storage = tmp_path / "storage"
    for name, size in (("step-2", 3 * 2**20), ("step-4", 3 * 2**20), ("step-6", 2**20)):
        (storage / "jobs" / "job-a" / "checkpoints" / name).mkdir(parents=True)
        (storage / "jobs" / "job-a" / "checkpoints" / name / "__0_0.distcp").write_bytes(b"\0" * size)
    rows = describe(log_path, storage)
    assert [(r["name"], r["step"], r["kind"], r["size_mb"]) for r in rows] == [
        ("step-2", 2, "state", 3.0), ("step-4", 4, "state", 3.0), ("step-6", 6, "both", 1.0)]
    out = run_cli(str(log_path), module="cookbook.checkpoints", env={"COOKBOOK_PLATFORM_ROOT": str(storage)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["name", "step", "kind", "time", "size"]
    assert [line.split()[:3] for line in lines[1:]] == [["step-2", "2", "state"], ["step-4", "4", "state"],
                                                       ["step-6", "6", "both"]]
    assert all(rows[i]["time"] in lines[1 + i] for i in range(3)) and "3.0 MB" in lines[1]
    # Storage that is not local (or a job already cleaned up): the size column says "-".
    out = run_cli(str(log_path), module="cookbook.checkpoints", env={"COOKBOOK_PLATFORM_ROOT": str(tmp_path / "x")})
    assert out.returncode == 0 and all(line.split()[4] == "-" for line in out.stdout.splitlines()[1:])


def test_listing_a_directory_without_an_index_exits_2(tmp_path):
    out = run_cli(str(tmp_path), module="cookbook.checkpoints")
    assert out.returncode == 2 and "checkpoints.jsonl does not exist" in out.stderr and "log_path" in out.stderr
