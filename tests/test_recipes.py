"""Every recipe end to end through the CLI on local-tiny (short runs), a real 2-job sweep, and bad data.

Each run goes through `python -m cookbook.train` in a subprocess, exactly as a user would launch it: embedded
platform, trainer service, deployment where the recipe needs one, the recipe loop, the final checkpoint and the
evaluation hook. The assertions read what the run leaves behind: status.json, metrics.jsonl, checkpoints.jsonl.
The learning proofs (longer runs that must reach a score) are in test_learning.py.
"""

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, run_cli

BAD = REPO / "tests" / "data" / "bad"
STEPS = 3

# Short runs: small batches, three optimizer steps. GRPO keeps its default SFT warm start (`warmstart:arith`, built
# on first use and cached under $COOKBOOK_PLATFORM_ROOT/warmstart): from random init a byte-level model never earns
# a reward, every group is uninformative and no optimizer step would run, so the warm start is what makes this a
# real GRPO run. It also covers the warm-start path once in the default suite.
RECIPES = {
    "sft": ["recipe.batch_size=8", "recipe.max_eval_rows=16"],
    "grpo": ["recipe.batch_size=4", "recipe.group_size=4", "recipe.max_completion_tokens=4",
             "recipe.max_eval_rows=16"],
    "dpo": ["recipe.batch_size=4", "recipe.max_eval_rows=16"],
    "orpo": ["recipe.batch_size=4", "recipe.max_eval_rows=16"],
}
# Metrics every optimizer step logs, per recipe (GRPO: on steps that had at least one informative group).
STEP_METRICS = {
    "sft": {"train/loss", "train/lr", "train/grad_norm", "train/loss_tokens", "train/tokens_per_s",
            "perf/fwd_bwd_time", "perf/optim_step_time", "perf/step_time"},
    "grpo": {"train/loss", "train/lr", "train/tokens_per_s", "rollout/reward", "rollout/groups_kept",
             "perf/rollout_time", "perf/fwd_bwd_time", "perf/optim_step_time", "perf/step_time"},
    "dpo": {"train/loss", "train/lr", "train/margin", "train/accuracy", "train/chosen_reward",
            "perf/fwd_bwd_time", "perf/optim_step_time", "perf/step_time"},
    "orpo": {"train/loss", "train/lr", "train/sft_loss", "train/or_loss", "train/accuracy",
             "perf/fwd_bwd_time", "perf/optim_step_time", "perf/step_time"},
}
EVAL_METRIC = {"sft": "eval/exact_match", "grpo": "eval/exact_match", "dpo": "eval/preference_accuracy",
               "orpo": "eval/preference_accuracy"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_finished_run(run_dir: Path, recipe: str, steps: int) -> list[dict]:
    """status ok, one metrics line per step, a final "both" checkpoint at the last step; returns the metrics."""
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "ok" and status["recipe"] == recipe, status
    final = status["final_metrics"]
    assert final["steps"] == steps and final["final_checkpoint"] == f"step-{steps}"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics if "perf/step_time" in m] == list(range(1, steps + 1))
    checkpoints = read_jsonl(run_dir / "checkpoints.jsonl")
    assert checkpoints and checkpoints[-1]["kind"] == "both" and checkpoints[-1]["step"] == steps
    assert checkpoints[-1]["recipe"] == recipe and checkpoints[-1]["base_model"] == "local-tiny"
    return metrics


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_end_to_end_through_the_cli(recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(f"+recipe={recipe}", f"max_steps={STEPS}", *RECIPES[recipe], f"log_path={run_dir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    metrics = check_finished_run(run_dir, recipe, STEPS)

    steps = [m for m in metrics if "perf/step_time" in m]
    trained = [m for m in steps if "train/loss" in m]
    if recipe == "grpo":
        assert all("rollout/reward" in m for m in steps)
        assert trained, "no GRPO step had an informative group: the warm start is not being used"
        assert any(m["rollout/reward"] > 0 for m in steps)
    else:
        assert trained == steps
    for m in trained:
        missing = STEP_METRICS[recipe] - set(m)
        assert not missing, f"step {m['step']} lacks {sorted(missing)}"
        assert all(v is not None for v in m.values()), m  # no NaN/inf (logged as null)
        assert m["train/lr"] > 0 and m["perf/fwd_bwd_time"] > 0
        if recipe != "grpo":  # the GRPO surrogate can be negative
            assert m["train/loss"] >= 0

    # The evaluation hook (eval_dataset is set by default) runs before the first step and at the end: the first
    # and the last line.
    key = EVAL_METRIC[recipe]
    evals = [m for m in metrics if key in m]
    assert [m["step"] for m in evals] == [0, STEPS] and metrics[0] is evals[0] and metrics[-1] is evals[-1]
    assert all(0.0 <= m[key] <= 1.0 for m in evals)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["final_metrics"][key] == evals[-1][key]
    if recipe == "grpo":
        # The warm start really was used: announced, and cached where later runs find it.
        assert "warm start warmstart:arith" in result.stderr
        root = Path(os.environ["COOKBOOK_PLATFORM_ROOT"]) / "warmstart"
        assert any((d / "config.json").exists() for d in root.glob("local-tiny-arith-*"))


def test_sweep_of_two_real_sft_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", "+recipe=sft", "max_steps=2", "recipe.batch_size=4", "recipe.eval_dataset=null",
                     "recipe.warmup_steps=0", "recipe.lr_schedule=constant", "recipe.learning_rate=1e-3,3e-3",
                     f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    jobs = sorted(d for d in sweep_dir.iterdir() if d.is_dir() and d.name[0].isdigit())
    assert [d.name.split("_")[0] for d in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        metrics = check_finished_run(job, "sft", 2)
        lrs.append(metrics[0]["train/lr"])
        assert (job / ".hydra" / "overrides.yaml").exists()
    assert lrs == [1e-3, 3e-3]
    assert (sweep_dir / "summary.md").exists()


@pytest.mark.parametrize("name, where", [
    ("malformed_json.jsonl", "malformed_json.jsonl:3:"),
    ("missing_messages.jsonl", "missing_messages.jsonl:2:"),
    ("wrong_role.jsonl", "wrong_role.jsonl:3:"),
    ("empty.jsonl", "empty.jsonl"),
    ("all_too_long.jsonl", "all_too_long.jsonl"),
])
def test_bad_data_exits_2_naming_the_file_and_line(name, where, tmp_path):
    # eval_dataset=null: no deployment to start, so the (post-start) data error comes sooner.
    run_dir = tmp_path / "run"
    result = run_cli("+recipe=sft", "max_steps=1", "recipe.eval_dataset=null", f"recipe.dataset={BAD / name}",
                     f"log_path={run_dir}", timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and where in errors[0] and "Fix:" in errors[0], result.stderr[-2000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("DataError: ")
    assert not (run_dir / "checkpoints.jsonl").exists()
