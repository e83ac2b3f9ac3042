"""The skeleton every recipe shares, written once.

A recipe builds its data, then iterates `for batch in loop.steps():` and does only its algorithm inside the
loop body (forward/backward, `loop.optim_step()`, `loop.record(...)`). Around each step the loop handles what
every recipe needs in the same order: resume and the step-0 evaluation before the first step, then after each
optimizer step weight sync (per `weight_sync_interval`), DCP save (per `dcp_save_interval`), evaluation (per
`recipe.eval_interval`), metrics and the progress bar; `loop.finish()` runs the final evaluation, the final
(resumable + promotable) checkpoint and promotion.

Evaluation at step 0 and at the end uses the same held-out set and metric, so every run reports its own baseline:
a gain is measured against the model it started from, not against an earlier point of its own training.

Determinism for exact resume: the data order comes from the cursor (seeded per epoch) and every sampling seed is
derived from (seed, step), so step + cursor are the only state besides the trainer's weights and optimizer.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterator, Optional

import tinker
from tqdm import tqdm

from cookbook.checkpoints import Checkpointer, promote, read_index
from cookbook.client.session import Session
from cookbook.client.weight_sync import should_sync
from cookbook.config import RunConfig
from cookbook.datasets.cursor import Batch, DataCursor
from cookbook.runs.metrics import MetricsLogger
from cookbook.runs.rundir import read_jsonl

Evaluate = Callable[["TrainingLoop"], dict[str, float]]


class TrainingLoop:
    def __init__(self, run: RunConfig, session: Session, logger: MetricsLogger, cursor: DataCursor, *, recipe: str,
                 batch_size: int, evaluate: Optional[Evaluate] = None, sync_every_step: bool = False):
        self.run, self.cfg, self.session, self.logger = run, run.recipe, session, logger
        self.cursor, self.batch_size, self.evaluate, self.recipe = cursor, batch_size, evaluate, recipe
        # Recipes that sample every step (GRPO) keep the deployment in sync per weight_sync_interval; the others
        # only sync when an evaluation needs the current weights on the deployment.
        self.sync_every_step = sync_every_step
        self._deployment_step: Optional[int] = None
        self.checkpointer = Checkpointer(run, session.policy, recipe)
        point = self.checkpointer.resume(session.init_state_path)
        if point.cursor:
            cursor.load_state_dict(point.cursor)
        self.step = self.start_step = point.step
        self.resumed_from = point.source
        remaining = cursor.count_batches(batch_size)
        if run.max_steps is not None:
            remaining = max(0, min(remaining, run.max_steps - self.step))
        self.total_steps = self.step + remaining
        self.metrics: dict[str, Any] = {}
        self.epoch = cursor.epoch
        self._last_eval: Optional[tuple[int, dict[str, float]]] = None  # (step, metrics) of the latest evaluation
        self._prefetched: Optional[Batch] = None  # the next step's batch, handed out early (`prefetch_batch`)
        if point.source:
            tqdm.write(f"[{recipe}] resumed from {point.source} at step {self.step}")

    # ---------------------------------------------------------------------------------------------- optimizer
    def learning_rate(self, step: Optional[int] = None) -> float:
        """Warm-up then constant / linear / cosine decay to `min_lr_ratio` of the peak, over the run's steps."""
        cfg, step = self.cfg, self.step if step is None else step
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.learning_rate * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.learning_rate
        span = max(1, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 1 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)

    def optim_step(self) -> dict[str, float]:
        return self.submit_optim_step()()

    def submit_optim_step(self, step: Optional[int] = None) -> Callable[[], dict[str, float]]:
        """Send the optimizer step of `step` (default: this one; 0-based like `self.step`) now, behind whatever was
        sent before it; the returned function waits for it and gives its metrics."""
        cfg = self.cfg
        params = tinker.AdamParams(learning_rate=self.learning_rate(step), beta1=cfg.beta1, beta2=cfg.beta2,
                                   eps=cfg.eps, weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)
        pending = self.session.policy.submit_optim_step(params, grad_accumulation_normalization=cfg.normalization)

        def wait() -> dict[str, float]:
            started = time.perf_counter()  # the time the step adds after what was waited for before it
            result = pending.result()
            self.metrics["perf/optim_step_time"] = time.perf_counter() - started
            self.metrics["train/lr"] = params.learning_rate
            return {f"train/{k.split(':')[0]}": v for k, v in (getattr(result, "metrics", None) or {}).items()}
        return wait

    def sampling_seed(self, index: int) -> int:
        """A seed per (run seed, step, request): identical in a resumed run and an uninterrupted one."""
        return (self.run.seed * 1_000_003 + self.step * 10_007 + index) % (2**31 - 1)

    # ------------------------------------------------------------------------------------------------- steps
    def steps(self) -> Iterator[Batch]:
        """Yield one batch of row indices per optimizer step; everything after the step happens here."""
        if self.evaluate and self.step == 0:
            # The baseline, before any update (a resumed run past step 0 logged it in its first attempt).
            started = time.perf_counter()
            metrics = self.evaluate_now()
            self.logger.log({**metrics, "perf/eval_time": time.perf_counter() - started}, 0)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.recipe, unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
        try:
            while self.step < self.total_steps:
                batch, self._prefetched = self._prefetched or self.cursor.next_batch(self.batch_size), None
                if not batch.indices:
                    break
                self.epoch = batch.epoch
                self.metrics = {}
                started = time.perf_counter()
                yield batch
                self.step += 1
                self._after_step(started)
                bar.update(1)
        finally:
            bar.close()

    def prefetch_batch(self) -> Optional[Batch]:
        """The next step's batch, handed out early so a recipe can send the next step's work before this step's
        results are back (the trainer then never waits for the driver). Only when nothing happens on the trainer
        between the two steps — no weight sync, DCP save or evaluation after this one, and it is not the last — so
        a checkpoint's data position and weights are always those of its own step. None otherwise."""
        after = self.step + 1  # the step number this one ends with
        if self._prefetched is not None or after >= self.total_steps or self._trainer_work_after(after):
            return None
        batch = self.cursor.next_batch(self.batch_size)
        self._prefetched = batch if batch.indices else None
        return self._prefetched

    def _trainer_work_after(self, step: int) -> set[str]:
        """What the loop does on the trainer after optimizer step `step` (1-based), other than at the end."""
        ws = self.run.weight_sync
        if step >= self.total_steps:
            return set()  # the end: finish() does its own evaluation and checkpoint
        due = {"weight_sync": self.sync_every_step and should_sync(step, ws),
               "dcp_save": bool(ws.dcp_save_interval) and step % ws.dcp_save_interval == 0,
               "eval": bool(self.evaluate and self.cfg.eval_interval) and step % self.cfg.eval_interval == 0}
        return {name for name, is_due in due.items() if is_due}

    def record(self, metrics: dict[str, Any]) -> None:
        self.metrics.update(metrics)

    def timed(self, name: str) -> "_Timer":
        return _Timer(self.metrics, f"perf/{name}_time")

    def _after_step(self, started: float) -> None:
        m, due = self.metrics, self._trainer_work_after(self.step)
        if "weight_sync" in due:
            with self.timed("weight_sync"):
                self.sync_deployment(f"sync-{self.step}")  # not step-N: that is the final checkpoint's name
            timing = self.session.weight_syncer.last_timing  # the SDK's split: trainer export, then hot load (+ wait)
            m["perf/weight_sync_save_time"] = timing.get("save_time_s", 0.0)
            m["perf/weight_sync_load_time"] = timing.get("hotload_time_s", 0.0) + timing.get("warmup_time_s", 0.0)
        if "dcp_save" in due:
            with self.timed("dcp_save"):
                self.checkpointer.save(self.step, self.cursor.state_dict())
        if "eval" in due:
            with self.timed("eval"):
                m.update(self.evaluate_now())
        m["perf/step_time"] = time.perf_counter() - started
        m["train/epoch"] = self.epoch
        self.logger.log(m, self.step)

    def evaluate_now(self) -> dict[str, float]:
        """Held-out metrics of the current weights (computed once per step: the end of a run with no steps left is
        also its step 0)."""
        if self._last_eval is None or self._last_eval[0] != self.step:
            self._last_eval = (self.step, self.evaluate(self))
        return self._last_eval[1]

    # ----------------------------------------------------------------------------------------- weight sync
    def sync_deployment(self, name: str, checkpoint_type: Optional[str] = None) -> None:
        self.session.weight_syncer.save_and_hotload(name, checkpoint_type=checkpoint_type)
        self._deployment_step = self.step

    def sync_before_training(self) -> None:
        """Put the trainer's starting weights on the deployment when they differ from what it serves: always with
        `weight_sync_before_training`, and whenever the trainer loaded a checkpoint (a resume, or `init_from` a
        run's checkpoint). A warm start or model directory is the base model of both, so it needs no sync."""
        if self.session.weight_syncer is None:
            return
        if self.run.weight_sync.weight_sync_before_training or self.resumed_from or self.session.init_state_path:
            started = time.perf_counter()
            self.sync_deployment(f"start-{self.step}", checkpoint_type="base")
            tqdm.write(f"[{self.recipe}] synced starting weights to the deployment "
                       f"({time.perf_counter() - started:.2f}s)")
        else:
            self._deployment_step = self.step  # the deployment serves the base model, which is what the trainer has

    def ensure_deployment_current(self) -> None:
        """Evaluation samples from the deployment: make sure it serves the weights of the current step."""
        if self._deployment_step != self.step:
            self.sync_deployment(f"eval-{self.step}")

    # ------------------------------------------------------------------------------------------------ finish

    def finish(self) -> dict[str, Any]:
        final: dict[str, Any] = {"steps": self.step, "steps_this_attempt": self.step - self.start_step}
        if self.evaluate:
            logged = self._last_eval is not None and self._last_eval[0] == self.step
            metrics = self.evaluate_now()
            if not logged:
                self.logger.log(metrics, self.step)
            final.update(metrics)
            tqdm.write(f"[{self.recipe}] held-out {self._baseline_summary(metrics)}")
        records = read_index(self.run.log_path)
        if not (records and records[-1]["step"] == self.step and records[-1].get("kind") == "both"):
            record = self.checkpointer.save(self.step, self.cursor.state_dict(), final=True)
        else:
            record = records[-1]  # rerun of a finished run: its final checkpoint already exists
        final["final_checkpoint"] = record["name"]
        if self.cfg.output_model_id:
            model = promote(self.session, record, self.cfg.output_model_id)
            # Locally the promoted model is a directory; on Fireworks it is a model resource name.
            final["promoted_model"] = model.get("localPath") or model.get("name")
            tqdm.write(f"[{self.recipe}] promoted {record['name']} as {final['promoted_model']}")
        return final

    def _baseline_summary(self, end: dict[str, float]) -> str:
        """`key: step 0 → step N` for each held-out metric, the step-0 values read back from metrics.jsonl (they
        may come from an earlier attempt of a resumed run)."""
        start = next((r for r in read_jsonl(self.logger.path) if r.get("step") == 0 and any(k in r for k in end)), {})
        parts = []
        for key, value in end.items():
            if key.endswith(("rows", "pairs", "samples")) or not isinstance(value, (int, float)):
                continue  # counts say how much was evaluated, not how well
            before = f"{start[key]:.3f}" if isinstance(start.get(key), (int, float)) else "?"
            parts.append(f"{key} {before} (step 0) -> {value:.3f} (step {self.step})")
        return ", ".join(parts)


class _Timer:
    def __init__(self, metrics: dict[str, Any], key: str):
        self.metrics, self.key = metrics, key

    def __enter__(self) -> "_Timer":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.metrics[self.key] = self.metrics.get(self.key, 0.0) + time.perf_counter() - self.started
