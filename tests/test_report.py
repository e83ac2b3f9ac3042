"""`python -m cookbook.report` on hand-made run and sweep directories (status.json + metrics.jsonl fixtures)."""

import json
from pathlib import Path

import pytest

from conftest import run_cli
from cookbook import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(path: Path, status: dict | None, metrics: list[dict] = (), hydra_overrides: list[str] | None = None):
    path.mkdir(parents=True)
    if status is not None:
        (path / "status.json").write_text(json.dumps(status))
    if metrics:
        (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if hydra_overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in hydra_overrides))
    return path


@pytest.fixture
def sweep_dir(tmp_path):
    """Four jobs as a sweep leaves them: two finished (SFT-like and GRPO-like metrics), one failed, one that died
    before writing status.json; plus Hydra/submitit clutter that is not a job."""
    sweep = tmp_path / "sweep"
    make_job(sweep / "0_+recipe=sft,recipe.learning_rate=1e-4",
             {"status": "ok", "overrides": ["+recipe=sft", "recipe.learning_rate=1e-4"], "wall_time_s": 12.5,
              "final_metrics": {"step": 3, "train/loss": 1.25, "eval/loss": 1.5, "eval/rows": 64,
                                "perf/step_time": 0.1}},
             [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5},
              {"step": 3, "train/loss": 1.25, "eval/loss": 1.5, "eval/accuracy": 0.5}], hydra_overrides=[])
    make_job(sweep / "1_+recipe=grpo,recipe.learning_rate=3e-4",
             {"status": "ok", "overrides": ["+recipe=grpo", "recipe.learning_rate=3e-4"], "wall_time_s": 125.0,
              "final_metrics": {"step": 2, "rollout/raw_reward": 0.75, "train/loss": 0.125}},
             [{"step": 1, "rollout/raw_reward": 0.25, "train/loss": 0.5},
              {"step": 2, "rollout/raw_reward": 0.75, "train/loss": 0.125}])
    make_job(sweep / "2_+recipe=sft,recipe.dataset=~nonexistent.jsonl",
             {"status": "failed", "overrides": ["+recipe=sft", "recipe.dataset=/nonexistent.jsonl"],
              "error": "DataError: Dataset file /nonexistent.jsonl does not exist | see docs", "wall_time_s": 3.0,
              "final_metrics": {}})
    make_job(sweep / "10_+recipe=sft,seed=3", None, hydra_overrides=["+recipe=sft", "seed=3"])
    (sweep / ".submitit" / "123").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "notes").mkdir()  # a plain directory without status.json or .hydra/: not a job
    return sweep


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """Rows of the report table keyed by the job column, each as {header: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip()[2:-2].split(" | ")]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_report_on_a_sweep_dir_writes_one_png_per_family_and_a_table_matching_the_status_files(sweep_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli(str(sweep_dir), "--out", str(out), module="cookbook.report", timeout=120)
    assert result.returncode == 0, result.stderr
    markdown = (out / "report.md").read_text()
    assert result.stdout.strip() == markdown.strip()  # also printed
    for png in ("train_loss.png", "rollout_reward.png", "eval.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
        assert f"]({png})" in markdown  # linked relative to report.md
    assert "4 jobs: 2 ok, 1 failed, 1 missing" in markdown

    rows = table_rows(markdown)
    assert list(rows) == ["#0", "#1", "#2", "#10"]  # numeric job order, clutter skipped
    for label, job_dir in (("#0", "0_+recipe=sft,recipe.learning_rate=1e-4"),
                           ("#1", "1_+recipe=grpo,recipe.learning_rate=3e-4"),
                           ("#2", "2_+recipe=sft,recipe.dataset=~nonexistent.jsonl")):
        status = json.loads((sweep_dir / job_dir / "status.json").read_text())
        row = rows[label]
        assert row["status"] == status["status"]
        assert row["overrides"] == " ".join(status["overrides"])
        for key, value in status["final_metrics"].items():
            if key in row:
                assert row[key] == (f"{value:.4g}" if isinstance(value, float) else str(value))
    # A handful of metric columns: headline of each family; perf/* and counts (eval/rows) are left out.
    assert [c for c in rows["#0"] if "/" in c] == ["train/loss", "rollout/raw_reward", "eval/loss"]
    assert rows["#0"]["wall time"] == "12.5 s" and rows["#1"]["wall time"] == "2m05s"
    assert rows["#1"]["eval/loss"] == "-"
    assert rows["#2"]["error"].startswith("DataError: Dataset file /nonexistent.jsonl does not exist \\| see")
    assert rows["#10"]["status"] == "missing" and rows["#10"]["overrides"] == "+recipe=sft seed=3"
    assert "no status.json" in rows["#10"]["error"]


def test_report_on_a_single_run_dir_defaults_to_writing_into_it(tmp_path):
    run = make_job(tmp_path / "runs" / "sft-local-tiny-20260101-000000",
                   {"status": "ok", "overrides": ["+recipe=sft"], "wall_time_s": 4.0,
                    "final_metrics": {"step": 2, "train/loss": 0.5}},
                   [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}])
    result = run_cli(str(run), module="cookbook.report", timeout=120)
    assert result.returncode == 0, result.stderr
    assert (run / "report.md").exists() and (run / "train_loss.png").exists()
    assert not (run / "eval.png").exists() and not (run / "rollout_reward.png").exists()  # no such metrics
    rows = table_rows((run / "report.md").read_text())
    assert list(rows) == ["sft-local-tiny-20260101-000000"]
    assert rows["sft-local-tiny-20260101-000000"]["train/loss"] == "0.5"


@pytest.mark.parametrize("make,words", [
    (lambda p: p / "absent", ["is not a directory"]),
    (lambda p: p, ["no jobs in"]),
])
def test_report_cli_explains_a_wrong_path(tmp_path, make, words):
    result = run_cli(str(make(tmp_path)), module="cookbook.report", timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_series_keeps_the_last_value_of_a_re_logged_step_and_skips_non_numbers(tmp_path):
    # A run that crashed after step 3 and resumed from its step-2 checkpoint logs step 3 twice.
    job = report.Job(path=tmp_path, status=None, metrics=[
        {"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}, {"step": 3, "train/loss": 9.0},
        {"step": 3, "train/loss": 1.0}, {"step": 4, "train/loss": None}, {"step": 5, "train/loss": True},
        {"step": 6, "eval/loss": 1.0}])
    assert report.series(job, "train/loss") == ([1, 2, 3], [3.0, 2.0, 1.0])


def test_final_metrics_fall_back_to_the_last_logged_values(tmp_path):
    job = report.Job(path=tmp_path, status={"status": "running"},
                     metrics=[{"step": 1, "train/loss": 2.0, "eval/loss": 3.0}, {"step": 2, "train/loss": 1.0}])
    assert job.final_metrics == {"step": 2, "train/loss": 1.0, "eval/loss": 3.0}
    assert not job.ok and "killed" in job.error
