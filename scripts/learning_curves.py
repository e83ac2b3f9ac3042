"""Learning proofs: each recipe's defaults on the bundled addition task, held-out metrics at step 0 and at the end.

    python scripts/learning_curves.py                          # 4 recipes x seeds 0 1 2, scored on the eval split
    python scripts/learning_curves.py sft grpo --seeds 0 --out runs/curves
    python scripts/learning_curves.py --split val              # what the defaults were chosen on
    python scripts/learning_curves.py dpo --split val -- recipe.beta=0.2 recipe.eval_interval=25   # try a setting

`pytest -m learning` (tests/test_learning.py) runs the same proofs and asserts `CRITERIA`; this script prints the
table (step 0 vs end per recipe and seed, with wall times) and the verdicts. Run directories are kept under --out
(default: a temporary directory), so `python -m cookbook.report <dir>` can plot them afterwards.

What a seed changes. `seed=S` sets the data order and every sampling seed of a run. The embedded model's random
init does not follow the run's seed (a base model is a fixed artifact: a delta checkpoint or a resume must find the
same base weights), so for the recipes that start from random init (SFT, DPO, ORPO) each seed also starts from its
own init: local-tiny's architecture initialized with seed S, saved as a model directory and passed as
`recipe.init_from` (seed 0's directory holds exactly the weights of `local-tiny` itself). GRPO starts from its
default warm start (`warmstart:arith`), one shared artifact built from training prompts only, like the SFT
checkpoint an RL run begins from; its seeds vary the prompt order and every rollout.

Runs of one recipe go in parallel (`--jobs`, default 3): each run keeps about one core busy at a time (trainer,
deployment and driver take turns), so on 2 cores three runs finish sooner than three in a row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("sft", "grpo", "dpo", "orpo")
SEEDS = (0, 1, 2)
BASE_MODEL = "local-tiny"
# Validation twin of each recipe's default eval set (scripts/make_toy_data.py): where the defaults were chosen.
VAL_SETS = {"sft": "bundled:sft_arith_val", "grpo": "bundled:grpo_arith_val", "dpo": "bundled:pref_val",
            "orpo": "bundled:pref_val"}
RANDOM_INIT = {"sft", "dpo", "orpo"}  # recipes whose default start is the base model itself


@dataclass(frozen=True)
class Criterion:
    text: str
    check: Callable[[float, float], bool]  # (value at step 0, value at the end) -> passed
    metric: str


# The pass criteria, per recipe; a proof passes only if every seed passes all of its recipe's criteria.
CRITERIA: dict[str, list[Criterion]] = {
    "sft": [Criterion("end >= 0.85", lambda s, e: e >= 0.85, "eval/exact_match"),
            Criterion("end >= step 0 + 0.6", lambda s, e: e >= s + 0.6, "eval/exact_match")],
    "grpo": [Criterion("end >= step 0 + 0.10", lambda s, e: e >= s + 0.10, "eval/exact_match"),
             Criterion("end > step 0", lambda s, e: e > s, "eval/reward")],
    "dpo": [Criterion("end >= 0.85", lambda s, e: e >= 0.85, "eval/preference_accuracy"),
            Criterion("end >= step 0 + 0.2", lambda s, e: e >= s + 0.2, "eval/preference_accuracy")],
}
CRITERIA["orpo"] = CRITERIA["dpo"]


@dataclass
class Run:
    recipe: str
    seed: int
    path: Path
    returncode: int
    wall_s: float  # the whole subprocess: Python start-up, platform, training, evaluations, final checkpoint
    status: dict[str, Any]
    metrics: list[dict[str, Any]]
    output: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status.get("status") == "ok"

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(m["step"], m[key]) for m in self.metrics if isinstance(m.get(key), (int, float))]

    def start_end(self, key: str) -> tuple[Optional[float], Optional[float]]:
        """The value logged at step 0 (before any update) and the last one logged (the end of the run)."""
        points = self.series(key)
        start = next((v for s, v in points if s == 0), None)
        return start, (points[-1][1] if points and points[-1][0] > 0 else None)

    @property
    def steps(self) -> int:
        return int(self.status.get("final_metrics", {}).get("steps", 0))


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
         "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    e.setdefault("COOKBOOK_PLATFORM_ROOT", str(ROOT / ".test-platform"))
    # Runs go in parallel (--jobs): one torch thread per trainer and deployment, not every core for each.
    e.setdefault("COOKBOOK_TORCH_THREADS", "1")
    return e


def init_dir(out: Path, seed: int) -> Path:
    """local-tiny's architecture initialized with `seed`, as a model directory (written once)."""
    path = out / "init" / f"{BASE_MODEL}-seed{seed}"
    if not (path / "config.json").exists():
        code = ("import sys; from cookbook.models import load_model, build_tokenizer, save_model_dir\n"
                f"save_model_dir(load_model({BASE_MODEL!r}, seed={seed}), build_tokenizer(), sys.argv[1])\n")
        subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env(), check=True,
                       capture_output=True, timeout=300)
    return path


def overrides(recipe: str, seed: int, out: Path, split: str) -> list[str]:
    args = [f"+recipe={recipe}", f"seed={seed}"]
    if recipe in RANDOM_INIT:
        args.append(f"recipe.init_from={init_dir(out, seed)}")
    if split == "val":
        args.append(f"recipe.eval_dataset={VAL_SETS[recipe]}")
    return args


def run_one(recipe: str, seed: int, out: Path, split: str = "eval", extra: Optional[list[str]] = None) -> Run:
    path = out / f"{recipe}-seed{seed}"
    shutil.rmtree(path, ignore_errors=True)  # a fresh run: an existing directory would resume instead
    args = [*overrides(recipe, seed, out, split), f"log_path={path}", *(extra or [])]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cookbook.train", *args], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    status = json.loads((path / "status.json").read_text()) if (path / "status.json").exists() else {}
    metrics_path = path / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    run = Run(recipe, seed, path, result.returncode, wall, status, metrics,
              result.stdout[-3000:] + result.stderr[-5000:])
    run.failures = verdict(run)
    return run


def verdict(run: Run) -> list[str]:
    """The criteria this run fails (empty: it passes)."""
    if not run.ok:
        return [f"the run failed (exit {run.returncode}, status {run.status.get('status')})"]
    failures = []
    for c in CRITERIA[run.recipe]:
        start, end = run.start_end(c.metric)
        if start is None or end is None:
            failures.append(f"{c.metric}: no value at step 0 and at the end")
        elif not c.check(start, end):
            failures.append(f"{c.metric}: {c.text} failed (step 0 {start:.3f}, end {end:.3f})")
    return failures


def build_warmstart() -> float:
    """Build (or find) GRPO's default warm start before its runs start in parallel; seconds taken (0: cached)."""
    probe = ("import time; from cookbook.runs.warmstart import warmstart_dir, ensure_warmstart\n"
             f"cached = (warmstart_dir({BASE_MODEL!r}, 'arith') / 'config.json').exists()\n"
             f"t = time.perf_counter(); ensure_warmstart({BASE_MODEL!r}, 'arith')\n"
             "print(0.0 if cached else time.perf_counter() - t)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"building the warm start failed:\n{result.stderr[-5000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def run_recipe(recipe: str, seeds: tuple[int, ...], out: Path, split: str = "eval", jobs: int = 3,
               extra: Optional[list[str]] = None) -> list[Run]:
    for seed in seeds if recipe in RANDOM_INIT else ():
        init_dir(out, seed)  # before the parallel runs: one writer per directory
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda s: run_one(recipe, s, out, split, extra), seeds))


def table(runs: list[Run]) -> str:
    """Markdown: one row per recipe, seed and held-out metric; step 0 vs end, steps and the run's wall time."""
    lines = ["| recipe | seed | held-out metric | step 0 | end | change | steps | wall | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for metric in dict.fromkeys(c.metric for c in CRITERIA[run.recipe]):
            start, end = run.start_end(metric)
            fmt = (lambda v: "-" if v is None else f"{v:.3f}")
            change = "-" if start is None or end is None else f"{end - start:+.3f}"
            lines.append(f"| {run.recipe} | {run.seed} | {metric} | {fmt(start)} | {fmt(end)} | {change} | "
                         f"{run.steps} | {run.wall_s:.0f} s | {'pass' if not run.failures else 'FAIL'} |")
    return "\n".join(lines)


def curves(run: Run) -> str:
    keys = [c.metric for c in CRITERIA[run.recipe]] + ["rollout/reward"] * (run.recipe == "grpo")
    parts = []
    for key in dict.fromkeys(keys):
        points = run.series(key)
        every = max(1, len(points) // 12)
        shown = [p for i, p in enumerate(points) if i % every == 0 or i == len(points) - 1]
        parts.append(f"  {key}: " + " ".join(f"{s}:{v:.3f}" for s, v in shown))
    return "\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--split", choices=("eval", "val"), default="eval",
                   help="held-out set to score: eval (the proofs) or val (choosing defaults)")
    p.add_argument("--jobs", type=int, default=3, help="runs of one recipe in parallel")
    p.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_args(argv[:cut]), argv[cut + 1:]  # after --: extra overrides for every run
    out = args.out or Path(tempfile.mkdtemp(prefix="learning-curves-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: list[Run] = []
    for recipe in args.recipes:
        if recipe == "grpo" and not any(o.startswith("recipe.init_from=") for o in extra):
            took = build_warmstart()
            print(f"[grpo] warm start: {'cached' if took == 0 else f'built in {took:.0f} s'}", flush=True)
        group_started = time.perf_counter()
        group = run_recipe(recipe, tuple(args.seeds), out, args.split, args.jobs, extra)
        print(f"[{recipe}] {len(group)} runs in {time.perf_counter() - group_started:.0f} s", flush=True)
        for run in group:
            print(f"[{recipe} seed {run.seed}] {'pass' if not run.failures else 'FAIL: ' + '; '.join(run.failures)}"
                  f"  ({run.path})\n{curves(run)}", flush=True)
            if not run.ok:
                print(run.output)
        runs += group
    print(f"\n{table(runs)}\n\nall runs: {time.perf_counter() - started:.0f} s")
    return 1 if any(r.failures for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
