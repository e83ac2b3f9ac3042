"""GRPO: group-relative policy optimization against a deployment that serves the current policy.

Per step:
  1. sample `group_size` completions per prompt from the deployment (seeded per step, so a resumed run repeats them);
  2. score them with the reward function; group z-score advantages; groups whose rewards are all equal carry no
     signal and are dropped, and fresh prompts are drawn to refill the batch (a bounded number of times);
  3. reference forward for the k3 KL (only when kl_beta > 0);
  4. one `forward_backward_custom` with the PPO-clip surrogate + truncated importance correction between the
     trainer's logprobs and the deployment's sampling logprobs. The old policy is the trainer's own logprobs,
     detached: with one optimizer step per batch they are exactly what an extra old-policy forward would return,
     so that forward is skipped;
  5. `optim_step` with the configured normalization (default num_loss_tokens: the loss is a raw token sum);
  6. weight sync per `weight_sync_interval` and DCP saves per `dcp_save_interval` (the shared loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cookbook.client.session import Session
from cookbook.config import GRPOConfig, RunConfig
from cookbook.datasets.cursor import DataCursor
from cookbook.datasets.load import Dataset, load_dataset
from cookbook.datasets.render import align_to_targets, policy_datum, stop_token_ids
from cookbook.recipes.evals import exact_match_eval
from cookbook.recipes.loop import TrainingLoop
from cookbook.recipes.losses import group_advantages, grpo_loss_fn
from cookbook.recipes.rewards import load_reward_fn
from cookbook.runs.metrics import MetricsLogger

MAX_REFILLS = 2  # extra sampling rounds per step to replace groups without signal


@dataclass
class Rollout:
    datum: Any
    advantage: float
    sampling_logprobs: list[float]


def load_data(run: RunConfig, tokenizer: Any) -> Dataset:
    """The training prompts, rendered (the runner calls this while the trainer and the deployment start)."""
    cfg: GRPOConfig = run.recipe
    return load_dataset(cfg.dataset, "grpo", tokenizer, cfg.max_seq_len or run.infra.max_context_length,
                        max_completion_tokens=cfg.max_completion_tokens)


def train(run: RunConfig, session: Session, logger: MetricsLogger, data: Dataset) -> dict[str, Any]:
    cfg: GRPOConfig = run.recipe
    tokenizer = session.tokenizer
    reward_fn = load_reward_fn(cfg.reward_fn)
    stops = stop_token_ids(tokenizer)
    evaluate = None
    if cfg.eval_dataset:
        evaluate = exact_match_eval(session, cfg.eval_dataset, "grpo", cfg.max_eval_rows, cfg.max_completion_tokens,
                                    reward_fn, cfg.eval_samples, cfg.temperature, cfg.top_p)

    cursor = DataCursor(len(data), cfg.epochs, cfg.shuffle, run.seed, data.valid)
    loop = TrainingLoop(run, session, logger, cursor, recipe="grpo", batch_size=cfg.batch_size, evaluate=evaluate,
                        sync_every_step=True)
    loop.sync_before_training()
    for batch in loop.steps():
        # 1-2. Rollouts and advantages, refilling dropped groups.
        rollouts: list[Rollout] = []
        rewards: list[float] = []
        groups = kept = 0
        pending, round_ = batch.indices, 0
        started = time.perf_counter()
        while pending:
            prompts = [data.items[i] for i in pending]
            samples = session.sampler.sample_many(
                prompts, n=cfg.group_size, max_tokens=cfg.max_completion_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, stop_token_ids=stops, seed=loop.sampling_seed(1000 * round_))
            for row_index, prompt, completions in zip(pending, prompts, samples):
                texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
                group_rewards = [float(reward_fn(t, data.rows[row_index])) for t in texts]
                rewards += group_rewards
                groups += 1
                advantages = group_advantages(group_rewards)
                if advantages is None:
                    continue
                kept += 1
                for completion, advantage in zip(completions, advantages):
                    if completion.tokens:
                        rollouts.append(Rollout(policy_datum(prompt, completion.tokens), advantage,
                                                align_to_targets(len(prompt), completion.sampling_logprobs)))
            missing = cfg.batch_size - kept
            round_ += 1
            pending = cursor.next_batch(missing).indices if missing > 0 and round_ <= MAX_REFILLS else []
        loop.record({"rollout/reward": sum(rewards) / max(len(rewards), 1), "rollout/groups": groups,
                     "rollout/groups_kept": kept, "rollout/samples": len(rewards),
                     "perf/rollout_time": time.perf_counter() - started})
        if not rollouts:
            continue  # every group was uninformative: nothing to learn from this step

        datums = [r.datum for r in rollouts]
        masks = [d.loss_fn_inputs["weights"].to_torch().tolist() for d in datums]
        # 3. Reference logprobs for the KL penalty.
        ref_logprobs = None
        if cfg.kl_beta > 0:
            with loop.timed("ref_forward"):
                out = session.reference.forward(datums, "cross_entropy")
            ref_logprobs = [o["logprobs"].to_torch().tolist() for o in out.loss_fn_outputs]
        # 4-5. Policy update.
        loss_fn = grpo_loss_fn(
            advantages=[r.advantage for r in rollouts], old_logprobs=None,
            inference_logprobs=[r.sampling_logprobs for r in rollouts], ref_logprobs=ref_logprobs, masks=masks,
            eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, tis_cap=cfg.tis_cap, kl_beta=cfg.kl_beta,
            raw_sum=cfg.raw_sum, normalization=cfg.normalization)
        with loop.timed("fwd_bwd"):
            result = session.policy.forward_backward_custom(datums, loss_fn)
        loop.record({f"train/{k.split(':')[0]}": v for k, v in result.metrics.items()})
        loop.record(loop.optim_step())
        tokens = sum(sum(m) for m in masks)
        loop.record({"train/loss": result.metrics.get("pg_loss", 0.0), "train/completion_tokens": tokens,
                     "train/tokens_per_s": tokens / max(loop.metrics["perf/fwd_bwd_time"], 1e-9)})
    return loop.finish()
