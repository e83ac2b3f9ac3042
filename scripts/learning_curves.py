"""Run the learning proofs (tests/test_learning.py) and print their curves, wall times and verdicts.

    python scripts/learning_curves.py                 # all four recipes, seed 0
    python scripts/learning_curves.py sft grpo --seed 1 --out runs/curves

Same runs, overrides and thresholds as `pytest -m learning`; this prints the numbers instead of asserting them.
Run directories are kept under --out (default: a temporary directory), so `python -m cookbook.report <dir>` can
plot them afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_learning import PROOFS, SCALE, WARMSTART_BUDGET, build_warmstart, grpo_reward_gain, run_proof  # noqa: E402


def fmt_curve(points: list[tuple[int, float]], every: int = 1) -> str:
    return " ".join(f"{s}:{v:.3f}" for i, (s, v) in enumerate(points) if i % every == 0 or i == len(points) - 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", default=list(PROOFS), choices=list(PROOFS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="learning-curves-"))
    failed = []
    for name in args.recipes:
        if any("warmstart:" in o for o in PROOFS[name][0]) or name == "grpo":
            w = build_warmstart()
            print(f"[{name}] warm start: {'cached' if w == 0 else f'built in {w:.0f}s'} (budget {WARMSTART_BUDGET}s)")
        run = run_proof(name, out / f"{name}-seed{args.seed}", seed=args.seed)
        budget = PROOFS[name][1] * SCALE
        if run.returncode != 0:
            print(f"[{name}] FAILED (exit {run.returncode})\n{run.output}")
            failed.append(name)
            continue
        steps = run.final.get("steps")
        print(f"[{name}] {steps} steps, run wall {run.wall_s:.0f}s (process {run.process_s:.0f}s, budget {budget:.0f}s)"
              f", {steps / max(run.wall_s, 1e-9):.2f} steps/s")
        loss = run.series("train/loss")
        if loss:
            print(f"  train/loss      first {loss[0][1]:.4f}  last {loss[-1][1]:.4f}")
        if name == "grpo":
            first, last = grpo_reward_gain(run)
            ok = last >= first + 0.3
            rewards = run.series("rollout/reward")
            print(f"  rollout/reward  first-5 mean {first:.3f}  last-5 mean {last:.3f}  gain {last - first:+.3f}"
                  f"  (need +0.300)")
            print(f"  reward curve    {fmt_curve(rewards, every=max(1, len(rewards) // 15))}")
            curve = run.series("eval/exact_match")
            print(f"  eval/exact_match {fmt_curve(curve)}")
        else:
            key = "eval/exact_match" if name == "sft" else "eval/preference_accuracy"
            curve = run.series(key)
            ok = bool(curve) and curve[-1][1] >= 0.9
            print(f"  {key} {fmt_curve(curve)}  (need >= 0.900)")
        ok = ok and run.wall_s <= budget
        print(f"  -> {'PASS' if ok else 'FAIL'}   run dir: {out / f'{name}-seed{args.seed}'}")
        if not ok:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
