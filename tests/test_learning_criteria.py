"""The learning proofs' verdicts (scripts/learning_curves.py), on made-up runs: per seed."""

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


def test_a_grpo_seed_passes_when_exact_match_gains_0_10_and_reward_rises():
    assert lc.verdict(grpo_run(0, (0.579, 0.679))) == []
    [failure] = lc.verdict(grpo_run(0, (0.579, 0.678)))
    assert "eval/exact_match" in failure and "0.579" in failure and "0.678" in failure
    [failure] = lc.verdict(grpo_run(0, (0.579, 0.800), reward=(0.4, 0.4)))
    assert "eval/reward" in failure


def test_a_failed_run_fails_its_verdict_whatever_its_metrics():
    run = grpo_run(0, (0.0, 1.0))
    run.returncode = 1
    [failure] = lc.verdict(run)
    assert "exit 1" in failure
