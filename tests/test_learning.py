"""Learning proofs: each recipe learns its toy task on the embedded default (local-tiny), within a time budget.

    pytest -m learning tests/test_learning.py        # ~6-10 minutes on 2 CPU cores
    python scripts/learning_curves.py                # the same runs, printing the curves

Every proof is a real seeded CLI run (`python -m cookbook.train`) with the recipe's defaults, except where an
override below says otherwise (and why). Pass criteria (the issue's):

- SFT: held-out exact match >= 0.9 (greedy completions from the deployment), within 3 minutes.
- GRPO: mean rollout reward of the last 5 steps >= that of the first 5 steps + 0.3, within 5 minutes, starting
  from the default SFT warm start (`recipe.init_from=warmstart:arith`, built once and cached; timed on its own).
- DPO, ORPO: held-out preference accuracy >= 0.9 (`eval/preference_accuracy`).

Time budgets are asserted on the run's own wall time (`status.json`: from config to final checkpoint, platform
start-up included). They can be scaled for a slower machine with COOKBOOK_LEARNING_BUDGET_SCALE (e.g. 2).

Threads: the runs use OMP_NUM_THREADS=1 (inherited by the trainer and the deployment). On a 2-core machine that
other work shares, torch's default of one intra-op thread per core makes each fwd/bwd wait for a thread that has
no core (measured: 3.0 s vs 0.86 s per step of the same model under load); with one thread per process the trainer,
deployment and driver spread over the cores instead. Set COOKBOOK_LEARNING_THREADS=0 to use torch's default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("COOKBOOK_LEARNING_BUDGET_SCALE", "1"))

# name -> (overrides, budget in seconds). Overrides beyond `+recipe=...` and the seed are explained inline.
PROOFS: dict[str, tuple[list[str], float]] = {
    # Defaults: lr 3e-3, batch 64, 16 epochs of the 2000-row addition table (512 steps).
    "sft": (["+recipe=sft", "recipe.eval_interval=128"], 180),
    # Defaults otherwise: warm start, batch 16 prompts x 8 completions, num_loss_tokens normalization.
    # lr 5e-4 (default 3e-4 gains only ~+0.26 in 165 steps; 1e-3 collapses the reward after one step).
    # epochs=32: refills of uninformative groups draw extra prompts, so 16 epochs can end before step 150.
    "grpo": (["+recipe=grpo", "max_steps=150", "recipe.epochs=32", "recipe.learning_rate=5e-4",
              "recipe.eval_interval=50"], 300),
    # From random init DPO plateaus near 0.8 (0.80 after the default 100 steps; lr 3e-3 overfits at ~0.7): the
    # eval pairs' rejected answers are new, and pushing the training rejects down does not transfer. Starting from
    # the SFT warm start (the usual SFT -> DPO pipeline), beta 0.3 with a cosine-decayed lr 5e-4 over 8 epochs
    # ends at 0.92; all 100 held-out pairs are scored.
    "dpo": (["+recipe=dpo", "recipe.init_from=warmstart:arith", "recipe.beta=0.3", "recipe.learning_rate=5e-4",
             "recipe.lr_schedule=cosine", "recipe.epochs=8", "recipe.max_eval_rows=100",
             "recipe.eval_interval=25"], 180),
    # Defaults reach 0.906 at the default 4 epochs (100 steps), just over the line; 8 epochs end at ~0.94.
    "orpo": (["+recipe=orpo", "recipe.epochs=8", "recipe.eval_interval=25"], 180),
}
WARMSTART_BUDGET = 180


@dataclass
class Run:
    name: str
    returncode: int
    wall_s: float  # the run's own wall time (status.json)
    process_s: float  # the whole subprocess, Python start-up included
    status: dict[str, Any]
    metrics: list[dict[str, Any]]
    output: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(m["step"], m[key]) for m in self.metrics if m.get(key) is not None]

    @property
    def final(self) -> dict[str, Any]:
        return self.status.get("final_metrics", {})


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
         "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    e.setdefault("COOKBOOK_PLATFORM_ROOT", str(REPO / ".test-platform"))
    threads = os.environ.get("COOKBOOK_LEARNING_THREADS", "1")
    if threads != "0":
        e["OMP_NUM_THREADS"] = threads
    return e


def run_proof(name: str, run_dir: Path, seed: int = 0, extra: list[str] | None = None) -> Run:
    overrides, _ = PROOFS[name]
    args = [*overrides, f"seed={seed}", f"log_path={run_dir}", *(extra or [])]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cookbook.train", *args], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=1800)
    process_s = time.perf_counter() - started
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return Run(name, result.returncode, float(status.get("wall_time_s", process_s)), process_s, status, metrics,
               result.stdout[-3000:] + result.stderr[-5000:])


def build_warmstart() -> float:
    """Build (or find) the cached GRPO warm start; returns the seconds it took (0 when it was cached)."""
    probe = ("import sys, time; from cookbook.warmstart import warmstart_dir, ensure_warmstart\n"
             "d = warmstart_dir('local-tiny', 'arith'); cached = (d / 'config.json').exists()\n"
             "t = time.perf_counter(); ensure_warmstart('local-tiny', 'arith')\n"
             "print(0.0 if cached else time.perf_counter() - t)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-5000:]
    return float(result.stdout.strip().splitlines()[-1])


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def grpo_reward_gain(run: Run, window: int = 5) -> tuple[float, float]:
    rewards = [r for _, r in run.series("rollout/reward")]
    return mean(rewards[:window]), mean(rewards[-window:])


def check_budget(run: Run, budget: float) -> None:
    assert run.wall_s <= budget * SCALE, f"{run.name}: {run.wall_s:.0f}s > budget {budget * SCALE:.0f}s"


pytestmark = pytest.mark.learning


def _ok(run: Run) -> None:
    assert run.returncode == 0 and run.status.get("status") == "ok", run.output


def test_sft_reaches_exact_match_0_9(tmp_path):
    run = run_proof("sft", tmp_path / "sft")
    _ok(run)
    curve = run.series("eval/exact_match")
    assert curve[-1][1] >= 0.9, f"held-out exact match curve {curve}"
    assert run.final["eval/exact_match"] >= 0.9 and curve[0][1] < 0.5  # it learned: it did not start there
    losses = run.series("train/loss")
    assert losses[-1][1] < losses[0][1] / 10
    check_budget(run, PROOFS["sft"][1])


def test_grpo_improves_mean_reward_by_0_3_over_the_warm_start(tmp_path):
    warmstart_s = build_warmstart()
    assert warmstart_s <= WARMSTART_BUDGET * SCALE
    run = run_proof("grpo", tmp_path / "grpo")
    _ok(run)
    first, last = grpo_reward_gain(run)
    assert last >= first + 0.3, f"reward first 5 steps {first:.3f}, last 5 {last:.3f}: {run.series('rollout/reward')}"
    assert run.final["steps"] == 150
    check_budget(run, PROOFS["grpo"][1])


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_preference_recipes_reach_accuracy_0_9(name, tmp_path):
    if name == "dpo":
        build_warmstart()
    run = run_proof(name, tmp_path / name)
    _ok(run)
    curve = run.series("eval/preference_accuracy")
    assert curve[-1][1] >= 0.9, f"held-out preference accuracy curve {curve}"
    assert run.final["eval/preference_accuracy"] >= 0.9
    check_budget(run, PROOFS[name][1])
