"""The learning proofs' verdicts (scripts/learning_curves.py), on made-up runs: per seed, and over the seeds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("learning_curves", REPO / "scripts" / "learning_curves.py")
lc = importlib.util.module_from_spec(_spec)
sys.modules["learning_curves"] = lc  # dataclasses look their module up there
_spec.loader.exec_module(lc)


def grpo_run(seed: int, exact: tuple[float, float], reward: tuple[float, float] = (0.4, 0.5)):
    metrics = [{"step": 0, "eval/exact_match": exact[0], "eval/reward": reward[0]},
               {"step": 100, "eval/exact_match": exact[1], "eval/reward": reward[1]}]
    return lc.Run("grpo", seed, Path("."), 0, 1.0, {"status": "ok"}, metrics)


def test_a_grpo_seed_passes_when_exact_match_and_reward_both_rise():
    assert lc.verdict(grpo_run(0, (0.579, 0.590))) == []
    [failure] = lc.verdict(grpo_run(0, (0.579, 0.579)))
    assert "eval/exact_match" in failure and "0.579" in failure
    [failure] = lc.verdict(grpo_run(0, (0.579, 0.700), reward=(0.4, 0.4)))
    assert "eval/reward" in failure


def test_grpo_seeds_together_need_a_mean_gain_of_0_10():
    # gains 0.04, 0.10, 0.17: every seed passes alone, the mean gain is 0.103
    runs = [grpo_run(0, (0.579, 0.619)), grpo_run(1, (0.579, 0.679)), grpo_run(2, (0.579, 0.749))]
    assert [lc.verdict(r) for r in runs] == [[], [], []] and lc.seed_mean_verdict(runs) == []
    runs[2] = grpo_run(2, (0.579, 0.729))  # mean gain 0.097
    [failure] = lc.seed_mean_verdict(runs)
    assert "mean over seeds" in failure and "0.579" in failure and "0.676" in failure


def test_recipes_without_a_criterion_over_seeds_pass_it():
    run = lc.Run("sft", 0, Path("."), 0, 1.0, {"status": "ok"},
                 [{"step": 0, "eval/exact_match": 0.0}, {"step": 100, "eval/exact_match": 0.2}])
    assert lc.seed_mean_verdict([run]) == [] and lc.verdict(run) != []
