"""Local supervised training against Hugging Face TRL on the same machine, side by side (not a test).

For SFT (and DPO with `--recipes sft dpo`) on local-tiny and local-small, alternating runs of

  - cookbook: `python -m cookbook.train +recipe=<r> infra=<model> max_steps=N recipe.eval_dataset=null` as a user
    launches it (its defaults: the trainer gets the whole machine);
  - TRL: `SFTTrainer` / `DPOTrainer` in a fresh process on the same weights (`save_pretrained` of the embedded model),
    the same rendered rows (token for token: the cookbook's renderer, assistant-token labels), batch, learning rate,
    AdamW betas/eps, clipping, and torch's default threads (the whole machine);

and prints medians of: steps/s after the first step, launch -> first optimizer step done, launch -> exit, and the
ratios (goals: steps/s ratio >= 1.0; cookbook's first step <= 3 s on local-tiny and <= TRL's).

Times are read from outside: the cookbook's step N is done when its metrics.jsonl row N appears (polled every 2 ms);
TRL's worker reports wall-clock times from a step-end callback. TRL is not a dependency of the project:
`pip install -e '.[bench]'`.

    python scripts/bench_vs_trl.py [--recipes sft dpo] [--models local-tiny local-small] [--steps 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
RECIPE_DATA = {"sft": "bundled:sft_arith_train", "dpo": "bundled:pref_train"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COOKBOOK_TORCH_THREADS"}  # the product's default threads
    return {**env, "WANDB_MODE": "disabled", "TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def _watch_steps(metrics: Path, steps: int, proc: subprocess.Popen, times: dict[int, float]) -> None:
    """Record when metrics rows 1 and `steps` appear (wall clock), polling the file until the process exits.

    Reads only the bytes appended since the last poll: re-reading the whole file every 2 ms costs a growing share of
    a core (~10 % by step 250) that the run being measured would otherwise have."""
    seen, pending, handle = 0, "", None
    try:
        while True:
            running = proc.poll() is None
            if handle is None and metrics.exists():
                handle = metrics.open()
            pending += handle.read() if handle else ""
            now = time.time()
            *rows, pending = pending.split("\n")  # the last piece is a row still being written (or "")
            for row in rows:
                seen += 1
                step = json.loads(row).get("step")
                if step in (1, steps) and step not in times:
                    times[step] = now
            if not running and (seen >= steps or handle is None or not rows):
                return
            time.sleep(0.002)
    finally:
        if handle:
            handle.close()


def run_cookbook(recipe: str, model: str, steps: int, workdir: Path) -> dict[str, float]:
    log_path = workdir / f"cookbook-{recipe}-{model}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "cookbook.train", f"+recipe={recipe}", f"infra={model}", f"max_steps={steps}",
           "recipe.eval_dataset=null", f"log_path={log_path}", "wandb.mode=disabled"]
    times: dict[int, float] = {}
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watcher = threading.Thread(target=_watch_steps, args=(log_path / "metrics.jsonl", steps, proc, times))
    watcher.start()
    _, err = proc.communicate()
    exited = time.time()
    watcher.join()
    if proc.returncode != 0 or 1 not in times or steps not in times:
        raise RuntimeError(f"cookbook run failed (exit {proc.returncode}):\n{err[-3000:]}")
    return {"first_step_s": times[1] - launched, "steps_per_s": (steps - 1) / (times[steps] - times[1]),
            "exit_s": exited - launched}


def run_trl(recipe: str, model_dir: Path, steps: int, workdir: Path) -> dict[str, float]:
    out = workdir / f"trl-{recipe}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--trl-worker", recipe, str(model_dir), str(steps), str(out)]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    exited = time.time()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"TRL run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    times = {int(k): v for k, v in json.loads(out.read_text()).items()}
    return {"first_step_s": times[1] - launched, "steps_per_s": (steps - 1) / (times[steps] - times[1]),
            "exit_s": exited - launched}


# ------------------------------------------------------------------------------------------------ TRL worker
def trl_worker(recipe: str, model_dir: str, steps: int, out: str) -> None:
    """One TRL run in this process; writes {step: wall time} for steps 1 and `steps` to `out`."""
    import transformers
    from datasets import Dataset

    from cookbook import models
    from cookbook.config import DPOConfig, SFTConfig
    from cookbook.datasets.load import load_dataset

    tokenizer = models.load_tokenizer("local-tiny")  # every embedded model shares the byte-level tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    times: dict[int, float] = {}

    class StepTimes(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (1, steps):
                times[state.global_step] = time.time()

    cfg = SFTConfig() if recipe == "sft" else DPOConfig()
    common = dict(output_dir=str(Path(out).with_suffix("")), per_device_train_batch_size=BATCH, max_steps=steps,
                  learning_rate=cfg.learning_rate, lr_scheduler_type="constant", adam_beta1=cfg.beta1,
                  adam_beta2=cfg.beta2, adam_epsilon=cfg.eps, weight_decay=cfg.weight_decay,
                  max_grad_norm=cfg.grad_clip_norm, logging_steps=10**6, save_strategy="no", report_to="none",
                  use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    if recipe == "sft":
        from trl import SFTConfig as TRLSFTConfig, SFTTrainer

        data = load_dataset(RECIPE_DATA["sft"], "sft", tokenizer, 10**6)
        rows = []
        for datum in data.items:  # inputs + last target = the sequence; a label wherever the weight is > 0
            tokens = datum.model_input.to_ints()
            targets = datum.loss_fn_inputs["target_tokens"].to_torch().tolist()
            weights = datum.loss_fn_inputs["weights"].to_torch().tolist()
            labels = [-100] + [t if w > 0 else -100 for t, w in zip(targets, weights)]
            rows.append({"input_ids": tokens + targets[-1:], "labels": labels})
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                             args=TRLSFTConfig(**common), callbacks=[StepTimes()])
    else:
        from trl import DPOConfig as TRLDPOConfig, DPOTrainer

        from cookbook.datasets.preferences import SkipRow, normalize_preference_row

        rows = []
        for n, line in enumerate(Path(models.__file__).parent.joinpath("datasets/bundled/pref_train.jsonl").open()):
            try:
                chosen, rejected = normalize_preference_row(json.loads(line), f"pref_train.jsonl:{n + 1}")
            except SkipRow:
                continue
            prompt = tokenizer.apply_chat_template(chosen[:-1], tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": prompt, "chosen": chosen[-1]["content"] + "<|im_end|>",
                         "rejected": rejected[-1]["content"] + "<|im_end|>"})
        trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                             args=TRLDPOConfig(**common, beta=cfg.beta), callbacks=[StepTimes()])
    trainer.train()
    Path(out).write_text(json.dumps(times))


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    if sys.argv[1:2] == ["--trl-worker"]:
        recipe, model_dir, steps, out = sys.argv[2:6]
        trl_worker(recipe, model_dir, int(steps), out)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["sft"], choices=sorted(RECIPE_DATA))
    p.add_argument("--models", nargs="+", default=["local-tiny", "local-small"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    from cookbook import models

    med = statistics.median
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        workdir = Path(tmp)
        for model in args.models:
            model_dir = workdir / model
            models.load_model(model, seed=0).save_pretrained(model_dir)
            for recipe in args.recipes:
                ours, theirs = [], []
                for rep in range(args.reps):  # alternate, so a noisy neighbour hits both alike
                    ours.append(run_cookbook(recipe, model, args.steps, workdir))
                    theirs.append(run_trl(recipe, model_dir, args.steps, workdir))
                    print(f"  {recipe} {model} rep {rep}: cookbook {ours[-1]}  TRL {theirs[-1]}", flush=True)
                m = {side: {k: med(r[k] for r in runs) for k in runs[0]} for side, runs in
                     (("cookbook", ours), ("trl", theirs))}
                rows.append((recipe, model, m))
    print(f"\n{args.steps} steps, batch {BATCH}, median of {args.reps} alternating runs, "
          f"{os.cpu_count()} CPUs\n")
    print("| recipe | model | cookbook steps/s | TRL steps/s | ratio (goal >= 1.0) | cookbook first step | "
          "TRL first step | cookbook exit | TRL exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe, model, m in rows:
        c, t = m["cookbook"], m["trl"]
        print(f"| {recipe} | {model} | {c['steps_per_s']:.2f} | {t['steps_per_s']:.2f} | "
              f"{c['steps_per_s'] / t['steps_per_s']:.2f} | {c['first_step_s']:.2f} s | {t['first_step_s']:.2f} s | "
              f"{c['exit_s']:.2f} s | {t['exit_s']:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
