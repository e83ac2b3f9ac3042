"""Where a GRPO step's time goes, on the embedded platform, with the default recipe.

    python scripts/bench_rl_step.py [--models local-tiny local-small] [--steps 20]

Runs `python -m cookbook.train +recipe=grpo` (no evaluation) for each model as a user would and reads the run's own
`perf/*` metrics from metrics.jsonl: rollout (sampling the groups from the deployment), forward_backward,
optim_step, weight sync (trainer export + hot load; `perf/weight_sync_save_time` and `..._load_time` split it) and
the whole step. Medians over the steps after the first (warm-up). Goals (issue 13, P6): model compute (rollout +
forward_backward + optim_step) >= 0.8 of the step, weight sync <= 0.10. local-small has no warm start: it trains
from the base model (`recipe.init_from=null`), where exact match is 0 for every sample (no group would be kept and
nothing trained), so it is rewarded for the fraction of digits in a completion (`digit_fraction` below): the step's
shape is the default recipe's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("rollout", "fwd_bwd", "optim_step", "weight_sync")


def run(model: str, steps: int, root: Path) -> list[dict]:
    log_path = root / model
    overrides = ["+recipe=grpo", f"max_steps={steps}", "recipe.eval_dataset=null", f"log_path={log_path}"]
    if model != "local-tiny":
        overrides += [f"infra={model}", "recipe.init_from=null", "recipe.reward_fn=bench_rl_step:digit_fraction"]
    started = time.perf_counter()
    # Run from scripts/ so that this module is importable as the reward function's module.
    proc = subprocess.run([sys.executable, "-m", "cookbook.train", *overrides], cwd=Path(__file__).parent, text=True,
                          capture_output=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        sys.exit(f"{model}: the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"{model}: {steps} steps in {time.perf_counter() - started:.1f} s (launch to exit)", file=sys.stderr)
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/step_time" in r and r.get("step", 0) > 1]


def digit_fraction(completion_text: str, row: dict) -> float:
    return sum(c.isdigit() for c in completion_text) / max(len(completion_text), 1)


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["local-tiny", "local-small"])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    table = []
    with tempfile.TemporaryDirectory() as root:
        for model in args.models:
            rows = run(model, args.steps, Path(root))
            synced = [r for r in rows if "perf/weight_sync_time" in r]  # the last step has no sync
            step = median(synced, "perf/step_time")
            parts = {p: median(synced, f"perf/{p}_time") for p in PARTS}
            save, load = median(synced, "perf/weight_sync_save_time"), median(synced, "perf/weight_sync_load_time")
            table.append((model, step, parts, save, load))
    print("| model | step s | rollout | fwd_bwd | optim | weight sync (save + load) | other | compute share "
          "(goal >= 0.8) | sync share (goal <= 0.10) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, step, parts, save, load in table:
        compute = parts["rollout"] + parts["fwd_bwd"] + parts["optim_step"]
        other = step - compute - parts["weight_sync"]
        print(f"| {model} | {step:.3f} | {parts['rollout']:.3f} | {parts['fwd_bwd']:.3f} | {parts['optim_step']:.3f} "
              f"| {parts['weight_sync']:.3f} ({save:.3f} + {load:.3f}) | {other:.3f} | {compute / step:.2f} "
              f"| {parts['weight_sync'] / step:.3f} |")


if __name__ == "__main__":
    main()
