"""DPO: prefer the chosen response over the rejected one, relative to a frozen reference model.

The reference's sequence logprobs are computed once per training pair, a request per batch of the first epoch
(`ReferenceLogprobs`), while training goes on: a step waits only for its own batch. Once every pair has them the
reference trainer is released (held-out pairs are scored by the policy alone: `preference_eval`). Per step: one
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
from cookbook.recipes.evals import pair_sums, preference_eval
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
    held_out = None
    if cfg.eval_dataset:
        eval_data = load_dataset(cfg.eval_dataset, "preference", session.tokenizer, max_len)
        held_out = [p for p in eval_data.items if p is not None][:cfg.max_eval_rows]

    evaluate = preference_eval(session, held_out) if held_out else None

    cursor = DataCursor(len(data), cfg.epochs, cfg.shuffle, run.seed, data.valid)
    loop = TrainingLoop(run, session, logger, cursor, recipe="dpo", batch_size=cfg.batch_size, evaluate=evaluate)
    reference = ReferenceLogprobs(session, data, DataCursor(len(data), 1, cfg.shuffle, run.seed, data.valid),
                                  cfg.batch_size)
    for batch in loop.steps():
        datums = [d for i in batch.indices for d in data.items[i]]
        with loop.timed("reference"):
            ref = reference.of(batch.indices)
        loss_fn = dpo_loss_fn([c for c, _ in ref], [r for _, r in ref], cfg.beta, raw_sum=cfg.raw_sum,
                              normalization=cfg.normalization)
        with loop.timed("fwd_bwd"):
            result = session.policy.forward_backward_custom(datums, loss_fn)
        loop.record(loop.optim_step())
        loop.record({f"train/{k.split(':')[0]}": v for k, v in result.metrics.items()})
        loop.record({"train/loss": result.metrics["dpo_loss"]})
    return loop.finish()


class ReferenceLogprobs:
    """The reference's (Σ chosen, Σ rejected) logprobs of each training pair, computed once and kept.

    Each pair's come from one forward request over its batch of the first epoch (`first_epoch`, a fresh cursor), so
    a pair always gets them from the same request, in a resumed run too (numbers depend on a request's shape). A
    step's batch waits only for its own pairs' requests. A reference on its own trainer gets every request at once
    and works through them while the policy trains; one sharing the policy's trainer gets two ahead of training, so
    the first step does not queue behind all of them. Once every pair has its values, the reference is released.
    """

    AHEAD_ON_SHARED_TRAINER = 2

    def __init__(self, session: Session, data: Dataset, first_epoch: DataCursor, batch_size: int):
        self.session, self.data = session, data
        self.requests = _batches(first_epoch, batch_size)  # pair indices of each request
        self.request_of = {i: k for k, indices in enumerate(self.requests) for i in indices}
        self.ahead = len(self.requests) if session.reference_job_id else self.AHEAD_ON_SHARED_TRAINER
        self.values: dict[int, tuple[float, float]] = {}
        self.sent: dict[int, tuple[list, Any]] = {}  # request -> (its datums, the pending forward)
        self.next_to_send = 0

    def of(self, indices: list[int]) -> list[tuple[float, float]]:
        needed = sorted({self.request_of[i] for i in indices if i not in self.values})
        for k in needed:
            self._send(k)
        self.next_to_send = max([self.next_to_send, *(k + 1 for k in needed)])
        while len(self.sent) < self.ahead and self.next_to_send < len(self.requests):
            self._send(self.next_to_send)
            self.next_to_send += 1
        for k in needed:
            datums, pending = self.sent.pop(k)
            self.values.update(zip(self.requests[k], pair_sums(datums, pending.result())))
        if len(self.values) == len(self.request_of) and self.session.reference is not None:
            self.session.release_reference()  # every pair has its values: the reference is no longer needed
        return [self.values[i] for i in indices]

    def _send(self, k: int) -> None:
        if k not in self.sent and not all(i in self.values for i in self.requests[k]):
            datums = [d for i in self.requests[k] for d in self.data.items[i]]
            self.sent[k] = (datums, self.session.reference.submit_forward(datums, "cross_entropy"))


def _batches(cursor: DataCursor, batch_size: int) -> list[list[int]]:
    out = []
    while (batch := cursor.next_batch(batch_size)).indices:
        out.append(batch.indices)
    return out
