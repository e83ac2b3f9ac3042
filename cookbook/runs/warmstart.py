"""`recipe.init_from`: where a run's starting weights come from.

- null: the base model as the infra option names it.
- a directory holding an HF model (`config.json`): trainer and deployment both load it as their base model.
- `<run_dir>:<checkpoint>`: the weights of another run's checkpoint (weights only; fresh optimizer, position 0).
- `warmstart:<task>`: a model made by this project's own SFT recipe on a bundled task, built deterministically on
  first use and cached under the platform storage root (`scripts/learning_curves.py grpo` builds it up front).
  Only the embedded models have one; for other base models it is skipped with a notice. The default GRPO run uses
  `warmstart:arith` because a byte-vocabulary model from random init almost never earns a reward on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cookbook.errors import UserError

# SFT settings per warm-start task, all pinned here (not inherited from the SFT defaults, which may change). The
# data is the training split only: the bundled val/eval prompts never reach a warm start (tests/test_data.py).
# Short on purpose, so the policy is right only part of the time and RL has something left to learn: 250 steps at a
# constant 1e-3 stop in the middle of SFT's climb (held-out exact match ~0.6 on bundled:sft_arith_val, against ~1.0
# after the full SFT recipe), where the climb is gradual, so small numeric differences move it little.
WARMSTART_TASKS = {
    "arith": ["recipe.dataset=bundled:sft_arith_train", "recipe.eval_dataset=null", "recipe.batch_size=64",
              "recipe.learning_rate=1e-3", "recipe.lr_schedule=constant", "recipe.warmup_steps=0",
              "recipe.grad_clip_norm=1.0", "recipe.epochs=2", "max_steps=250"],
}


@dataclass
class InitPlan:
    base_model: str  # what the launcher provisions (trainer + deployment)
    state_path: Optional[str] = None  # a checkpoint whose weights the trainer loads before training
    note: Optional[str] = None


def plan_init(init_from: Optional[str], base_model: str) -> InitPlan:
    if not init_from:
        return InitPlan(base_model)
    if init_from.startswith("warmstart:"):
        from cookbook.models import is_embedded

        task = init_from.split(":", 1)[1]
        if task not in WARMSTART_TASKS:
            raise UserError(f"recipe.init_from={init_from}: unknown warm-start task '{task}'. Fix: use one of "
                            f"{', '.join('warmstart:' + t for t in WARMSTART_TASKS)}, a model directory, or null.")
        if not is_embedded(base_model):
            return InitPlan(base_model, note=f"{init_from} exists only for the embedded models; starting from "
                                             f"{base_model} as is")
        return InitPlan(str(ensure_warmstart(base_model, task)), note=f"warm start {init_from}")
    if Path(init_from).is_dir():
        if not (Path(init_from) / "config.json").exists():
            raise UserError(f"recipe.init_from={init_from} is a directory without config.json, so it is not an HF "
                            f"model directory. Fix: point it at a saved model (e.g. a promoted checkpoint).")
        return InitPlan(str(Path(init_from).resolve()), note=f"starting from model directory {init_from}")
    if ":" in init_from:
        from cookbook.checkpoints import read_index

        run_dir, name = init_from.rsplit(":", 1)
        matches = [r for r in read_index(run_dir) if r["name"] == name]
        if not matches:
            raise UserError(f"recipe.init_from={init_from}: no checkpoint '{name}' in {run_dir}/checkpoints.jsonl. "
                            f"Fix: list them with `python -m cookbook.checkpoints {run_dir}`.")
        return InitPlan(base_model, state_path=matches[-1]["state_path"], note=f"starting from {init_from}")
    raise UserError(f"recipe.init_from={init_from} is neither a model directory, <run_dir>:<checkpoint>, nor "
                    f"warmstart:<task>. Fix: use one of those forms, or null for the base model.")


def warmstart_dir(base_model: str, task: str) -> Path:
    """Cache location; the name carries a digest of the build settings, so changing them builds a new one."""
    import hashlib

    from cookbook.datasets.rows import resolve_dataset
    from cookbook.runs.rundir import storage_root

    settings = WARMSTART_TASKS[task]
    h = hashlib.sha1(" ".join([base_model, *settings]).encode())
    # The data's bytes too: regenerating the bundled files (another split, another task) must not reuse a warm
    # start trained on the old ones, which could include what is now held out.
    for spec in (o.split("=", 1)[1] for o in settings if o.startswith("recipe.dataset=")):
        h.update(resolve_dataset(spec).read_bytes())
    digest = h.hexdigest()[:8]
    return storage_root() / "warmstart" / f"{base_model}-{task}-{digest}"


def ensure_warmstart(base_model: str, task: str) -> Path:
    """The cached warm-start model, built with this project's SFT recipe the first time it is needed. It is one
    fixed artifact per (model, task) — built with seed 0 and one torch thread whatever the run's — like a shipped
    checkpoint: a run's seed varies its own data order and sampling, not the model it starts from (per-seed warm
    starts would cost a build per seed, and would test SFT's seed sensitivity, which the SFT proof already covers)."""
    target = warmstart_dir(base_model, task)
    if (target / "config.json").exists():
        return target
    work = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"[warmstart] building {target.name} with the SFT recipe (first use only) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "cookbook.train", "+recipe=sft", f"base_model={base_model}", "seed=0",
           f"log_path={work / 'run'}", f"recipe.output_model_id=warmstart-{os.getpid()}", *WARMSTART_TASKS[task]]
    # One torch thread whatever the machine or the caller's setting: thread counts change float sums in the last
    # bits, and over a few hundred steps that is a different model. (Another machine's BLAS can still differ in the
    # last bits, so the artifact is the same on one machine, not necessarily on every machine: README.)
    env = {**os.environ, "COOKBOOK_TORCH_THREADS": "1"}
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"building the warm start failed (exit {result.returncode}):\n{result.stdout[-3000:]}")
    from cookbook.runs.rundir import read_status

    promoted = Path((read_status(work / "run") or {}).get("final_metrics", {}).get("promoted_model", ""))
    if not (promoted / "config.json").exists():
        raise RuntimeError(f"the warm-start SFT run did not produce a model directory (got '{promoted}')")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(promoted, work / "model")
    try:
        os.replace(work / "model", target)  # atomic: a half-built warm start is never picked up
    except OSError:
        if not (target / "config.json").exists():  # not a parallel build that finished first
            raise
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(promoted, ignore_errors=True)
    return target
