"""DPO: prefer the chosen response over the rejected one, relative to a frozen reference model.

The reference's sequence logprobs are computed once per training pair before training and cached; the reference
trainer is then released (held-out pairs are scored by the policy alone: `preference_eval`). Per step: one
`forward_backward_custom` over the batch laid out [c0, r0, c1, r1, ...] with −log σ(β·margin) over response
tokens only → `optim_step`.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from cookbook.client.session import Session
from cookbook.config import DPOConfig, RunConfig
from cookbook.datasets.cursor import DataCursor
from cookbook.datasets.load import Dataset, load_dataset
from cookbook.recipes.evals import pair_logprobs, preference_eval
from cookbook.recipes.loop import TrainingLoop
from cookbook.recipes.losses import dpo_loss_fn
from cookbook.runs.metrics import MetricsLogger


def load_data(run: RunConfig, tokenizer: Any) -> Dataset:
    """The training pairs, rendered (the runner calls this while the trainers start)."""
    cfg = run.recipe
    return load_dataset(cfg.dataset, "preference", tokenizer, cfg.max_seq_len or run.infra.max_context_length)


def train(run: RunConfig, session: Session, logger: MetricsLogger, data: Dataset) -> dict[str, Any]:
    cfg: DPOConfig = run.recipe
    max_len = cfg.max_seq_len or run.infra.max_context_length
    tqdm.write(f"[dpo] {data.summary()}")
    usable = [i for i, pair in enumerate(data.items) if pair is not None]
    held_out = None
    if cfg.eval_dataset:
        eval_data = load_dataset(cfg.eval_dataset, "preference", session.tokenizer, max_len)
        held_out = [p for p in eval_data.items if p is not None][:cfg.max_eval_rows]

    # Reference logprobs, once per pair; then the reference trainer is no longer needed.
    ref_cache = dict(zip(usable, pair_logprobs(session.reference, [data.items[i] for i in usable])))
    session.release_reference()
    evaluate = preference_eval(session, held_out) if held_out else None

    cursor = DataCursor(len(data), cfg.epochs, cfg.shuffle, run.seed, data.valid)
    loop = TrainingLoop(run, session, logger, cursor, recipe="dpo", batch_size=cfg.batch_size, evaluate=evaluate)
    for batch in loop.steps():
        datums = [d for i in batch.indices for d in data.items[i]]
        loss_fn = dpo_loss_fn([ref_cache[i][0] for i in batch.indices], [ref_cache[i][1] for i in batch.indices],
                              cfg.beta, raw_sum=cfg.raw_sum, normalization=cfg.normalization)
        with loop.timed("fwd_bwd"):
            result = session.policy.forward_backward_custom(datums, loss_fn)
        loop.record(loop.optim_step())
        loop.record({f"train/{k.split(':')[0]}": v for k, v in result.metrics.items()})
        loop.record({"train/loss": result.metrics["dpo_loss"]})
    return loop.finish()
