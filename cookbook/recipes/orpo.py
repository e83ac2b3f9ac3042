"""ORPO: SFT on the chosen response plus λ·odds-ratio term pushing it above the rejected one; no reference model.

Per step: one `forward_backward_custom` over the batch laid out [c0, r0, c1, r1, ...] → `optim_step`.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from cookbook.client.session import Session
from cookbook.config import ORPOConfig, RunConfig
from cookbook.datasets.cursor import DataCursor
from cookbook.datasets.load import Dataset, load_dataset
from cookbook.recipes.evals import preference_eval
from cookbook.recipes.loop import TrainingLoop
from cookbook.recipes.losses import orpo_loss_fn
from cookbook.runs.metrics import MetricsLogger


def load_data(run: RunConfig, tokenizer: Any) -> Dataset:
    """The training pairs, rendered (the runner calls this while the trainer starts)."""
    cfg = run.recipe
    return load_dataset(cfg.dataset, "preference", tokenizer, cfg.max_seq_len or run.infra.max_context_length)


def train(run: RunConfig, session: Session, logger: MetricsLogger, data: Dataset) -> dict[str, Any]:
    cfg: ORPOConfig = run.recipe
    max_len = cfg.max_seq_len or run.infra.max_context_length
    tqdm.write(f"[orpo] {data.summary()}")
    evaluate = None
    if cfg.eval_dataset:
        eval_data = load_dataset(cfg.eval_dataset, "preference", session.tokenizer, max_len)
        evaluate = preference_eval(session, [p for p in eval_data.items if p is not None][:cfg.max_eval_rows])

    loss_fn = orpo_loss_fn(cfg.orpo_lambda, raw_sum=cfg.raw_sum, normalization=cfg.normalization)
    cursor = DataCursor(len(data), cfg.epochs, cfg.shuffle, run.seed, data.valid)
    loop = TrainingLoop(run, session, logger, cursor, recipe="orpo", batch_size=cfg.batch_size, evaluate=evaluate)
    for batch in loop.steps():
        datums = [d for i in batch.indices for d in data.items[i]]
        with loop.timed("fwd_bwd"):
            result = session.policy.forward_backward_custom(datums, loss_fn)
        loop.record(loop.optim_step())
        loop.record({f"train/{k.split(':')[0]}": v for k, v in result.metrics.items()})
        loop.record({"train/loss": result.metrics["orpo_loss"]})
    return loop.finish()
