"""Sweeps: launchers, saved sweeps, failure isolation and exit codes, the sweep summary, rerun = resume.

The real sweeps run SFT on local-tiny for 2 steps (about 10-20 s a job on 2 CPU cores). The default suite keeps
one sequential 3-job sweep and its rerun; joblib and submitit runs are marked slow.
"""

import json
import os
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import run_cli
from cookbook.runs import sweep
from cookbook.config.compose import CONF_DIR, compose
from cookbook.config.preflight import expand_sweep

TINY_SFT = ["+recipe=sft", "max_steps=2", "recipe.batch_size=4", "recipe.eval_dataset=null"]
MISSING_DATA = "/nonexistent.jsonl"  # valid config (preflight passes); the recipe fails when it loads the data


def no_fireworks_key() -> dict:
    return {k: v for k, v in os.environ.items() if k != "FIREWORKS_API_KEY"}


def job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return sorted(dirs, key=lambda d: int(d.name.split("_", 1)[0]))


def status(job_dir: Path) -> dict:
    return json.loads((job_dir / "status.json").read_text())


def attempts(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "attempts.jsonl").read_text().splitlines()]


def summary_states(sweep_dir: Path) -> dict[str, str]:
    """Job label → status column of the sweep's summary.md table."""
    rows = [line for line in (sweep_dir / "summary.md").read_text().splitlines() if line.startswith("| #")]
    return {row.split(" | ")[0].lstrip("| #"): row.split(" | ")[1] for row in rows}


# ----------------------------------------------------------------------------------------------------------------
# Configs: launchers and saved sweeps
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher,target,values", [
    ("local_parallel", "JoblibLauncher", {"n_jobs": 2, "backend": "loky"}),
    ("local_submitit", "submitit_launcher.LocalLauncher", {"gpus_per_node": 0, "timeout_min": 60}),
    ("slurm", "submitit_launcher.SlurmLauncher", {"max_num_timeout": 3, "partition": None}),
])
def test_launcher_configs_compose_onto_the_plugin_schemas(launcher, target, values):
    cfg = compose(["+recipe=sft", f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    for key, value in values.items():
        assert cfg.hydra.launcher[key] == value


def test_every_launcher_and_sweep_field_is_commented():
    files = sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml")) + sorted((CONF_DIR / "sweep").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- ") or stripped.endswith(":"):
                continue  # comments, defaults-list entries, section headers
            assert "#" in line, f"{path.name}: field without a comment: {line!r}"


@pytest.mark.parametrize("overrides,expected", [
    (["+recipe=grpo", "+sweep=shapes"], [["infra=qwen3-8b-h200"], ["infra=qwen3p5-9b"]]),
    (["+recipe=sft", "+sweep=local_lr"], [[f"recipe.learning_rate={lr}"] for lr in ("0.0003", "0.001", "0.003", "0.01")]),
    # A command-line value replaces the saved one.
    (["+recipe=grpo", "+sweep=shapes", "infra=qwen3p5-9b"], [["infra=qwen3p5-9b"]]),
])
def test_saved_sweeps_expand_to_one_job_per_value(overrides, expected):
    jobs = expand_sweep(overrides)
    assert [[o for o in job if o in sum(expected, [])] for job in jobs] == expected


# ----------------------------------------------------------------------------------------------------------------
# The callback's logic, without Hydra
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(sweep, "_state", {"sweep_dir": None, "dry_run": False, "finished": False, "failed": False})
    return sweep._state


def fake_job_return(job_dir: Path, status: str, value, mode: str = "MULTIRUN"):
    from hydra.core.utils import JobStatus
    from hydra.types import RunMode

    hydra_cfg = SimpleNamespace(hydra=SimpleNamespace(mode=RunMode[mode], runtime=SimpleNamespace(output_dir=str(job_dir))))
    return SimpleNamespace(hydra_cfg=hydra_cfg, status=JobStatus[status], _return_value=value,
                           overrides=["+recipe=sft", "seed=1"])


def test_finish_is_a_no_op_outside_a_multirun(fresh_state):
    assert sweep.finish() is False


def test_a_broken_summary_cannot_turn_a_failed_sweep_into_success(fresh_state, monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    fresh_state["sweep_dir"] = tmp_path
    monkeypatch.setattr(sweep, "summarize", broken)
    assert sweep.finish() is True
    assert "treating the sweep as failed" in capsys.readouterr().err
    assert sweep.finish() is True  # idempotent: train.main() calls it again after on_multirun_end


def test_a_broken_report_still_prints_the_failures(tmp_path, monkeypatch, capsys):
    from cookbook import report

    job = tmp_path / "0_seed=1"
    job.mkdir()
    (job / "status.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
    monkeypatch.setattr(report, "write_report", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no fonts")))
    assert sweep.summarize(tmp_path) is True
    err = capsys.readouterr().err
    assert "could not write the sweep summary" in err and "RuntimeError: boom" in err


@pytest.mark.parametrize("states,failed", [
    (["ok", "ok"], False), (["ok", "failed"], True), (["ok", "running"], True), (["ok", "cancelled"], True),
    (["ok", None], True),  # a job dir without status.json: the job died before the runner wrote one
])
def test_any_unfinished_job_fails_the_sweep(tmp_path, states, failed, capsys):
    for i, state in enumerate(states):
        job = tmp_path / f"{i}_seed={i}"
        (job / ".hydra").mkdir(parents=True)
        if state:
            (job / "status.json").write_text(json.dumps({"status": state, "overrides": [f"seed={i}"]}))
    assert sweep.summarize(tmp_path) is failed
    assert (tmp_path / "summary.md").exists()
    err = capsys.readouterr().err
    assert ("1 of 2 sweep jobs did not finish" in err) is failed


def test_on_job_end_records_an_exception_that_escaped_the_runner(tmp_path):
    sweep.record_job_end(fake_job_return(tmp_path, "FAILED", ValueError("bad key")))
    recorded = json.loads((tmp_path / "status.json").read_text())
    assert recorded["status"] == "failed" and recorded["error"] == "ValueError: bad key"
    assert recorded["overrides"] == ["+recipe=sft", "seed=1"]


def test_on_job_end_keeps_the_runners_own_failure_record(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"status": "failed", "error": "DataError: from the runner"}))
    sweep.record_job_end(fake_job_return(tmp_path, "FAILED", RuntimeError("later")))
    assert json.loads((tmp_path / "status.json").read_text())["error"] == "DataError: from the runner"


def test_on_job_end_writes_a_dry_run_plan_only_in_multirun(tmp_path):
    plan = {"status": "dry_run", "policy_trainer": "shape", "reference_trainer": None, "deployment": "d"}
    sweep.record_job_end(fake_job_return(tmp_path, "COMPLETED", plan, mode="RUN"))
    assert not (tmp_path / "plan.json").exists()
    sweep.record_job_end(fake_job_return(tmp_path, "COMPLETED", plan))
    assert json.loads((tmp_path / "plan.json").read_text()) == plan


# ----------------------------------------------------------------------------------------------------------------
# CLI: dry runs and jobs that raise (seconds)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_beta,references", [(0.0, 0), (0.01, 1)])
def test_dry_run_over_the_fireworks_shapes_needs_no_credentials(tmp_path, kl_beta, references):
    """GRPO provisions a reference trainer only with kl_beta > 0, and only on a shape with a reference shape (qwen3-8b);
    qwen3p5-9b has none, so its reference is the frozen base model on the policy trainer."""
    sweep_dir = tmp_path / "shapes"
    result = run_cli("-m", "+recipe=grpo", "+sweep=shapes", f"recipe.kl_beta={kl_beta}", "dry_run=true",
                     f"hydra.sweep.dir={sweep_dir}", env=no_fireworks_key(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[dry-run] +recipe=grpo") + result.stdout.count("[dry-run] infra=") == 2
    for shape in ("qwen3-8b-128k-h200", "qwen3p5-9b-256k"):
        assert f"policy_trainer     accounts/fireworks/trainingShapes/{shape}" in result.stdout
    noun = "reference trainer" if references == 1 else "reference trainers"
    assert (f"[dry-run] 2 jobs would create 2 policy trainers, {references} {noun} and 2 deployments; "
            "nothing was started.") in result.stdout
    assert not list(sweep_dir.rglob("status.json")) and not list(sweep_dir.rglob("metrics.jsonl"))


def test_a_job_that_raises_is_recorded_and_the_sweep_exits_1_even_without_on_multirun_end(tmp_path):
    # The head process has a W&B key, so preflight passes; each job's environment blanks it, so the runner raises
    # a UserError inside the job. Hydra's basic sweeper then re-raises at the end and skips on_multirun_end.
    sweep_dir = tmp_path / "raises"
    result = run_cli("-m", "+recipe=sft", "dry_run=true", "wandb=online", "+hydra.job.env_set.WANDB_API_KEY=''",
                     "infra=local-tiny,local-small", f"hydra.sweep.dir={sweep_dir}",
                     env={"WANDB_API_KEY": "fake-key-for-test"}, timeout=120)
    assert result.returncode == 1
    assert "2 of 2 sweep jobs did not finish" in result.stderr
    for job in job_dirs(sweep_dir):
        assert status(job)["status"] == "failed" and "WANDB_API_KEY" in status(job)["error"]
    assert summary_states(sweep_dir) == {"0": "failed", "1": "failed"}


# ----------------------------------------------------------------------------------------------------------------
# Real sweeps on local-tiny
# ----------------------------------------------------------------------------------------------------------------


def check_finished_sweep(result, sweep_dir: Path, expected: dict[int, str]) -> list[Path]:
    """Exit code, one status per job as expected, failures listed, summary table = status files."""
    assert result.returncode == (1 if "failed" in expected.values() else 0), result.stdout[-3000:] + result.stderr
    dirs = job_dirs(sweep_dir)
    assert [int(d.name.split("_")[0]) for d in dirs] == sorted(expected)
    for d in dirs:
        num = int(d.name.split("_")[0])
        assert status(d)["status"] == expected[num], (d.name, status(d).get("error"))
        assert "/" not in d.name.replace("~", "")  # values with `/` stay in one flat directory
    assert summary_states(sweep_dir) == {str(n): s for n, s in expected.items()}
    assert (sweep_dir / "train_loss.png").exists()
    for d in dirs:
        if status(d)["status"] == "failed":
            assert "DataError" in status(d)["error"] and (d / "error.txt").exists()
            assert f"#{d.name.split('_')[0]} failed" in result.stderr  # the failure table names the job
        else:
            assert status(d)["final_metrics"]["steps"] == 2 and (d / "metrics.jsonl").exists()
    return dirs


@pytest.fixture(scope="module")
def sequential_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("seq") / "sweep"
    args = ["-m", *TINY_SFT, f"recipe.dataset=bundled:sft_arith_train,bundled:sft_arith_eval,{MISSING_DATA}",
            f"hydra.sweep.dir={sweep_dir}"]
    return args, sweep_dir, run_cli(*args, timeout=600)


def test_sequential_sweep_isolates_a_failing_job_and_exits_1(sequential_sweep):
    args, sweep_dir, result = sequential_sweep
    dirs = check_finished_sweep(result, sweep_dir, {0: "ok", 1: "ok", 2: "failed"})
    assert dirs[2].name.endswith("recipe.dataset=~nonexistent.jsonl,recipe.eval_dataset=null")
    # It failed at run time, inside the recipe, not in preflight: the job had started its platform.
    assert (dirs[2] / "attempts.jsonl").exists() and "Traceback" in (dirs[2] / "error.txt").read_text()
    assert len({a["pid"] for d in dirs for a in attempts(d)}) == 1  # basic launcher: all jobs in one process


def test_sweep_rerun_skips_finished_jobs_resumes_unfinished_ones_and_retries_failed_ones(sequential_sweep):
    args, sweep_dir, _ = sequential_sweep
    dirs = job_dirs(sweep_dir)
    # Job #1 pretends to have been killed after its last checkpoint: status still `running`.
    killed = status(dirs[1])
    killed.update(status="running")
    killed.pop("final_metrics")
    (dirs[1] / "status.json").write_text(json.dumps(killed))
    ok_before = (dirs[0] / "status.json").read_text()

    result = run_cli(*args, timeout=600)
    check_finished_sweep(result, sweep_dir, {0: "ok", 1: "ok", 2: "failed"})
    assert f"[skip] {dirs[0].name}" in result.stdout
    assert (dirs[0] / "status.json").read_text() == ok_before and len(attempts(dirs[0])) == 1
    assert len(attempts(dirs[1])) == 2 and status(dirs[1])["final_metrics"]["steps_this_attempt"] == 0  # resumed
    assert len(attempts(dirs[2])) == 2  # failed jobs are retried


def _intervals_overlap(dirs: list[Path]) -> bool:
    spans = []
    for d in dirs:
        start = datetime.strptime(attempts(d)[0]["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        spans.append((start, start + status(d)["wall_time_s"]))
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_processes_without_collisions(tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1="},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(8)))
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", *TINY_SFT,
                     f"recipe.dataset=bundled:sft_arith_train,bundled:sft_arith_eval,{tiny},{MISSING_DATA}",
                     "hydra/launcher=local_parallel", f"hydra.sweep.dir={sweep_dir}", timeout=600)
    dirs = check_finished_sweep(result, sweep_dir, {0: "ok", 1: "ok", 2: "ok", 3: "failed"})
    assert len({a["pid"] for d in dirs for a in attempts(d)}) == 2  # n_jobs=2 worker processes
    assert _intervals_overlap(dirs)  # the jobs really ran at the same time
    # Each job that ran had its own embedded platform (control plane + trainer), inside its own job dir, on its own
    # ports; the job with the missing dataset failed before starting one.
    ran = [d for d in dirs if status(d)["status"] == "ok"]
    ports = [p.read_text().strip() for d in ran for p in (d / "platform" / "run").glob("*.port")]
    assert len(ports) >= 2 * len(ran) and len(set(ports)) == len(ports)


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_own_subprocess(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", *TINY_SFT, f"recipe.dataset=bundled:sft_arith_eval,{MISSING_DATA}",
                     "hydra/launcher=local_submitit", f"hydra.sweep.dir={sweep_dir}", timeout=600)
    dirs = check_finished_sweep(result, sweep_dir, {0: "ok", 1: "failed"})
    assert len({a["pid"] for d in dirs for a in attempts(d)}) == 2
    logs = list((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and any("[failed]" in log.read_text() for log in logs)


def test_a_sweep_without_job_directories_is_a_failure(tmp_path, capsys):
    # e.g. the head process looked at another directory than the launcher wrote to
    assert sweep.summarize(tmp_path / "nowhere") is True and sweep.summarize(tmp_path, dry_run=True) is True
    assert "no job directories" in capsys.readouterr().err
