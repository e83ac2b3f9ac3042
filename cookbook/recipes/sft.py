"""Supervised fine-tuning: weighted cross-entropy on assistant turns.

Per step: a batch of rendered rows → one `forward_backward` with the built-in cross-entropy (weights scaled so the
loss is the per-token mean unless the trainer normalizes) → `optim_step`, sent together so the trainer runs them
back to back; between steps where nothing else happens on the trainer, the next step's pair is sent before this
step's results are back, so the trainer never waits for the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from cookbook.client.session import Session
from cookbook.config import RunConfig, SFTConfig
from cookbook.datasets.cursor import DataCursor
from cookbook.datasets.load import Dataset, load_dataset
from cookbook.recipes.evals import exact_match_eval
from cookbook.recipes.loop import TrainingLoop
from cookbook.recipes.losses import scale_weights_for_builtin_ce
from cookbook.runs.metrics import MetricsLogger


def load_data(run: RunConfig, tokenizer: Any) -> Dataset:
    """The training rows, rendered (the runner calls this while the trainer starts)."""
    cfg: SFTConfig = run.recipe
    return load_dataset(cfg.dataset, "sft", tokenizer, cfg.max_seq_len or run.infra.max_context_length,
                        train_on_what=cfg.train_on_what)


def train(run: RunConfig, session: Session, logger: MetricsLogger, data: Dataset) -> dict[str, Any]:
    cfg: SFTConfig = run.recipe
    tqdm.write(f"[sft] {data.summary()}")
    evaluate = None
    if cfg.eval_dataset and session.sampler is not None:
        evaluate = exact_match_eval(session, cfg.eval_dataset, "sft", cfg.max_eval_rows, max_tokens=16)

    cursor = DataCursor(len(data), cfg.epochs, cfg.shuffle, run.seed, data.valid)
    loop = TrainingLoop(run, session, logger, cursor, recipe="sft", batch_size=cfg.batch_size, evaluate=evaluate)

    def send(indices: list[int], step: int) -> tuple[Any, Any]:
        """forward_backward + optim_step of one step, sent together: the trainer runs them back to back."""
        datums = scale_weights_for_builtin_ce([data.items[i] for i in indices], cfg.normalization)
        return session.policy.submit_forward_backward(datums, "cross_entropy"), loop.submit_optim_step(step)

    sent = None  # this step's requests when the previous step already sent them
    for batch in loop.steps():
        with loop.timed("fwd_bwd"):
            pending, optim_step = sent or send(batch.indices, loop.step)
            # The next step's requests go out before this step's results are back, so the trainer starts on them
            # at once (only between steps where the loop does nothing on the trainer: see prefetch_batch).
            upcoming = loop.prefetch_batch()
            sent = send(upcoming.indices, loop.step + 1) if upcoming else None
            out = pending.result()
        loop.record(optim_step())

        loss_sum = tokens = 0.0
        for datum, output in zip((data.items[i] for i in batch.indices), out.loss_fn_outputs):
            weights = datum.loss_fn_inputs["weights"].to_numpy().astype(np.float64)
            loss_sum -= float(output["logprobs"].to_numpy() @ weights)
            tokens += float(weights.sum())
        loop.record({"train/loss": loss_sum / max(tokens, 1.0), "train/loss_tokens": tokens,
                     "train/tokens_per_s": tokens / max(loop.metrics["perf/fwd_bwd_time"], 1e-9)})
    return loop.finish()
